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
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..outputs import guard_run_dir, run_lock, writing
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
    overwrite: bool = False,
    allow_changes: bool = False,
) -> TrainResult:
    """Meta-train ``learner`` on ``steps`` meta-batches of ``meta_batch_size`` episodes from ``sampler``.

    ``optimizer`` defaults to ``learner.default_optimizer``; ``schedule`` scales its
    learning rate (``"step"``: times ``gamma`` every ``step_size`` steps). With
    ``out_dir``, checkpoints and ``log.jsonl`` go there and ``resume=True`` continues
    from ``last.safetensors``. ``amp``: ``"bf16"``/``"fp16"`` autocast (fp16 with a
    GradScaler). ``config`` is stored in every checkpoint record (what the run is, to
    rebuild the learner later).

    The run folder is checked before anything runs (:func:`metafew.outputs.guard_run_dir`):
    it may hold only a run's own files; an existing run is continued with ``resume=True``
    (its stored settings must equal these, unless ``allow_changes=True``, which the log
    records) or replaced with ``overwrite=True``. One process at a time owns the folder
    (``.metafew.lock``). A loss or weight that is not finite stops the run with
    :class:`~metafew.errors.TrainingDiverged`, naming the step; non-finite weights are never saved.

    >>> import metafew
    >>> sampler = metafew.EpisodeSampler(metafew.load_dataset("omniglot", "train"), 5, 1, 5, seed=0, device="cpu")
    >>> learner = metafew.ProtoNet(metafew.create_backbone("conv4", in_channels=1, image_size=28))
    >>> result = metafew.train(learner, sampler, steps=3, progress=False)
    >>> result.steps, result.checkpoint is None      # no out_dir: nothing written
    (3, True)
    """
    if steps < 0 or meta_batch_size < 1 or log_every < 1 or val_every < 1 or checkpoint_every < 1:
        raise ConfigError("steps must be >= 0, and meta_batch_size, log_every, val_every, checkpoint_every >= 1")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise ConfigError(f"grad_clip must be a finite number > 0, got {grad_clip!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"gamma must be a finite number > 0, got {gamma!r}")
    if out_dir is None:
        return _train(**locals())
    out = guard_run_dir(out_dir, resume=resume, overwrite=overwrite)
    with run_lock(out):
        kw = {**locals()}
        kw.pop("out")
        return _train(**{**kw, "out_dir": out})


def _train(
    learner: Learner,
    sampler: EpisodeSampler,
    *,
    steps: int,
    meta_batch_size: int,
    optimizer: str | dict[str, Any] | None,
    lr: float | None,
    schedule: str,
    step_size: int | None,
    gamma: float,
    val_episodes: EpisodeSet | None,
    val_every: int,
    val_batch_size: int,
    log_every: int,
    out_dir: str | Path | None,
    checkpoint_every: int,
    resume: bool,
    amp: str | None,
    grad_clip: float | None,
    progress: bool,
    seed: int,
    config: dict[str, Any] | None,
    overwrite: bool,
    allow_changes: bool,
) -> TrainResult:
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

    settings = {
        "steps": steps,
        "meta_batch_size": meta_batch_size,
        "optimizer": optimizer or default_optimizer,
        "lr": lr,
        "schedule": schedule,
        "step_size": step_size,
        "gamma": gamma,
        "grad_clip": grad_clip,
        "amp": amp,
        "episodes": [sampler.n_way, sampler.k_shot, sampler.n_query],
        "val_every": val_every,
        "seed": seed,
    }
    record = {
        "config": config or {},
        "steps": steps,
        "meta_batch_size": meta_batch_size,
        "schedule": schedule,
        "settings": settings,
    }
    changes: dict[str, list[Any]] = {}
    torch.manual_seed(seed)
    if resume and out is not None and (out / LAST).is_file():
        changes = _changed_settings(out / LAST, record, allow_changes)
        run, sums = _load_last(out / LAST, learner, opt, scaler, sampler, device)
    elif out is not None:
        # A fresh run: never leave an older run's weights to be taken for this one's, even if interrupted.
        for name in (BEST, LAST, CURVE, LOG):
            with writing(out / name):
                (out / name).unlink(missing_ok=True)
    if out is not None:
        if changes:  # allowed: the log says what changed, and when
            run["history"].append({"step": run["step"], "event": "resumed with changed settings", "changes": changes})
        with writing(out / LOG):  # drop rows past the checkpoint
            (out / LOG).write_text("".join(_json_line(r) for r in run["history"]), encoding="utf-8")
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

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
        _check_weights(learner, run["step"], out)
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
            try:
                scaler.step(opt)
            except RuntimeError as e:  # an update too large for float32 (torch refuses it)
                if "overflow" not in str(e):
                    raise
                bar.close()
                _diverged(run["step"] + 1, "an update", opt, out, run)
            scaler.update()
            sums += torch.stack([loss.detach().float(), acc.detach().float(), sums.new_ones(())])
            run["step"] = step = run["step"] + 1
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)  # no host sync
            bar.update(1)

            # -- logging, validation, checkpoints (the only host syncs) -----------
            last = step == steps
            validate = val_episodes is not None and (step % val_every == 0 or last)
            if step % log_every == 0 or validate or last:
                loss_sum, acc_sum, n = sums.tolist()
                if not math.isfinite(loss_sum):
                    bar.close()
                    _diverged(int(bad_step.item()), "the loss", opt, out, run)
                _check_weights(learner, step, out, opt, run, bar)
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
                    with writing(out / LOG), open(out / LOG, "a", encoding="utf-8") as f:
                        f.write(_json_line(row))
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "acc", "val_acc")})
            run["seconds"] = time.perf_counter() - start
            if out is not None and (step % checkpoint_every == 0 or last or interrupted()):
                save_last(final=last or interrupted())
            if interrupted():
                bar.close()
                raise KeyboardInterrupt(f"interrupted at step {step}" + (f"; checkpoint saved in {out}" if out else ""))
    bar.close()

    rows = run["history"]
    logged = [r for r in rows if "loss" in r]
    final = logged[-1] if logged else {}
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


