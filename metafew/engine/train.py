"""Meta-training loop: episodes in, a trained learner and its checkpoints out.

:func:`train` is one readable loop (sample a meta-batch, ``learner.meta_loss``,
backward, step) plus what a long run needs:

* validation on a fixed :class:`~metafew.data.EpisodeSet` every ``val_every`` steps,
  keeping the best weights in ``best.safetensors``;
* an atomic ``last.safetensors`` every ``checkpoint_every`` steps, at the end and on
  Ctrl-C, holding learner weights, optimizer, GradScaler, sampler RNG, torch/Python/NumPy
  RNGs, step, best-so-far, the running loss sums and the log history; ``resume=True``
  continues from it exactly (same next episode, bit-identical losses);
* ``log.jsonl`` (one JSON object per log row: step, loss, acc, lr, seconds, val_acc),
  drawn as ``learning_curve.png`` at checkpoints (a minute apart at most) and at the end,
  and a tqdm bar. Losses are summed on the device and read back only at log rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import check_state_dict, load_state, save_state
from ..data.episodes import EpisodeSampler, EpisodeSet
from ..device import autocast
from ..errors import CheckpointError, ConfigError
from .curves import plot_learning_curve
from .evaluate import evaluate

if TYPE_CHECKING:
    from ..learners.base import Learner

LAST, BEST, LOG, CURVE = "last.safetensors", "best.safetensors", "log.jsonl", "learning_curve.png"
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
SCHEDULES = ("constant", "step", "cosine", "linear")


@dataclass
class TrainResult:
    """What a run did; ``checkpoint`` is the weights to use (best on validation, else last)."""

    steps: int
    seconds: float
    final_loss: float | None
    final_acc: float | None
    best_val_acc: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    checkpoint: Path | None = None


class _Run(TypedDict):
    """The progress of a run, saved in every checkpoint record (and restored on resume)."""

    step: int
    seconds: float
    best_val_acc: float | None
    best_step: int | None
    history: list[dict[str, Any]]


def build_optimizer(params: Any, spec: str | dict[str, Any], lr: float | None = None) -> torch.optim.Optimizer:
    """``{"name": "adam", "lr": 1e-3, **kwargs}`` (or just a name) -> a torch optimizer; ``lr`` overrides."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(spec.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
    if lr is not None:
        spec["lr"] = lr
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    try:
        return OPTIMIZERS[name](params, **spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {name}: {e}") from e


def lr_schedule(schedule: str, steps: int, step_size: int | None = None, gamma: float = 0.5) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step (0-based): constant, step decay, cosine or linear to 0."""
    if schedule == "constant":
        return lambda s: 1.0
    if schedule == "step":
        if not step_size or step_size < 1:
            raise ConfigError("schedule 'step' needs step_size >= 1")
        return lambda s: gamma ** (s // step_size)
    if schedule == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    if schedule == "linear":
        return lambda s: 1 - s / max(1, steps)
    raise ConfigError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")


def train(
    learner: Learner,
    sampler: EpisodeSampler,
    *,
    steps: int,
    meta_batch_size: int = 1,
    optimizer: str | dict[str, Any] | None = None,
    lr: float | None = None,
    schedule: str = "constant",
    step_size: int | None = None,
    gamma: float = 0.5,
    val_episodes: EpisodeSet | None = None,
    val_every: int = 500,
    val_batch_size: int = 16,
    log_every: int = 100,
    out_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    amp: str | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> TrainResult:
    """Meta-train ``learner`` on ``steps`` meta-batches of ``meta_batch_size`` episodes from ``sampler``.

    ``optimizer`` defaults to ``learner.default_optimizer``; ``schedule`` scales its
    learning rate (``"step"``: times ``gamma`` every ``step_size`` steps). With
    ``out_dir``, checkpoints and ``log.jsonl`` go there and ``resume=True`` continues
    from ``last.safetensors``. ``amp``: ``"bf16"``/``"fp16"`` autocast (fp16 with a
    GradScaler). ``config`` is stored in every checkpoint record (what the run is, to
    rebuild the learner later).

    >>> import metafew
    >>> sampler = metafew.EpisodeSampler(metafew.load_dataset("omniglot", "train"), 5, 1, 5, seed=0, device="cpu")
    >>> learner = metafew.ProtoNet(metafew.create_backbone("conv4", in_channels=1, image_size=28))
    >>> result = metafew.train(learner, sampler, steps=3, progress=False)
    >>> result.steps, result.checkpoint is None      # no out_dir: nothing written
    (3, True)
    """
    if steps < 0 or meta_batch_size < 1 or log_every < 1 or val_every < 1 or checkpoint_every < 1:
        raise ConfigError("steps must be >= 0, and meta_batch_size, log_every, val_every, checkpoint_every >= 1")
    device = sampler.device
    learner.to(device)
    params = [p for p in learner.parameters() if p.requires_grad]
    default_optimizer: str | dict[str, Any] = getattr(learner, "default_optimizer", "adam")
    opt = build_optimizer(params, optimizer or default_optimizer, lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    lr_at = lr_schedule(schedule, steps, step_size, gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp in ("fp16", "float16"))
    out = Path(out_dir).expanduser() if out_dir is not None else None
    run: _Run = {"step": 0, "seconds": 0.0, "best_val_acc": None, "best_step": None, "history": []}
    sums = torch.zeros(3, device=device)  # loss, acc, count since the last log row

    torch.manual_seed(seed)
    if resume and out is not None and (out / LAST).is_file():
        run, sums = _load_last(out / LAST, learner, opt, scaler, sampler, device)
    elif out is not None:
        (out / BEST).unlink(missing_ok=True)  # a fresh run: never report an older run's best weights
    record = {"config": config or {}, "steps": steps, "meta_batch_size": meta_batch_size, "schedule": schedule}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG).write_text("".join(json.dumps(r) + "\n" for r in run["history"]))  # drop rows past the checkpoint

    plotted_at = -math.inf  # when the learning curve was last drawn

    def save_last(final: bool = False) -> None:
        nonlocal plotted_at
        assert out is not None  # only called with an out_dir
        state = {
            "learner": learner.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": _rng_state(),
            "sums": sums,
        }
        save_state(state, out / LAST, {**record, **run})
        if run["history"] and (final or time.perf_counter() - plotted_at > 60):  # a plot a minute at most
            plot_learning_curve(run["history"], out / CURVE, title=str((config or {}).get("name", "")))
            plotted_at = time.perf_counter()

    learner.train()
    batch = None
    start = time.perf_counter() - run["seconds"]
    bar = tqdm(total=steps, initial=run["step"], desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    with _deferred_sigint() as interrupted:
        while run["step"] < steps:
            # -- one meta-step -----------------------------------------------------
            factor = lr_at(run["step"])
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            batch = sampler.sample_batch(meta_batch_size, reuse=batch)  # last step's batch is spent
            with autocast(device, amp):
                loss, acc = learner.meta_loss(batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(opt)
            scaler.update()
            sums += torch.stack([loss.detach().float(), acc.detach().float(), sums.new_ones(())])
            run["step"] = step = run["step"] + 1
            bar.update(1)

            # -- logging, validation, checkpoints (the only host syncs) -----------
            last = step == steps
            validate = val_episodes is not None and (step % val_every == 0 or last)
            if step % log_every == 0 or validate or last:
                loss_sum, acc_sum, n = sums.tolist()
                row: dict[str, Any] = {
                    "step": step,
                    "loss": loss_sum / n,
                    "acc": acc_sum / n,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - start, 3),
                }
                sums.zero_()
                if validate and val_episodes is not None:  # (validate implies it)
                    row["val_acc"] = evaluate(
                        learner, val_episodes, batch_size=val_batch_size, auc=False, progress=False
                    ).accuracy_mean
                    if run["best_val_acc"] is None or row["val_acc"] > run["best_val_acc"]:
                        run["best_val_acc"], run["best_step"] = row["val_acc"], step
                        if out is not None:
                            save_state(learner, out / BEST, {**record, "step": step, "val_acc": row["val_acc"]})
                run["history"].append(row)
                if out is not None:
                    with open(out / LOG, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "acc", "val_acc")})
            run["seconds"] = time.perf_counter() - start
            if out is not None and (step % checkpoint_every == 0 or last or interrupted()):
                save_last(final=last or interrupted())
            if interrupted():
                bar.close()
                raise KeyboardInterrupt(f"interrupted at step {step}" + (f"; checkpoint saved in {out}" if out else ""))
    bar.close()

    rows = run["history"]
    final = rows[-1] if rows else {}
    best = out / BEST if out is not None and (out / BEST).is_file() else None
    return TrainResult(
        steps=run["step"],
        seconds=run["seconds"],
        final_loss=final.get("loss"),
        final_acc=final.get("acc"),
        best_val_acc=run["best_val_acc"],
        best_step=run["best_step"],
        history=rows,
        out_dir=out,
        checkpoint=best or (out / LAST if out is not None else None),
    )


def load_weights(learner: nn.Module, path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load learner weights from ``best.safetensors`` or ``last.safetensors`` (or any saved learner); returns the record."""
    state, record = load_state(path, device)
    if isinstance(state, dict) and isinstance(state.get("learner"), dict):
        state = state["learner"]
    check_state_dict(learner, state, str(path))
    learner.load_state_dict(state)
    return record


# -- internals -------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _load_last(
    path: Path,
    learner: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    sampler: EpisodeSampler,
    device: torch.device,
) -> tuple[_Run, torch.Tensor]:
    state, record = load_state(path)
    if not isinstance(state, dict) or not {"learner", "optimizer", "sampler", "rng"} <= set(state):
        raise CheckpointError(f"{path} is not a training checkpoint (written by metafew.engine.train)")
    check_state_dict(learner, state["learner"], str(path))
    learner.load_state_dict(state["learner"])
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this optimizer ({e})") from e
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"])
    run = cast(_Run, {k: record.get(k) for k in ("step", "seconds", "best_val_acc", "best_step", "history")})
    sums = state.get("sums", torch.zeros(3)).to(device)
    return run, sums


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag read at the end of a step (a second one aborts at once)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        tqdm.write("Interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
