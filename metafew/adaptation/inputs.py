"""What the user hands to :func:`metafew.adapt`: a backbone, and labelled images.

:func:`resolve_backbone` turns a checkpoint or a module into the module, its
preprocessing and a description to save; :func:`resolve_data` turns a folder, a
registered dataset name or a FewShotDataset into a labelled dataset.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.registry import describe
from ..checkpoint import load_backbone
from ..config import is_run_checkpoint, run_backbone
from ..data import FewShotDataset, ImageFolder, available_datasets, load_dataset
from ..errors import ConfigError, DatasetError, DatasetNotFoundError
from .preprocess import Preprocessing

# -- the backbone ----------------------------------------------------------------------


def resolve_backbone(
    backbone: str | os.PathLike[str] | nn.Module,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Preprocessing, dict[str, Any]]:
    """(module on ``device`` in eval mode, its preprocessing, a JSON description to save).

    ``backbone`` is a backbone file (``metafew pretrain``, ``metafew export-backbone``, a
    shipped name), a trained run's checkpoint (``best``/``last.safetensors`` of ``metafew
    train`` or ``bench``: its learner's backbone, normalised as its training dataset,
    found under ``data_root``) or a module.
    """
    if isinstance(backbone, (str, os.PathLike)) and is_run_checkpoint(backbone):
        module, run = run_backbone(backbone, device=device, data_root=data_root)
        arch, channels, size = describe(module, "adapt")
        prep = Preprocessing(channels, size, _floats(mean, run["mean"]), _floats(std, run["std"]))
        info = {
            "arch": arch,
            "options": dict(getattr(module, "options", None) or {}),
            "checkpoint": str(Path(backbone).expanduser()),
            "pretrained_on": run["dataset"],
            "pretrained_classes": len(run["classes"]) if run["classes"] else None,
        }
        return module.to(device).eval(), prep, info
    if isinstance(backbone, (str, os.PathLike)):
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
            "a backbone module needs mean= and std=: the normalisation it was trained with (a checkpoint records them)"
        )
    module = copy.deepcopy(backbone).to(device).eval()  # the caller's module is left where it is
    prep = Preprocessing(channels, size, _floats(mean, ()), _floats(std, ()))
    info = {
        "arch": arch,
        "options": dict(getattr(backbone, "options", None) or {}),
        "checkpoint": None,
        "pretrained_on": None,
    }
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
    in memory at full size). A name is any dataset :func:`metafew.data.load_dataset`
    knows (``"pneumoniamnist"``, or ``"pneumoniamnist:test"`` for another subset than ``split``).
    """
    if isinstance(data, FewShotDataset):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise DatasetError(f"data must be a folder, a dataset name or a FewShotDataset, got {type(data).__name__}")
    path = Path(data).expanduser()
    if path.exists():
        return ImageFolder(
            path, image_size=prep.image_size, channels=prep.channels, on_error="skip" if skip_bad else "raise"
        )
    name, _, sub = str(data).partition(":")
    names = [n for n in available_datasets() if ":" not in n]
    if name.lower() in names:
        return load_dataset(name.lower(), sub or split, root=root)
    if os.sep in str(data) or str(data).startswith((".", "~")):
        raise DatasetNotFoundError(f"image folder not found: {path}")
    raise DatasetNotFoundError(f"{data!r} is neither an existing folder nor a dataset name ({', '.join(names)})")


__all__ = ["resolve_backbone", "resolve_data"]
