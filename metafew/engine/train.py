"""Meta-training loop: episodes in, a trained learner and its checkpoints out.

:func:`train` is one readable loop (sample a meta-batch, ``learner.meta_loss``,
backward, step) plus what a long run needs:

* validation on a fixed :class:`~metafew.data.EpisodeSet` at the start and every ``val_every`` steps,
  keeping the best weights in ``best.safetensors``;
* an atomic ``last.safetensors`` every ``checkpoint_every`` steps, at the end and on
  Ctrl-C, holding learner weights, optimizer, GradScaler, sampler RNG, torch/Python/NumPy
  RNGs, step, best-so-far, the running loss sums and the log history; ``resume=True``
  continues from it exactly (same next episode, bit-identical losses);
* ``log.jsonl`` (one JSON object per log row: step, loss, acc, lr, seconds, val_acc and
  its 95% CI val_acc_ci95), drawn as ``learning_curve.png`` at checkpoints (a minute apart
  at most) and at the end, optionally written to TensorBoard too (``tensorboard=``), and a
  tqdm bar. Losses are summed on the device and read back only at log rows.

Under ``torchrun`` (or inside any initialised process group of N processes, see
:mod:`metafew.distributed`) the same loop runs on every process:

* every rank draws the *same* meta-batch of B episodes from the seeded sampler (the
  sampler's RNG advances identically everywhere, so neither resuming nor the number of
  ranks changes which episodes are drawn) and builds only its contiguous slice of about
  B/N tasks (the whole batch, then sliced, with an augmenting sampler, whose augmentation
  draws from the same RNG, or a memory-mapped dataset). B must be >= N: every rank needs
  at least one task (a smaller B is refused with a ConfigError);
* each rank backpropagates ``meta_loss(slice) * len(slice) / B`` and the gradients are
  summed over ranks in one all-reduce: the meta-gradient of one process with the whole
  meta-batch (every learner's ``meta_loss`` is a mean over equal-sized tasks: ProtoNet,
  MatchingNet, MetaOptNet/R2-D2 average the query cross-entropy, MAML/FO-MAML and Reptile
  the per-task losses, Reptile's surrogate giving ``theta - mean phi``). Every rank then
  takes the same optimizer step; no DDP wrapper is involved, so MAML's inner
  ``autograd.grad`` is untouched;
* BatchNorm: learners that run the meta-batch through the backbone in one pass in its
  own training mode (ProtoNet, MatchingNet, MetaOptNet, R2-D2: the ``Frozen`` policy)
  normalise with the statistics of all ranks' images (:func:`metafew.distributed.synced_batchnorm`),
  exactly as one process does, and their running statistics stay equal on every rank;
  ``Transductive`` learners (MAML, FO-MAML, Reptile) use each task's own batch statistics,
  which never cross tasks, so nothing is shared. Buffers are re-broadcast from rank 0
  before validation and checkpoints all the same;
* torch's global RNG (dropout, Reptile's inner minibatch order) is seeded per rank:
  rank 0 keeps the single-process stream (checkpointed); rank r > 0 is re-seeded from
  (seed, r, step) when it starts or resumes, so with Reptile's minibatches (its default
  ``inner_batch_size``) the inner loops see other minibatch orders than one process
  would: the same estimator, not the same numbers;
* logged loss/acc are means over all ranks' tasks (device-side sums, reduced only at log
  rows); validation episodes are sharded over ranks (:func:`~metafew.engine.evaluate.evaluate`);
* rank 0 alone takes the run lock, writes checkpoints, ``log.jsonl``, the plot and the
  progress bar. The checkpoint holds no per-rank state: a run resumes with any number of
  ranks, every rank reading the same ``last.safetensors``;
* Ctrl-C (on any rank) is agreed on through the gradient all-reduce and stops every rank
  one step later, after the checkpoint; a rank that dies makes the others stop with a
  :class:`~metafew.distributed.DistributedError` (see :mod:`metafew.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import nn

from .. import distributed
from ..checkpoint import check_state_dict, load_state, save_state
from ..data.episodes import EpisodeBatch, EpisodeSampler, EpisodeSet
from ..device import autocast
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..learners.bn import BNPolicy
from ..outputs import guard_run_dir, run_lock, writing
from ..progress import tqdm
from .curves import plot_learning_curve
from .evaluate import evaluate
from .runstate import deferred_sigint, rank_seed, rng_state, set_rng_state
from .tensorboard import FOLDER as TENSORBOARD
from .tensorboard import clear_events, require_tensorboard, tensorboard_folder, tensorboard_log

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


def sample_slice(sampler: EpisodeSampler, meta_batch_size: int, *, reuse: EpisodeBatch | None = None) -> EpisodeBatch:
    """This process's tasks of the sampler's next meta-batch of ``meta_batch_size`` (all of them in one process).

    Every rank draws the episode indices of the whole meta-batch (a few random numbers:
    the sampler's RNG advances exactly as ``sampler.sample_batch(meta_batch_size)`` would)
    and builds only the images of its contiguous slice (:func:`metafew.distributed.shard`).
    A sampler with augmentation, which draws from the same RNG image by image, builds the
    whole batch and slices it, so the episodes stay those of one process.
    """
    if distributed.world() == 1:
        return sampler.sample_batch(meta_batch_size, reuse=reuse)
    lo, hi = distributed.shard(meta_batch_size)
    draw, build = getattr(sampler, "_draw", None), getattr(sampler, "_build", None)
    # in-memory datasets only: a memory-mapped one gathers (and prefetches) whole batches on the host
    cheap = getattr(sampler, "augment", None) is None and not getattr(sampler, "is_mapped", False)
    if draw is not None and build is not None and cheap:
        idx, classes = draw(meta_batch_size, sampler.generator)
        return EpisodeBatch(*build(idx[lo:hi], classes[lo:hi], None, reuse))
    full = sampler.sample_batch(meta_batch_size)
    return EpisodeBatch(*(getattr(full, f.name)[lo:hi] for f in dataclasses.fields(EpisodeBatch)))


def meta_backward(
    learner: Learner,
    batch: EpisodeBatch,
    meta_batch_size: int,
    *,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    flag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagate the meta-loss of this rank's ``batch`` (its slice of ``meta_batch_size`` tasks) into ``.grad``.

    Afterwards every rank holds the same gradients: those of one process with the whole
    meta-batch. Each rank's loss is weighted by ``len(batch) / meta_batch_size`` before the
    backward pass, and the gradients are summed over ranks in one all-reduce. BatchNorm
    layers a learner runs in the backbone's own training mode (its policy's ``while_training``
    is the default) see the statistics of all ranks' images (:func:`~metafew.distributed.synced_batchnorm`).
    Call ``opt.zero_grad()`` before and ``opt.step()`` after, as with ``loss.backward()``.

    Returns this rank's (loss, acc) of its slice and ``flag`` (e.g. "interrupted") summed
    over ranks, as a 1-element device tensor (no host sync).
    """
    weight = len(batch) / meta_batch_size
    device = batch.query_x.device
    synced = type(learner.bn).while_training is BNPolicy.while_training  # the module's own mode
    bn = distributed.synced_batchnorm(learner) if synced else contextlib.nullcontext()
    with distributed.collective("the meta-loss"), bn, autocast(device, amp):
        loss, acc = learner.meta_loss(batch)
    scaled = loss * weight if distributed.world() > 1 else loss
    with distributed.collective("the backward pass"):
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    params = [p for p in learner.parameters() if p.requires_grad]
    reduced = distributed.all_reduce_grads(params, 1.0, distributed.constant((float(flag),), device))
    assert reduced is not None
    return loss, acc, reduced


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
    tensorboard: bool | str | Path | None = None,
    validate_start: bool = True,
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
    (``.metafew.lock``). Inside a process group of N processes (``torchrun``) the meta-batch
    is split over them and the step is that of one process with the whole meta-batch (see
    the module docstring); rank 0 writes. A loss or weight that is not finite stops the run with
    :class:`~metafew.errors.TrainingDiverged`, naming the step; non-finite weights are never saved.
    ``tensorboard``: also write the log rows as TensorBoard scalars (:mod:`metafew.engine.tensorboard`),
    into ``out_dir/tensorboard`` (``True``) or a folder of your choice.
    ``validate_start``: with ``val_episodes``, the starting weights are validated too (a ``step``
    0 row), so a run that never beats its start (a pretrained backbone) keeps the start as its best.

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
    if meta_batch_size < distributed.world():
        raise ConfigError(
            f"meta_batch_size {meta_batch_size} is smaller than the {distributed.world()} processes of this run: "
            "every process needs at least one task of each meta-batch; use a meta-batch of at least "
            f"{distributed.world()} (or fewer processes)"
        )
    if tensorboard_folder(tensorboard, None if out_dir is None else Path(out_dir) / TENSORBOARD) is not None:
        require_tensorboard()  # before anything is written
    if out_dir is None:
        return _train(**locals())
    out = guard_run_dir(out_dir, resume=resume, overwrite=overwrite)
    distributed.barrier("checking the run folder")  # every rank has looked before rank 0 changes anything
    if not distributed.is_main():
        kw = {**locals()}
        kw.pop("out")
        return _train(**{**kw, "out_dir": out})
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
    tensorboard: bool | str | Path | None,
    validate_start: bool,
) -> TrainResult:
    device = sampler.device
    learner.to(device)
    ranks, main = distributed.world(), distributed.is_main()
    multi = ranks > 1
    weight = len(range(*distributed.shard(meta_batch_size))) / meta_batch_size  # this rank's share
    progress = progress and main
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
        if not main:
            sums.zero_()  # the saved sums are all ranks' together: rank 0 carries them
    elif out is not None and main:
        # A fresh run: never leave an older run's weights to be taken for this one's, even if interrupted.
        for name in (BEST, LAST, CURVE, LOG):
            with writing(out / name):
                (out / name).unlink(missing_ok=True)
        clear_events(out / TENSORBOARD)
    if multi:
        distributed.broadcast_module(learner)  # the same start on every rank, whatever each one built
        if not main:  # its own stream for dropout, inner minibatches...: not rank 0's
            torch.manual_seed(rank_seed(seed, distributed.rank(), run["step"]))
    if changes:  # allowed: the log says what changed, and when
        run["history"].append({"step": run["step"], "event": "resumed with changed settings", "changes": changes})
    if out is not None and main:
        with writing(out / LOG):  # drop rows past the checkpoint
            (out / LOG).write_text("".join(_json_line(r) for r in run["history"]), encoding="utf-8")
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

    plotted_at = -math.inf  # when the learning curve was last drawn
    stop_flag = distributed.LaggedFlag()  # Ctrl-C on any rank, agreed on one step later
    stopped_before = False

    def reduce_sums() -> None:
        """All ranks' loss/acc sums on rank 0 (zero elsewhere): what a log row or checkpoint needs."""
        if multi:
            distributed.all_reduce_(sums, "summing the logged losses")
            if not main:
                sums.zero_()

    def save_last(final: bool = False) -> None:
        nonlocal plotted_at
        assert out is not None  # only called with an out_dir
        reduce_sums()
        distributed.broadcast_module(learner, buffers_only=True)
        if not main:
            return
        state = {
            "learner": learner.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng_state(),
            "sums": sums,
        }
        _check_weights(learner, run["step"], out)
        save_state(state, out / LAST, {**record, **run})
        if run["history"] and (final or time.perf_counter() - plotted_at > 60):  # a plot a minute at most
            plot_learning_curve(run["history"], out / CURVE, title=str((config or {}).get("name", "")))
            plotted_at = time.perf_counter()

    def validate(row: dict[str, Any]) -> None:
        """Score the fixed validation episodes into ``row``; a new best is kept in best.safetensors."""
        assert val_episodes is not None
        if multi:
            distributed.broadcast_module(learner, buffers_only=True)
        result = evaluate(learner, val_episodes, batch_size=val_batch_size, auc=False, progress=False)
        row["val_acc"], row["val_acc_ci95"] = result.accuracy_mean, result.accuracy_ci95
        if run["best_val_acc"] is None or row["val_acc"] > run["best_val_acc"]:
            run["best_val_acc"], run["best_step"] = row["val_acc"], row["step"]
            if out is not None and main:
                save_state(learner, out / BEST, {**record, "step": row["step"], "val_acc": row["val_acc"]})

    def log_row(row: dict[str, Any]) -> None:
        run["history"].append(row)
        if out is not None and main:
            with writing(out / LOG), open(out / LOG, "a", encoding="utf-8") as f:
                f.write(_json_line(row))
        if tb is not None:
            tb.write(row)

    learner.train()
    batch = None
    start = time.perf_counter() - run["seconds"]
    bar = tqdm(total=steps, initial=run["step"], desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    tb_dir = tensorboard_folder(tensorboard, None if out is None else out / TENSORBOARD)
    purge = run["step"] + 1  # hide the folder's events past the checkpoint (a crashed session's, a replaced run's)
    with (
        deferred_sigint() as interrupted,
        tensorboard_log(tb_dir, step_key="step", purge_step=purge, cumulative_seconds=True) as tb,
    ):
        if tb is not None:
            tb.resume_from(run["history"])
        if validate_start and val_episodes is not None and run["step"] == 0 and steps > 0:
            row0: dict[str, Any] = {"step": 0}
            validate(row0)  # the start: kept if meta-training never beats it
            log_row(row0)
            bar.set_postfix({"val_acc": f"{row0['val_acc']:.4g}"})
        while run["step"] < steps:
            # -- one meta-step -----------------------------------------------------
            factor = lr_at(run["step"])
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            if multi:
                batch = sample_slice(sampler, meta_batch_size, reuse=batch)
                opt.zero_grad(set_to_none=True)
                loss, acc, flag = meta_backward(
                    learner, batch, meta_batch_size, amp=amp, scaler=scaler, flag=interrupted()
                )
                stopped_before = stop_flag.pop()  # the step before's flag: its all-reduce is long done
                stop_flag.push(flag)
            else:
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
            if multi:  # this rank's share: summed over ranks, a step adds the whole meta-batch's means
                sums += torch.stack([loss.detach().float(), acc.detach().float(), sums.new_ones(())]) * weight
            else:
                sums += torch.stack([loss.detach().float(), acc.detach().float(), sums.new_ones(())])
            run["step"] = step = run["step"] + 1
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)  # no host sync
            bar.update(1)

            # -- logging, validation, checkpoints (the only host syncs) -----------
            last = step == steps
            validating = val_episodes is not None and (step % val_every == 0 or last)
            if step % log_every == 0 or validating or last:
                if multi:  # the same totals on every rank
                    distributed.all_reduce_(sums, "summing the logged losses")
                    loss_sum, acc_sum, n = sums.tolist()
                    n = float(round(n))  # each step's shares add up to 1
                else:
                    loss_sum, acc_sum, n = sums.tolist()
                if not math.isfinite(loss_sum):
                    bar.close()
                    _diverged(_first_bad_step(bad_step, multi), "the loss", opt, out, run)
                _check_weights(learner, step, out, opt, run, bar)
                row: dict[str, Any] = {
                    "step": step,
                    "loss": loss_sum / n,
                    "acc": acc_sum / n,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - start, 3),
                }
                sums.zero_()
                if validating:
                    validate(row)
                log_row(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "acc", "val_acc")})
            run["seconds"] = time.perf_counter() - start
            stop = stopped_before if multi else interrupted()  # the same answer on every rank
            if out is not None and (step % checkpoint_every == 0 or last or stop):
                save_last(final=last or stop)
            if stop:
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


def _first_bad_step(bad_step: torch.Tensor, multi: bool) -> int:
    """The first step with a non-finite loss on any rank."""
    if not multi:
        return int(bad_step.item())
    never = torch.iinfo(torch.long).max
    first = torch.where(bad_step < 0, torch.full_like(bad_step, never), bad_step).reshape(1).cpu()
    distributed.all_reduce_(first, "finding the step that diverged", op="min")
    return -1 if int(first) == never else int(first)


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


_UNCHECKED = {
    "name",
    "test",
    "test_subset",
    "eval_episodes",
    "eval_batch_size",
    "log_every",
    "checkpoint_every",
    "tensorboard",
}


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
    set_rng_state(state["rng"])
    run = cast(_Run, {k: record.get(k) for k in ("step", "seconds", "best_val_acc", "best_step", "history")})
    sums = state.get("sums", torch.zeros(3)).to(device)
    return run, sums
