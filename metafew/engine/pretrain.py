"""Supervised pretraining of a backbone on the base classes.

The "pretrain, then adapt" recipe (Chen et al. 2019 Baseline++, Tian et al. 2020
RFS, Chen et al. 2021 Meta-Baseline): train the backbone with a linear head by
plain cross-entropy over all base-class images, drop the head, and reuse the
backbone for ProtoNet/fine-tuning/MAML on novel classes.

The data loop never leaves the device: the dataset's uint8 images are moved to the
device once, each epoch draws a permutation from a seeded CPU generator, and each
batch is gathered by indexing, normalised and (optionally) augmented on the device.
Loss and accuracy are accumulated on the device and read once per epoch.

With ``out`` (``OUT.safetensors``), a long run can be stopped and continued, as
``metafew train`` runs can: ``OUT.resume.safetensors`` holds the whole state (backbone
and head, optimizer, scheduler, GradScaler, the batch-order generator, the global
torch/Python/NumPy RNGs, the epoch and step, the epoch's running sums, the best epoch
so far and the log history), saved atomically at the end of each epoch, every
``checkpoint_every`` steps and on Ctrl-C (which finishes the step, saves, and stops with
``KeyboardInterrupt``: exit status 130 from the command line). ``resume=True`` continues
from it, mid-epoch included, to bit-identical weights; the file is removed once the
backbone is saved. ``OUT.log.jsonl`` holds one row per epoch, and ``tensorboard=`` writes
the same rows as TensorBoard scalars (:mod:`metafew.engine.tensorboard`).

Under ``torchrun`` (:mod:`metafew.distributed`) the backbone and head train as one
``torch.nn.parallel.DistributedDataParallel`` module: every rank draws the same seeded
permutation of each epoch (the split DistributedSampler makes, without its padding) and
takes its contiguous part of each global batch of ``batch_size`` images; each rank's
loss is weighted by its share, so the averaged gradient is that of the whole batch.
BatchNorm normalises with each rank's own part of the batch (plain DDP; the running
statistics are rank 0's, which DDP broadcasts at every forward). Augmentation draws from
a per-rank generator (seeded from ``seed`` and the rank), so the batch order stays shared.
Validation is sharded over the ranks and summed; rank 0 alone writes the log, the
checkpoints and the backbone file. The checkpoint also holds each rank's augmentation and
global RNG states: a run resumed with as many processes goes on bit-identically; with
another number it resumes all the same (the weights, optimizer and batch order are
shared), each rank re-seeded from the step (the same estimator, other augmentation draws).
A Ctrl-C on any rank is agreed on through a one-number all-reduce per step and stops every
rank one step later.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..backbones import create
from ..checkpoint import check_state_dict, checkpoint_path, load_state, save_state
from ..data.base import FewShotDataset
from ..device import autocast, eval_mode, resolve_amp, resolve_device
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..outputs import OutputError, guard_output, writing
from .evaluate import mean_ci95
from .runstate import deferred_sigint, rank_seed, rng_state, set_rng_state
from .tensorboard import clear_events, require_tensorboard, tensorboard_folder, tensorboard_log

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
LogFn = Callable[[dict[str, Any]], None]

#: Beside ``OUT.safetensors``: the resumable state, the log and the default TensorBoard folder.
RESUME_SUFFIX, LOG_SUFFIX, TENSORBOARD_SUFFIX = ".resume.safetensors", ".log.jsonl", ".tensorboard"
_STATE_FORMAT = "metafew-pretrain-state"


def resume_path(out: str | os.PathLike[str]) -> Path:
    """Where the resumable checkpoint of the backbone file ``out`` goes: ``OUT.resume.safetensors``."""
    return checkpoint_path(out).with_suffix(RESUME_SUFFIX)


@dataclass(frozen=True)
class PretrainOutputs:
    """The files of a pretraining run, checked by :func:`check_outputs`."""

    backbone: Path
    state: Path
    log: Path | None
    resuming: bool  # a checkpoint is there and resume was asked: continue from it


def check_outputs(
    out: str | os.PathLike[str],
    log: LogFn | str | os.PathLike[str] | None,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> PretrainOutputs:
    """Check the backbone file ``out``, its checkpoint and the ``log`` file before any work starts.

    The rules of :mod:`metafew.outputs`: a file metafew did not write is never touched;
    a finished backbone is replaced only with ``overwrite``; an interrupted run (its
    ``OUT.resume.safetensors``) is continued with ``resume`` or replaced with ``overwrite``,
    never silently. One-line :class:`~metafew.outputs.OutputError` or ConfigError otherwise.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a pretraining and --overwrite replaces it: pass one of them")
    if Path(out).expanduser().is_dir():  # before a suffix is added: a folder is never a backbone file
        guard_output(out, "backbone", overwrite=overwrite)
    path = checkpoint_path(out)
    state = resume_path(path)
    interrupted = state.exists() or state.is_symlink()
    if interrupted:
        guard_output(state, "state", overwrite=True)  # refused unless it is a metafew checkpoint
        if not (resume or overwrite):
            raise OutputError(
                f"{state} holds an interrupted pretraining of {path.name}; pass --resume to continue it "
                "or --overwrite to start afresh"
            )
    elif resume and path.exists():
        raise OutputError(
            f"--resume: {path} is a finished pretraining (no {state.name} to continue from); "
            "pass --overwrite to pretrain again"
        )
    out_exists = path.exists()
    guard_output(path, "backbone", overwrite=overwrite or (resume and interrupted))
    log_path = None
    if log is not None and not callable(log):
        log_path = Path(log).expanduser()
        empty = log_path.is_file() and not log_path.is_symlink() and log_path.stat().st_size == 0
        if not (interrupted and empty):  # an interrupted run's own log is empty until its first epoch ends
            # an earlier metafew log without its backbone is an interrupted run's: replaced (or continued)
            log_path = guard_output(log, "pretrain-log", overwrite=overwrite or resume or not out_exists)
    return PretrainOutputs(path, state, log_path, resume and interrupted)


