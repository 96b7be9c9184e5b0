"""``metafew.adapt``: from a pretrained backbone and a few labelled images per class to a model.

The steps, each one documented where it is done:

1. the backbone (a checkpoint, or a module with its mean/std) fixes the preprocessing:
   channels, image size and normalisation (:mod:`.preprocess`);
2. the labelled images (a ``root/<class>/<image>`` folder, a MedMNIST name or a
   :class:`~metafew.data.FewShotDataset`) are decoded to that size and channel count;
3. the honest estimate: ``eval_draws`` seeded support draws, each scored on the
   images not in its support (:mod:`.estimate`);
4. the final model: the learner adapted to one more seeded draw of ``shots`` images
   per class (or every image with ``shots="all"``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.base import FewShotDataset
from ..device import resolve_device
from ..backbones.registry import describe
from ..errors import ConfigError, DatasetError, DatasetNotFoundError
from .estimate import AdaptationReport, BNStats, Shots, adapt_on, draw_support, estimate, support_sizes
from .model import AdaptedModel
from .predictor import QueryBN, derive_seed
from .preprocess import Preprocessing

METHODS = ("protonet", "maml", "finetune")

#: Learner options used unless given. MAML: a backbone checkpoint carries no meta-learned
#: head, so the head starts from the support prototypes (Proto-MAML, Triantafillou et al.
#: 2020) instead of zero. The step sizes were chosen on PneumoniaMNIST's *validation*
#: split (see benchmarks/medical.py), never on a test split.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "protonet": {},
    "maml": {"head_init": "prototypes", "test_inner_lr": 0.01, "test_inner_steps": 10},
    "finetune": {},
}


# -- the backbone ----------------------------------------------------------------------


def resolve_backbone(
    backbone: str | os.PathLike[str] | nn.Module,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device,
) -> tuple[nn.Module, Preprocessing, dict[str, Any]]:
    """(module on ``device`` in eval mode, its preprocessing, a JSON description to save)."""
    if isinstance(backbone, (str, os.PathLike)):
        from ..checkpoint import load_backbone

        module, rec = load_backbone(backbone, device=device)
        prep = Preprocessing(rec.in_channels, tuple(rec.image_size), tuple(rec.mean), tuple(rec.std))  # type: ignore[arg-type]
        info = {
            "arch": rec.arch,
            "options": rec.options,
            "checkpoint": str(Path(backbone).expanduser()),
            "pretrained_on": rec.dataset,
            "pretrained_classes": len(rec.classes) if rec.classes else None,
        }
        if mean is not None or std is not None:
            prep = Preprocessing(prep.channels, prep.image_size, _floats(mean, prep.mean), _floats(std, prep.std))
        return module, prep, info
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"backbone must be a checkpoint path or an nn.Module, got {type(backbone).__name__}")
    arch, channels, size = describe(backbone, "adapt")
    if mean is None or std is None:
        raise ConfigError(
            "a backbone module needs mean= and std=: the normalisation it was trained with "
            "(a checkpoint records them)"
        )
    module = copy.deepcopy(backbone).to(device).eval()  # the caller's module is left where it is
    prep = Preprocessing(channels, size, _floats(mean, ()), _floats(std, ()))
    info = {"arch": arch, "options": dict(getattr(backbone, "options", None) or {}), "checkpoint": None, "pretrained_on": None}
    return module, prep, info


def _floats(values: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in (values if values is not None else default))


# -- the data --------------------------------------------------------------------------


def resolve_data(
    data: FewShotDataset | str | os.PathLike[str],
    prep: Preprocessing,
    *,
    skip_bad: bool = False,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
) -> FewShotDataset:
    """A labelled dataset from a FewShotDataset, an image folder, or a dataset name.

    A folder is decoded by :func:`metafew.data.ImageFolder` directly at the backbone's
    channels and image size (cover-resize and center-crop, so large images never sit
    in memory at full size). A name is a MedMNIST dataset (``"pneumoniamnist"``, or
    ``"pneumoniamnist:test"`` for another split than ``split``).
    """
    if isinstance(data, FewShotDataset):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise DatasetError(f"data must be a folder, a dataset name or a FewShotDataset, got {type(data).__name__}")
    path = Path(data).expanduser()
    if path.exists():
        from ..data.image_folder import ImageFolder

        return ImageFolder(path, image_size=prep.image_size, channels=prep.channels, on_error="skip" if skip_bad else "raise")
    from ..data.medmnist import MEDMNIST_INFO, MedMNIST

    name, _, sub = str(data).partition(":")
    if name.lower() in MEDMNIST_INFO:
        return MedMNIST(name.lower(), sub or split, root=root)
    looks_like_path = os.sep in str(data) or str(data).startswith((".", "~"))
    if looks_like_path:
        raise DatasetNotFoundError(f"image folder not found: {path}")
    raise DatasetNotFoundError(
        f"{data!r} is neither an existing folder nor a MedMNIST dataset name "
        f"({', '.join(sorted(n for n in MEDMNIST_INFO if n != 'chestmnist'))})"
    )


# -- adapt -----------------------------------------------------------------------------


def adapt(
    data: FewShotDataset | str | os.PathLike[str],
    backbone: str | os.PathLike[str] | nn.Module,
    *,
    method: str = "protonet",
    shots: Shots = 5,
    eval_draws: int = 20,
    seed: int = 0,
    device: str | torch.device = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    skip_bad: bool = False,
    query_bn: QueryBN = "support",
    bn_stats: BNStats = "support",
    max_eval: int | None = 2000,
    batch_size: int = 256,
    data_root: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    calibrate: bool = True,
    **options: Any,
) -> AdaptedModel:
    """Adapt a pretrained backbone to a few labelled images per class, with an honest estimate.

    Args:
        data: a ``root/<class>/<image>`` folder, a MedMNIST name (its train split is the
            labelled pool: ``"pneumoniamnist"``), or a FewShotDataset.
        backbone: a backbone checkpoint (:func:`metafew.checkpoint.save_backbone`), or a
            module from :func:`metafew.backbones.create` with ``mean``/``std``.
        method: ``"protonet"`` (class-mean prototypes), ``"maml"`` (a few SGD steps of the
            whole network from Proto-MAML's head) or ``"finetune"`` (a new linear head).
        shots: support images per class for the final model (a class with fewer uses all of
            them, with a warning), or ``"all"``: every image.
        eval_draws: support draws of the estimate (0: no estimate). 20 by default, which
            takes seconds on a CPU; use 100 for a report (the CI shrinks as 1/sqrt(draws)).
        seed: seeds the support draws and the adaptation; same seed, same model and estimate.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...
        skip_bad: leave unreadable files in the folder out (with a warning) instead of raising.
        query_bn: for MAML (transductive BatchNorm), normalise predictions with the
            support set's statistics (``"support"``: every image predicted on its own) or
            with each prediction batch's (``"batch"``: MAML's original test-time behaviour).
        bn_stats: ``"support"`` (default): ProtoNet and fine-tuning re-estimate the backbone's
            BatchNorm statistics on the support images before adapting (AdaBN: a backbone
            pretrained on other kinds of images then fits the new ones much better; MAML
            does this by design); ``"backbone"``: keep the pretraining statistics.
        max_eval: score at most this many held-out images per draw (large pools only).
        batch_size: images per forward pass.
        data_root: where dataset names are looked up (default ``$METAFEW_DATA``).
        progress: ``progress(done, total)`` after each estimate draw.
        calibrate: divide the final model's logits by a temperature fitted to the held-out
            predictions of the estimate draws, so that its probabilities are calibrated
            (classes and accuracy are unchanged). Needs ``eval_draws > 0``.
        **options: learner options, e.g. ``steps=200`` for finetune, ``test_inner_lr=0.05``.

    Returns:
        An :class:`AdaptedModel`; ``model.report`` holds the estimate.
    """
    method = method.lower()
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(eval_draws, int) or eval_draws < 0:
        raise ConfigError(f"eval_draws must be a non-negative integer, got {eval_draws!r}")
    if bn_stats not in ("support", "backbone"):
        raise ConfigError(f"bn_stats must be 'support' or 'backbone', got {bn_stats!r}")
    if query_bn not in ("support", "batch"):
        raise ConfigError(f"query_bn must be 'support' or 'batch', got {query_bn!r}")
    dev = resolve_device(device)
    module, prep, backbone_info = resolve_backbone(backbone, mean=mean, std=std, device=dev)
    ds = resolve_data(data, prep, skip_bad=skip_bad, root=data_root)
    if len(ds) == 0:
        raise DatasetError(f"{ds.name}: no images")
    if ds.channels not in (1, 2, 3, 4) and ds.channels != prep.channels:
        raise DatasetError(f"{ds.name}: cannot convert {ds.channels}-channel images to the backbone's {prep.channels}")
    support_sizes(ds.class_counts().tolist(), shots, ds.classes)  # validates shots before any work

    from ..learners import create as create_learner

    opts = {**DEFAULT_OPTIONS[method], **options}
    learner = create_learner(method, module, **opts).to(dev).eval()
    images, labels = ds.images, ds.labels
    report = estimate(
        learner, images, labels, ds.classes, prep,
        method=method, shots=shots, draws=eval_draws, seed=seed, device=dev, query_bn=query_bn,
        max_eval=max_eval, batch_size=batch_size, progress=progress, calibrate=calibrate, bn_stats=bn_stats,
    )  # fmt: skip

    _, final_k, _ = support_sizes(ds.class_counts().tolist(), shots, ds.classes)
    gen = torch.Generator().manual_seed(derive_seed(seed, "final"))
    support, _ = draw_support(labels, final_k, gen)
    predictor = adapt_on(learner, images, labels, support, prep, dev, derive_seed(seed, "adapt-final"), query_bn, bn_stats)
    if calibrate and report.temperature is not None:
        predictor.temperature = report.temperature
    folder = Path(data).expanduser().resolve() if isinstance(data, (str, os.PathLike)) and Path(data).expanduser().is_dir() else None
    support_record = {
        "data": ds.name,
        "folder": str(folder) if folder else None,
        "indices": sorted(support.tolist()),
        "per_class": {c: int(k) for c, k in zip(ds.classes, final_k)},
        "seed": seed,
        "bn_stats": bn_stats,
    }
    return AdaptedModel(
        learner,
        predictor,
        classes=ds.classes,
        preprocessing=prep,
        method=method,
        options=opts,
        backbone_info=backbone_info,
        report=report,
        support=support_record,
        device=dev,
    )


__all__ = ["adapt", "resolve_data", "resolve_backbone", "AdaptationReport", "METHODS", "DEFAULT_OPTIONS"]