def _json_line(row: dict[str, Any]) -> str:
    """One strict JSON line (NaN/Infinity are not JSON: a non-finite value is a bug caught before here)."""
    return json.dumps(row, allow_nan=False) + "\n"


def _check_weights(
    learner: nn.Module,
    step: int,
    out: Path | None,
    opt: torch.optim.Optimizer | None = None,
    run: _Run | None = None,
    bar: Any = None,
) -> None:
    """Stop with TrainingDiverged when a weight is not finite (one host sync)."""
    params = [p.detach() for p in learner.parameters() if p.is_floating_point()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        if bar is not None:
            bar.close()
        _diverged(step, "a weight", opt, out, run, exact=False)


def _diverged(
    step: int, what: str, opt: torch.optim.Optimizer | None, out: Path | None, run: _Run | None, exact: bool = True
) -> None:
    lr = opt.param_groups[0]["lr"] if opt is not None else None
    at = f"at step {step}" if exact else f"by step {step}"
    cause = (
        f"the learning rate ({lr:g}) is probably too high"
        if lr is not None
        else "the learning rate is probably too high"
    )
    kept = ""
    if out is not None:
        last = out / LAST
        kept = f"; the last good checkpoint is {last}" if last.is_file() else "; no weights were saved"
    raise TrainingDiverged(
        f"training diverged: {what} became NaN or infinite {at}; {cause} (lower --lr, or set --grad-clip){kept}"
    )


_UNCHECKED = {"name", "test", "test_subset", "eval_episodes", "eval_batch_size", "log_every", "checkpoint_every"}


def _changed_settings(path: Path, record: dict[str, Any], allow: bool) -> dict[str, list[Any]]:
    """What differs between the run stored at ``path`` and the one asked for; refused unless ``allow``."""
    from ..checkpoint import read_header

    _, doc = read_header(path)
    old = doc.get("record") or {}
    new_plain = json.loads(json.dumps(record, default=str))
    changes: dict[str, list[Any]] = {}
    old_settings = old.get("settings") or {k: old.get(k) for k in ("steps", "meta_batch_size", "schedule")}
    for k, v in (new_plain.get("settings") or {}).items():
        if k in old_settings and old_settings[k] != v:
            changes[k] = [old_settings[k], v]
    old_config, new_config = old.get("config") or {}, new_plain.get("config") or {}
    if old_config and new_config:
        for k in sorted(set(old_config) | set(new_config)):
            if k in _UNCHECKED or k in changes:
                continue
            if old_config.get(k) != new_config.get(k):
                changes[k] = [old_config.get(k), new_config.get(k)]
    if changes and not allow:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise ConfigError(
            f"{path.parent}: the run was trained with other settings ({listed}{more}); resume with the run's own "
            "settings, or pass --allow-config-change to continue with the new ones (the log records it)"
        )
    return changes


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
