"""Supervised pretraining of a backbone on the base classes.

The "pretrain, then adapt" recipe (Chen et al. 2019 Baseline++, Tian et al. 2020
RFS, Chen et al. 2021 Meta-Baseline): train the backbone with a linear head by
plain cross-entropy over all base-class images, drop the head, and reuse the
backbone for ProtoNet/fine-tuning/MAML on novel classes.

The data loop never leaves the device: the dataset's uint8 images are moved to the
device once, each epoch draws a permutation from a seeded CPU generator, and each
batch is gathered by indexing, normalised and (optionally) augmented on the device.
Loss and accuracy are accumulated on the device and read once per epoch.

Under ``torchrun`` (:mod:`metafew.distributed`) the backbone and head train as one
``torch.nn.parallel.DistributedDataParallel`` module: every rank draws the same seeded
permutation of each epoch (the split DistributedSampler makes, without its padding) and
takes its contiguous part of each global batch of ``batch_size`` images; each rank's
loss is weighted by its share, so the averaged gradient is that of the whole batch.
BatchNorm normalises with each rank's own part of the batch (plain DDP; the running
statistics are rank 0's, which DDP broadcasts at every forward). Augmentation draws from
a per-rank generator (seeded from ``seed`` and the rank), so the batch order stays shared.
Validation is sharded over the ranks and summed; rank 0 alone writes the log and the
backbone file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..backbones import create
from ..data.base import FewShotDataset
from ..device import autocast, eval_mode, resolve_amp, resolve_device
from ..errors import ConfigError, TrainingDiverged
from ..outputs import guard_output, writing

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
LogFn = Callable[[dict[str, Any]], None]


def _log_path(log: LogFn | str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    """Check a log file before the work starts: free, or a metafew pretraining log that may be replaced."""
    if log is None or callable(log):
        return None
    return guard_output(log, "pretrain-log", overwrite=overwrite)


def _logger(log: LogFn | str | os.PathLike[str] | None, path: Path | None = None) -> LogFn:
    """``log`` as a callable: a function, a JSON-lines file (started afresh, strict JSON), or nothing."""
    if log is None:
        return lambda entry: None
    if callable(log):
        return log
    path = path or Path(log).expanduser()
    with writing(path):
        path.write_text("", encoding="utf-8")  # this run's log: never appended to another run's

    def write(entry: dict[str, Any]) -> None:
        with writing(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")

    return write


def _check_finite(
    total_loss: float, bad_step: torch.Tensor, backbone: nn.Module, epoch: int, steps: int, lr: float, out: Any
) -> None:
    """Stop with TrainingDiverged when the epoch's loss or a weight is not finite."""
    what = None
    step = epoch * steps
    if not math.isfinite(total_loss):
        what, step = "the loss", int(bad_step.item())
    else:
        params = [p.detach() for p in backbone.parameters() if p.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            what = "a weight"
    if what is not None:
        saved = "; nothing was saved" if out is not None else ""
        raise TrainingDiverged(
            f"pretraining diverged: {what} became NaN or infinite at step {step} (epoch {epoch}); the learning "
            f"rate ({lr:g}) is probably too high (lower --lr){saved}"
        )


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
        correct = torch.zeros((), device=feats.device)
        for chunk in self.index.split(64):  # bounded memory: [64, N, K+Q, D] at a time
            f = feats[chunk]
            protos = F.normalize(f[:, :, : self.k].mean(2), dim=2)  # [E, N, D]
            queries = f[:, :, self.k :].flatten(1, 2)  # [E, N*Q, D]
            correct += ((queries @ protos.transpose(1, 2)).argmax(2) == truth).sum()
        return {"val_fewshot_acc": correct.item() / (self.index.shape[0] * len(truth))}


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
            (cosine) accuracy on ``val_episodes`` fixed episodes, the usual way to compare
            pretrained backbones (Meta-Baseline). Each check embeds every image once.
        augment: on-device augmentation ``f(x, generator)``, e.g. :class:`metafew.data.FlipCrop`.

    Under ``torchrun`` (or in any initialised process group) the work is split with
    ``DistributedDataParallel`` over the ranks (see the module docstring); ``batch_size``
    is the global batch and must be at least the number of processes; rank 0 writes.
        seed: seeds the head/backbone initialisation, the batch order and the augmentation.
        out: when given, the backbone is saved there with :func:`metafew.checkpoint.save_backbone`
            (dataset name, class names, normalisation and the training settings in the record).
        keep: ``"last"`` (the weights after the last epoch) or ``"best"`` (the epoch with the
            best validation figure: few-shot accuracy on other classes, else head accuracy;
            needs ``val``). Validation classes pick the checkpoint; test classes are never seen.
        progress: show a tqdm bar. log: a callable receiving one dict per epoch, or a path to a
            JSON-lines file (started afresh).
        overwrite: replace ``out`` (and the ``log`` file) when they are earlier metafew files;
            without it an existing file is refused, and a file metafew did not write always is.

    A loss or weight that becomes NaN or infinite stops the run with
    :class:`~metafew.errors.TrainingDiverged` naming the epoch and step; nothing is saved.

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
    if out is not None:
        from ..checkpoint import checkpoint_path

        if Path(out).expanduser().is_dir():  # before a suffix is added
            guard_output(out, "backbone", overwrite=overwrite)
        out_exists = checkpoint_path(out).exists()
        guard_output(checkpoint_path(out), "backbone", overwrite=overwrite)
    else:
        out_exists = False
    # an earlier metafew log without its backbone is an interrupted run's: replaced
    log_path = _log_path(log, overwrite or (out is not None and not out_exists))
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

    net: nn.Module = _Classifier(backbone, head)
    if ranks > 1:  # gradients averaged over ranks as they are computed
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    lo, hi = distributed.shard(bs)
    share = (hi - lo) * ranks / bs  # DDP divides by the ranks: weighted, the mean over the whole batch
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16 and dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed)
    # one process: augmentation shares the batch-order generator (as always); several: each rank
    # augments from its own, so the permutation every rank draws stays the same
    aug_gen = gen if ranks == 1 else torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (distributed.rank() + 1))

    val_data: _DeviceBatches | None = None
    probe: _FewShotProbe | None = None
    if val is not None:
        if list(val.classes) == list(dataset.classes):
            val_data = _DeviceBatches(val, dev)
        else:
            probe = _FewShotProbe(val, dev, val_shots, val_episodes, seed)

    from ..progress import tqdm

    bar = tqdm(
        total=total_steps,
        desc=f"pretrain {getattr(backbone, 'name', type(backbone).__name__)}",
        disable=not (progress and main),
        unit="step",
    )
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    emit = _logger(log, log_path)
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss
    backbone.train()
    head.train()
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            perm = torch.randperm(n, generator=gen).to(dev, non_blocking=True)
            for step in range(steps):
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
            seen = steps * bs
            totals = distributed.all_reduce_(torch.stack([loss_sum, correct.float()]), "summing the epoch's loss")
            total_loss, total_correct = totals.tolist()  # the one sync per epoch
            if ranks > 1 and not math.isfinite(total_loss):  # the first bad step of any rank
                never = torch.iinfo(torch.long).max
                first = torch.where(bad_step < 0, torch.full_like(bad_step, never), bad_step).reshape(1).cpu()
                bad_step = distributed.all_reduce_(first, "finding the step that diverged", op="min")[0]
            _check_finite(total_loss, bad_step, backbone, epoch, steps, lr, out)
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
    finally:
        bar.close()

    chosen = history[-1]
    if best is not None:
        backbone.load_state_dict(best[2])
        chosen = history[best[1] - 1]
    backbone.eval()
    backbone.pretrain_history = history  # type: ignore[assignment]
    if out is not None and main:
        from ..checkpoint import save_backbone

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
        save_backbone(
            backbone,
            checkpoint_path(out),
            mean=dataset.mean,
            std=dataset.std,
            dataset=dataset.name,
            classes=dataset.classes,
            extra={"pretrain": settings, "final": history[-1], "chosen": chosen},
        )
    distributed.barrier("waiting for rank 0 to save the backbone")  # the file exists on return, on every rank
    return backbone


class _Classifier(nn.Module):
    """Backbone and linear head as one module (what DistributedDataParallel wraps)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