def _logger(log: LogFn | str | os.PathLike[str] | None, path: Path | None, rows: list[dict[str, Any]]) -> LogFn:
    """``log`` as a callable: a function, a JSON-lines file (started afresh with ``rows``, strict JSON), or nothing."""
    if log is None:
        return lambda entry: None
    if callable(log):
        return log
    path = path or Path(log).expanduser()
    with writing(path):  # this run's log: never appended to another run's; a resumed run's rows up to its checkpoint
        path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows), encoding="utf-8")

    def write(entry: dict[str, Any]) -> None:
        with writing(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")

    return write


def _check_finite(
    total_loss: float, bad_step: int, backbone: nn.Module, epoch: int, step: int, lr: float, out: Any
) -> None:
    """Stop with TrainingDiverged when the loss summed so far or a weight is not finite (``step``: steps done)."""
    what = None
    if not math.isfinite(total_loss):
        what, step = "the loss", bad_step
    else:
        params = [p.detach() for p in backbone.parameters() if p.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            what = "a weight"
    if what is not None:
        saved = "; the backbone was not saved" if out is not None else ""
        raise TrainingDiverged(
            f"pretraining diverged: {what} became NaN or infinite at step {step} (epoch {epoch}); the learning "
            f"rate ({lr:g}) is probably too high (lower --lr){saved}"
        )


def _first_bad_step(bad_step: torch.Tensor) -> int:
    """The first step with a non-finite loss on any rank (-1: none)."""
    if distributed.world() == 1:
        return int(bad_step.item())
    never = torch.iinfo(torch.long).max
    first = torch.where(bad_step < 0, torch.full_like(bad_step, never), bad_step).reshape(1).cpu()
    distributed.all_reduce_(first, "finding the step that diverged", op="min")
    return -1 if int(first) == never else int(first)


def _plain(x: Any) -> Any:
    """``x`` as JSON reads it back (tuples as lists...): what a checkpoint record holds."""
    return json.loads(json.dumps(x, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = [k for k in new if k in old and old[k] != new[k]] + [k for k in old if k not in new]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def _load_checkpoint(path: Path, recipe: dict[str, Any], net: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state (on the CPU, where RNG states must be) and record of a pretraining checkpoint.

    Refused in one line when it is of another recipe, naming what differs.
    """
    state, record = load_state(path, "cpu")
    if record.get("format") != _STATE_FORMAT or not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a pretraining checkpoint (written by metafew pretrain)")
    changed = _differences(record.get("recipe") or {}, _plain(recipe))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"cannot resume from {path}: it is a checkpoint of another pretraining ({', '.join(changed[:3])}{more}); "
            "resume with the same settings, or pass --overwrite to start afresh"
        )
    check_state_dict(net, state["model"], str(path))
    return state, record


class _DeviceBatches:
    """Batches of a :class:`FewShotDataset` gathered on the device from its uint8 images."""

    def __init__(self, dataset: FewShotDataset, device: torch.device) -> None:
        self.images = dataset.images.to(device, non_blocking=True)
        self.labels = dataset.labels.to(device, non_blocking=True)
        self.normalize = dataset.normalizer  # the one uint8 -> float normalisation (metafew.data.normalize)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(self.images[idx])
        return x, self.labels[idx]


@torch.no_grad()
def _evaluate_same_classes(
    backbone: nn.Module, head: nn.Module, data: _DeviceBatches, batch_size: int, amp: torch.dtype | None
) -> dict[str, float]:
    """Loss and accuracy of backbone + head on held-out images of the training classes."""
    loss = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    ranks, me = distributed.world(), distributed.rank()
    with eval_mode(backbone), eval_mode(head):
        for start in range(me * batch_size, len(data), batch_size * ranks):  # chunk j on rank j % N
            idx = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
            x, y = data.get(idx)
            with autocast(data.device, amp):
                logits = head(backbone(x))
            loss += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    n = max(len(data), 1)
    total_loss, total_correct = distributed.all_reduce_(torch.stack([loss, correct.float()]), "validating").tolist()
    return {"val_loss": total_loss / n, "val_acc": total_correct / n}


@torch.no_grad()
def _embed(backbone: nn.Module, data: _DeviceBatches, batch_size: int, amp: torch.dtype | None) -> torch.Tensor:
    """Features of every image of ``data``, ``[N, D]`` float32, in eval mode (chunk j embedded on rank j % N)."""
    out = []
    ranks, me = distributed.world(), distributed.rank()
    with eval_mode(backbone):
        for start in range(me * batch_size, len(data), batch_size * ranks):
            idx = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
            with autocast(data.device, amp):
                out.append(backbone(data.get(idx)[0]).float())
    if ranks == 1:
        return torch.cat(out)
    parts = distributed.gather_objects([t.cpu() for t in out])  # back in chunk order
    chunks = [parts[j % ranks][j // ranks] for j in range(sum(len(p) for p in parts))]
    return torch.cat(chunks).to(data.device)


class _FewShotProbe:
    """Fixed N-way K-shot episodes over a validation set, scored by nearest centroid (cosine) on features.

    Every image is embedded once per check and the episodes are drawn as index tensors
    (the same ones at every epoch), so hundreds of episodes cost one pass over the set.
    """

    def __init__(self, val: FewShotDataset, device: torch.device, shots: int, episodes: int, seed: int) -> None:
        counts = val.class_counts()
        eligible = (counts > shots).nonzero().squeeze(1)
        if len(eligible) < 2:
            raise ConfigError(f"{val.name}: few-shot validation needs 2 classes with more than {shots} images")
        self.n_way = min(5, len(eligible))
        self.k, self.q = shots, min(15, int(counts[eligible].min()) - shots)
        order = torch.argsort(val.labels, stable=True)
        offsets = torch.cumsum(counts, 0) - counts
        width = int(counts[eligible].max())
        col = torch.arange(width)
        valid = col[None] < counts[eligible][:, None]
        table = order[(offsets[eligible][:, None] + col[None]).clamp(max=len(order) - 1)]
        gen = torch.Generator().manual_seed(seed)
        pick = torch.rand(episodes, len(eligible), generator=gen).topk(self.n_way, dim=1).indices  # [E, N]
        keys = torch.rand(episodes, self.n_way, width, generator=gen).masked_fill(~valid[pick], -1.0)
        pos = keys.topk(self.k + self.q, dim=2).indices  # [E, N, K+Q], distinct images per class
        self.index = table[pick.unsqueeze(2), pos].to(device)
        self.data = _DeviceBatches(val, device)

    def __call__(self, backbone: nn.Module, amp: torch.dtype | None) -> dict[str, float]:
        feats = F.normalize(_embed(backbone, self.data, 256, amp), dim=1)
        truth = torch.arange(self.n_way, device=feats.device).repeat_interleave(self.q)
        hits = []
        for chunk in self.index.split(64):  # bounded memory: [64, N, K+Q, D] at a time
            f = feats[chunk]
            protos = F.normalize(f[:, :, : self.k].mean(2), dim=2)  # [E, N, D]
            queries = f[:, :, self.k :].flatten(1, 2)  # [E, N*Q, D]
            hits.append(((queries @ protos.transpose(1, 2)).argmax(2) == truth).sum(1))  # per episode
        per_episode = torch.cat(hits).cpu()
        _, ci95 = mean_ci95(per_episode / len(truth))
        return {
            "val_fewshot_acc": int(per_episode.sum()) / (self.index.shape[0] * len(truth)),
            "val_fewshot_ci95": ci95,
        }


def pretrain(
    backbone: str | nn.Module,
    dataset: FewShotDataset,
    *,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    device: str | torch.device | None = "auto",
    amp: str | torch.dtype | None = None,
    val: FewShotDataset | None = None,
    val_shots: int = 5,
    val_episodes: int = 500,
    augment: Augment | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: LogFn | str | os.PathLike[str] | None = None,
    backbone_options: dict[str, Any] | None = None,
    keep: str = "last",
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: int | None = None,
    tensorboard: bool | str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Pretrain ``backbone`` by cross-entropy over ``dataset``'s classes; returns it (eval mode, on ``device``).

    Args:
        backbone: a registry name (built for the dataset's channels and image size,
            with ``backbone_options``) or a module from :func:`metafew.backbones.create`.
        dataset: the base (training) classes; a linear head over them is trained and discarded.
        epochs, batch_size, lr, weight_decay, momentum: SGD with Nesterov momentum and a
            cosine learning-rate decay to 0 over all steps (the usual recipe; RFS and
            Meta-Baseline use about 90-100 epochs on miniImageNet).
        label_smoothing: cross-entropy label smoothing (0 = none).
        device: ``"auto"`` picks CUDA when present.
        amp: mixed precision: None (float32), ``"bf16"``, ``"fp16"`` (with gradient scaling
            on CUDA) or ``"auto"`` (bf16/fp16 on CUDA, float32 on CPU).
        val: optional held-out data, checked after every epoch. With the same class
            names as ``dataset`` (held-out images): head loss/accuracy. With other
            classes (a validation split): 5-way ``val_shots``-shot 15-query nearest-centroid
            (cosine) accuracy on ``val_episodes`` fixed episodes, with its 95% confidence
            interval, the usual way to compare pretrained backbones (Meta-Baseline). Each
            check embeds every image once.
        augment: on-device augmentation ``f(x, generator)``, e.g. :class:`metafew.data.FlipCrop`.
        seed: seeds the head/backbone initialisation, the batch order and the augmentation.
        out: when given, the backbone is saved there with :func:`metafew.checkpoint.save_backbone`
            (dataset name, class names, normalisation and the training settings in the record),
            and the run can be interrupted and resumed (``OUT.resume.safetensors``, see the
            module docstring).
        keep: ``"last"`` (the weights after the last epoch) or ``"best"`` (the epoch with the
            best validation figure: few-shot accuracy on other classes, else head accuracy;
            needs ``val``). Validation classes pick the checkpoint; test classes are never seen.
        progress: show a tqdm bar. log: a callable receiving one dict per epoch, or a path to a
            JSON-lines file (started afresh; a resumed run's rows up to its checkpoint kept).
        overwrite: replace ``out`` (and the ``log`` file, and an interrupted run's checkpoint)
            when they are earlier metafew files; without it an existing file is refused, and a
            file metafew did not write always is.
        resume: continue the interrupted run of ``out`` from ``OUT.resume.safetensors`` (its
            recipe must be this one; a start afresh when there is none), giving the weights an
            uninterrupted run gives, bit for bit.
        checkpoint_every: also save ``OUT.resume.safetensors`` every N steps (default: at the
            end of each epoch and on Ctrl-C only).
        tensorboard: also write each epoch's log row as TensorBoard scalars: ``True`` (into
            ``OUT.tensorboard/``) or a folder (needs the ``tensorboard`` extra: ``pip install -e ".[tensorboard]"``).

    Under ``torchrun`` (or in any initialised process group) the work is split with
    ``DistributedDataParallel`` over the ranks (see the module docstring); ``batch_size``
    is the global batch and must be at least the number of processes; rank 0 writes.

    A loss or weight that becomes NaN or infinite stops the run with
    :class:`~metafew.errors.TrainingDiverged` naming the epoch and step; nothing is saved.
    Ctrl-C finishes the step, saves the checkpoint (with ``out``) and raises
    ``KeyboardInterrupt`` saying how to resume; a second Ctrl-C stops at once.

    >>> import metafew
    >>> data = metafew.load_dataset("breastmnist", "train")   # 546 images, 2 classes
    >>> backbone = metafew.pretrain("conv4", data, epochs=1, device="cpu", progress=False)
    >>> backbone.out_features, backbone.training
    (64, False)
    """
    if keep not in ("last", "best"):
        raise ConfigError(f"keep must be 'last' or 'best', got {keep!r}")
    if keep == "best" and val is None:
        raise ConfigError("keep='best' needs validation data (val=...) to choose the best epoch")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    ranks, main = distributed.world(), distributed.is_main()
    if batch_size < ranks:
        raise ConfigError(f"batch_size {batch_size} is smaller than the {ranks} processes: each needs images")
    if len(dataset) < 2:
        raise ConfigError(f"{dataset.name}: pretraining needs at least 2 images, got {len(dataset)}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if out is None and (resume or checkpoint_every is not None):
        raise ConfigError("resume and checkpoint_every need out= (the checkpoint is saved beside the backbone)")
    tb_dir = tensorboard_folder(
        tensorboard, None if out is None else checkpoint_path(out).with_suffix(TENSORBOARD_SUFFIX), "out="
    )
    if tb_dir is not None:
        require_tensorboard()
    files: PretrainOutputs | None = None
    if out is not None:
        files = check_outputs(out, log, overwrite=overwrite, resume=resume)
        log_path = files.log
    else:
        log_path = None if log is None or callable(log) else guard_output(log, "pretrain-log", overwrite=overwrite)
    distributed.barrier("checking the output files")  # every rank has looked before rank 0 writes
    if not main:
        log_path, log = None, None  # rank 0 logs
    dev = distributed.device_for(resolve_device(device))
    amp_dtype = resolve_amp(amp, dev)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(backbone, str):
            backbone = create(
                backbone, in_channels=dataset.channels, image_size=dataset.image_size, **(backbone_options or {})
            )
        elif backbone_options:
            raise ConfigError("backbone_options only apply when backbone is a registry name")
        channels = getattr(backbone, "in_channels", dataset.channels)
        if channels != dataset.channels:
            raise ConfigError(f"the backbone takes {channels}-channel images but {dataset.name} has {dataset.channels}")
        size = tuple(getattr(backbone, "image_size", dataset.image_size))
        if size != tuple(dataset.image_size):
            raise ConfigError(
                f"the backbone was built for {size[0]}x{size[1]} images but {dataset.name} is "
                f"{dataset.image_size[0]}x{dataset.image_size[1]}"
            )
        if out is not None and getattr(backbone, "name", None) is None:
            raise ConfigError("out= needs a backbone made by metafew.backbones.create (or a registry name) to save it")
        backbone = backbone.to(dev)
        out_features = getattr(backbone, "out_features", None)
        if out_features is None:
            with torch.no_grad(), eval_mode(backbone):
                out_features = int(backbone(torch.zeros(1, dataset.channels, *dataset.image_size, device=dev)).shape[1])
        head = nn.Linear(out_features, dataset.num_classes).to(dev)

    data = _DeviceBatches(dataset, dev)
    n = len(data)
    bs = min(batch_size, n)
    steps = n // bs  # drop the last partial batch: a batch of 1 breaks BatchNorm
    total_steps = epochs * steps

    model = _Classifier(backbone, head)
    net: nn.Module = model
    if ranks > 1:  # gradients averaged over ranks as they are computed
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    lo, hi = distributed.shard(bs)
    share = (hi - lo) * ranks / bs  # DDP divides by the ranks: weighted, the mean over the whole batch
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16 and dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed)

    val_data: _DeviceBatches | None = None
    probe: _FewShotProbe | None = None
    if val is not None:
        if list(val.classes) == list(dataset.classes):
            val_data = _DeviceBatches(val, dev)
        else:
            probe = _FewShotProbe(val, dev, val_shots, val_episodes, seed)

    settings = {
        "epochs": epochs,
        "batch_size": bs,
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "label_smoothing": label_smoothing,
        "amp": str(amp_dtype) if amp_dtype else None,
        "augment": repr(augment) if augment is not None else None,
        "seed": seed,
        "keep": keep,
    }
    # what the checkpoint must match to be resumed: the settings, the architecture and the data
    recipe = {
        **settings,
        "augment": None if augment is None else re.sub(r" at 0x[0-9a-fA-F]+", "", repr(augment)),  # not its address
        "backbone": getattr(backbone, "name", type(backbone).__name__),
        "backbone_options": getattr(backbone, "options", None) or {},
        "image_format": [dataset.channels, *dataset.image_size],
        "dataset": dataset.name,
        "images": n,
        "classes": dataset.num_classes,
        "val": None if val is None else [val.name, len(val)],
        "val_shots": val_shots if probe is not None else None,
        "val_episodes": val_episodes if probe is not None else None,
    }

    # -- where the run starts: afresh, or at the checkpoint ---------------------------------
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start_epoch, start_step, epoch_seconds = 1, 0, 0.0
    perm: torch.Tensor | None = None
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss
    streams: list[dict[str, Any]] | None = None  # each rank's own RNG states, saved with several processes
    if files is not None and files.resuming:
        state, record = _load_checkpoint(files.state, recipe, model)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        perm = state["perm"].to(dev) if state.get("perm") is not None else None
        if main:  # the saved sums are all ranks' together: rank 0 carries them
            loss_sum, correct = state["loss_sum"].to(dev), state["correct"].to(dev)
        bad_step = state["bad_step"].to(dev)
        if state.get("best") is not None:
            b = state["best"]
            best = (float(b["score"]), int(b["epoch"]), {k: v.to(dev) for k, v in b["weights"].items()})
        streams = state.get("ranks")
        history = list(record["history"])
        start_epoch, start_step, epoch_seconds = int(record["epoch"]), int(record["step"]), float(record["seconds"])
    elif files is not None and main:  # a fresh run: nothing of an earlier one is left to be taken for this one's
        for old in (files.state, files.backbone):
            with writing(old):
                old.unlink(missing_ok=True)
        if tb_dir == files.backbone.with_suffix(TENSORBOARD_SUFFIX):
            clear_events(tb_dir)
    done = (start_epoch - 1) * steps + start_step
    # one process: augmentation shares the batch-order generator (as always); several: each rank
    # augments from its own, so the permutation every rank draws stays the same
    aug_gen = gen if ranks == 1 else torch.Generator().manual_seed(rank_seed(seed, distributed.rank() + 1, done))
    if ranks > 1 and streams is not None and len(streams) == ranks:  # as many processes: each goes on exactly
        mine = streams[distributed.rank()]
        aug_gen.set_state(mine["augment"])
        torch.set_rng_state(mine["torch"])
        if mine.get("cuda") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], dev)
    elif ranks > 1 and not main and done:  # another number of processes: a fresh stream of its own (dropout...)
        torch.manual_seed(rank_seed(seed, distributed.rank(), done))

    from ..progress import tqdm

    bar = tqdm(
        total=total_steps,
        initial=done,
        desc=f"pretrain {getattr(backbone, 'name', type(backbone).__name__)}",
        disable=not (progress and main),
        unit="step",
    )
    emit = _logger(log, log_path, history)
    stop_flag = distributed.LaggedFlag()  # Ctrl-C on any rank, agreed on one step later

    def save_checkpoint(epoch: int, step: int, t0: float) -> None:
        """The whole state at ``step`` steps into ``epoch`` (rank 0 writes; every rank calls it)."""
        nonlocal loss_sum, correct
        if files is None:
            return
        if ranks > 1:  # one total, carried by rank 0: the checkpoint holds no per-rank state
            sums = distributed.all_reduce_(torch.stack([loss_sum, correct.float()]), "summing the epoch's loss")
            loss_sum, correct = sums[0].clone(), sums[1].round().long()
            if not main:
                loss_sum, correct = torch.zeros_like(loss_sum), torch.zeros_like(correct)
            total = float(sums[0])
        else:
            total = float(loss_sum)
        first_bad = _first_bad_step(bad_step)
        own = None
        if ranks > 1:  # each rank's augmentation and global RNG states, to go on exactly with as many ranks
            cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            own = distributed.gather_objects(
                {"augment": aug_gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}
            )
        # the same answer on every rank; non-finite weights are never saved
        _check_finite(total, first_bad, backbone, epoch, (epoch - 1) * steps + step, lr, out)
        if main:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "generator": gen.get_state(),
                "rng": rng_state(),
                "perm": perm.cpu() if perm is not None and 0 < step < steps else None,
                "loss_sum": loss_sum,
                "correct": correct,
                "bad_step": torch.tensor(first_bad),
                "best": None if best is None else {"score": best[0], "epoch": best[1], "weights": best[2]},
                "ranks": own,
            }
            at_end = step == steps
            position = {"epoch": epoch + 1 if at_end else epoch, "step": 0 if at_end else step}
            seconds = 0.0 if at_end else time.perf_counter() - t0
            record = {"format": _STATE_FORMAT, "recipe": recipe, **position, "seconds": seconds, "history": history}
            save_state(state, files.state, record)
        distributed.barrier("waiting for rank 0 to save the checkpoint")

    def stopping() -> bool:
        """Whether a Ctrl-C asks to stop now: this process's flag, or all ranks' one step late."""
        if ranks == 1:
            return interrupted()
        flag = distributed.constant((float(interrupted()),), dev).clone()
        distributed.all_reduce_(flag, "agreeing on when to stop")
        stopped = stop_flag.pop()
        stop_flag.push(flag)
        return stopped

    def stop(epoch: int, step: int) -> KeyboardInterrupt:
        """The interruption after ``step`` steps of ``epoch``, saying where the run is and how to go on."""
        bar.close()
        where = (epoch - 1) * steps + step
        at = f"after epoch {epoch}" if step == steps else f"in epoch {epoch}"
        saved = (
            f"; checkpoint saved in {files.state}; run the same command with --resume (resume=True) to continue"
            if files is not None
            else "; nothing was saved (no out=)"
        )
        return KeyboardInterrupt(f"interrupted at step {where} of {total_steps} ({at}){saved}")

    backbone.train()
    head.train()
    with (
        deferred_sigint() as interrupted,
        tensorboard_log(tb_dir, step_key="epoch", purge_step=len(history) + 1, steps_per_row=steps) as tb,
    ):
        try:
            for epoch in range(start_epoch, epochs + 1):
                first = start_step if epoch == start_epoch else 0
                t0 = time.perf_counter() - (epoch_seconds if epoch == start_epoch else 0.0)
                if first == 0 or perm is None:
                    first = 0
                    loss_sum = torch.zeros((), device=dev)
                    correct = torch.zeros((), device=dev, dtype=torch.long)
                    perm = torch.randperm(n, generator=gen).to(dev, non_blocking=True)
                for step in range(first, steps):
                    idx = perm[step * bs : (step + 1) * bs]
                    if ranks > 1:
                        idx = idx[lo:hi]  # this rank's part of the global batch
                    x, y = data.get(idx)
                    if augment is not None:
                        x = augment(x, aug_gen)
                    with autocast(dev, amp_dtype):
                        logits = net(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    if ranks > 1:
                        with distributed.collective("the backward pass"):
                            scaler.scale(loss * share).backward()
                    else:
                        scaler.scale(loss).backward()
                    try:
                        scaler.step(opt)
                    except RuntimeError as e:  # an update too large for float32
                        if "overflow" not in str(e):
                            raise
                        raise TrainingDiverged(
                            f"pretraining diverged: an update overflowed at step {(epoch - 1) * steps + step + 1} "
                            f"(epoch {epoch}); the learning rate ({lr:g}) is probably too high (lower --lr)"
                        ) from None
                    scaler.update()
                    sched.step()
                    loss_sum += loss.detach() * len(y)
                    done = (epoch - 1) * steps + step + 1
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), done, bad_step)
                    correct += (logits.detach().argmax(1) == y).sum()
                    bar.update(1)
                    if step + 1 == steps:
                        break  # the epoch's end checkpoints (and stops) below
                    halt = stopping()
                    if halt or (checkpoint_every is not None and done % checkpoint_every == 0):
                        save_checkpoint(epoch, step + 1, t0)
                    if halt:
                        raise stop(epoch, step + 1)
                seen = steps * bs
                totals = distributed.all_reduce_(torch.stack([loss_sum, correct.float()]), "summing the epoch's loss")
                total_loss, total_correct = totals.tolist()  # the one sync per epoch
                _check_finite(total_loss, _first_bad_step(bad_step), backbone, epoch, epoch * steps, lr, out)
                entry: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": total_loss / seen,
                    "acc": total_correct / seen,
                    "lr": opt.param_groups[0]["lr"],
                }
                if val_data is not None:
                    entry.update(_evaluate_same_classes(backbone, head, val_data, max(bs, 256), amp_dtype))
                if probe is not None:
                    entry.update(probe(backbone, amp_dtype))
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                score = entry.get("val_fewshot_acc", entry.get("val_acc"))
                if keep == "best" and score is not None and (best is None or score > best[0]):
                    best = (score, epoch, {k: v.detach().clone() for k, v in backbone.state_dict().items()})
                history.append(entry)
                bar.set_postfix(
                    {k: round(v, 4) for k, v in entry.items() if k in ("loss", "acc", "val_acc", "val_fewshot_acc")}
                )
                emit(entry)
                if tb is not None:
                    tb.write(entry)
                perm = None
                save_checkpoint(epoch, steps, t0)
                halt = interrupted() if ranks == 1 else distributed.any_flag([interrupted()])
                stop_flag = distributed.LaggedFlag()  # the epoch's flags are all read
                if halt and epoch < epochs:
                    raise stop(epoch, steps)
        finally:
            bar.close()

    chosen = history[-1]
    if best is not None:
        backbone.load_state_dict(best[2])
        chosen = history[best[1] - 1]
    backbone.eval()
    backbone.pretrain_history = history  # type: ignore[assignment]
    if files is not None and main:
        from ..checkpoint import save_backbone

        save_backbone(
            backbone,
            files.backbone,
            mean=dataset.mean,
            std=dataset.std,
            dataset=dataset.name,
            classes=dataset.classes,
            extra={"pretrain": settings, "final": history[-1], "chosen": chosen},
        )
        with writing(files.state):  # the run is complete: nothing left to resume
            files.state.unlink(missing_ok=True)
    distributed.barrier("waiting for rank 0 to save the backbone")  # the file exists on return, on every rank
    return backbone


class _Classifier(nn.Module):
    """Backbone and linear head as one module (what DistributedDataParallel wraps)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
