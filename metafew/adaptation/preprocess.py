"""Matching images to a backbone: channels, size and normalisation, on the device.

A backbone only works on the kind of input it was trained on. :class:`Preprocessing`
turns uint8 images of any size and 1 or 3 channels into what the backbone expects:

* channels: grayscale -> RGB by repeating the channel; RGB -> grayscale by ITU-R 601
  luminance (``0.299 R + 0.587 G + 0.114 B``, the formula of PIL's ``convert("L")``);
  an alpha channel is dropped.
* size: bilinear resize with antialiasing (so downscaling a large X-ray does not alias)
  to the backbone's ``image_size``, on the device, skipped when the size already matches.
* values: ``[0, 255] -> [0, 1]``, then ``(x - mean) / std`` with the backbone's statistics.

The same object is saved with an adapted model, so predictions are preprocessed
exactly as the images the model was adapted on. Files are decoded by
:mod:`metafew.data.decode` and normalised by :class:`metafew.data.normalize.Normalize`,
the same code the datasets use.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import FewShotDataset
from ..data.decode import DECODE_ERRORS, convert_image, decode_error_reason, load_image
from ..data.decode import is_image_file as _is_image_name
from ..data.normalize import Normalize
from ..errors import DatasetError

__all__ = [
    "Preprocessing",
    "convert_channels",
    "decode_image",
    "is_image_file",
    "list_images",
    "read_inputs",
    "stack_for",
]

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects: ``channels``, ``image_size`` ``(H, W)`` and per-channel ``mean``/``std``."""

    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DatasetError(f"backbones on {self.channels}-channel images are not supported (1 or 3 channels)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DatasetError(
                f"{len(self.mean)} mean / {len(self.std)} std values for a {self.channels}-channel backbone"
            )

    @property
    def normalize(self) -> Normalize:
        """The backbone's normalisation, as the datasets apply it."""
        return Normalize(self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (saved with an adapted model); :meth:`from_dict` reads it back."""
        return {
            "channels": self.channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`."""
        return cls(
            int(d["channels"]),
            (int(d["image_size"][0]), int(d["image_size"][1])),
            tuple(float(m) for m in d["mean"]),
            tuple(float(s) for s in d["std"]),
        )

    def __call__(self, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Normalised float ``[M, channels, H, W]`` from uint8 (0..255) or float (0..1) images ``[M, C, h, w]``."""
        x = images.to(device) if device is not None else images
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise DatasetError(f"expected images [M, C, H, W], got shape {tuple(images.shape)}")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = convert_channels(x, self.channels)
        if tuple(x.shape[-2:]) != self.image_size and x.shape[0]:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0, 1)
        return self.normalize(x)  # x is float in [0, 1] here


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``[M, C, H, W]`` with C in 1..4 to ``channels`` (1 or 3): repeat gray, luminance of RGB, drop alpha."""
    c = x.shape[1]
    if c == channels:
        return x
    if c in (2, 4):  # gray+alpha, RGB+alpha
        x, c = x[:, : c - 1], c - 1
        if c == channels:
            return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DatasetError(f"cannot convert {x.shape[1]}-channel images to the backbone's {channels} channels")


# -- reading image files for prediction --------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (:data:`metafew.data.decode.IMAGE_EXTENSIONS`)."""
    return _is_image_name(path)


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, hidden files skipped, sorted."""
    images: list[Path] = []
    others: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            (images if is_image_file(p) else others).append(p)
    return images, others


def decode_image(source: Any, prep: Preprocessing) -> torch.Tensor:
    """uint8 ``[channels, H, W]`` at the backbone's size, from an image file path or a PIL image.

    Decoded exactly as :func:`metafew.data.ImageFolder` decodes an adaptation folder
    (mode conversion, alpha onto white, 16-bit scaled to 8, cover-resize bicubic and
    center-crop), so a file is seen the same way at adaptation and at prediction.
    Raises DatasetError naming the file when it cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    try:
        if isinstance(source, Image.Image):
            arr = convert_image(source, prep.image_size, prep.channels)
        else:
            arr = load_image(source, prep.image_size, prep.channels)
    except FileNotFoundError as e:
        raise DatasetError(f"{name}: no such file") from e
    except UnidentifiedImageError as e:
        raise DatasetError(f"{name}: not an image file (or an unsupported format)") from e
    except DECODE_ERRORS as e:
        raise DatasetError(f"{name}: cannot decode this image ({decode_error_reason(e)})") from e
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))


def read_inputs(
    images: Any, prep: Preprocessing, *, skip_bad: bool = False
) -> tuple[list[str | None], list[torch.Tensor], list[str]]:
    """Decode what :meth:`AdaptedModel.predict` accepts into uint8 ``[C, H, W]`` images.

    ``images``: a folder (every image in it, recursively), a file path, a PIL image, a
    uint8 or float tensor ``[C, H, W]``/``[M, C, H, W]``, a numpy array, or a list of
    these. Returns (source names, images, skipped-file messages); an unreadable file
    raises DatasetError naming it unless ``skip_bad``.
    """
    sources: list[str | None] = []
    out: list[torch.Tensor] = []
    skipped: list[str] = []

    def add_path(p: Path) -> None:
        try:
            out.append(decode_image(p, prep))
            sources.append(str(p))
        except DatasetError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            warnings.warn(f"{e}; left out", stacklevel=4)

    def visit(item: Any) -> None:
        from PIL import Image

        if isinstance(item, (str, os.PathLike)):
            p = Path(item).expanduser()
            if p.is_dir():
                files, others = list_images(p)
                if not files:
                    raise DatasetError(f"{p}: no image files in this folder")
                if others:
                    names = ", ".join(o.name for o in others[:3]) + (" ..." if len(others) > 3 else "")
                    warnings.warn(f"{p}: ignoring {len(others)} non-image file(s) ({names})", stacklevel=4)
                for f in files:
                    add_path(f)
            elif p.exists():
                add_path(p)
            else:
                raise DatasetError(f"{p}: no such file or folder")
        elif isinstance(item, FewShotDataset):
            for x in item.images:
                out.append(x)
                sources.append(None)
        elif isinstance(item, Image.Image):
            out.append(decode_image(item, prep))
            sources.append(None)
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(item)
            batch = t.unsqueeze(0) if t.ndim == 3 else t
            if batch.ndim != 4:
                raise DatasetError(f"image tensors must be [C, H, W] or [M, C, H, W], got shape {tuple(t.shape)}")
            for x in batch:
                out.append(x)
                sources.append(None)
        elif isinstance(item, Iterable):
            for sub in item:
                visit(sub)
        else:
            raise DatasetError(f"cannot read an image from a {type(item).__name__}")

    visit(images)
    return sources, out, skipped


def stack_for(images: Sequence[torch.Tensor], prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """Preprocess images of possibly different sizes, one size group at a time, into ``[M, C, H, W]``."""
    if not images:
        return torch.empty(0, prep.channels, *prep.image_size, device=device)
    out = torch.empty(len(images), prep.channels, *prep.image_size, device=device)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):  # different sizes cannot be stacked before resizing
        groups.setdefault((tuple(img.shape), img.dtype), []).append(i)
    for idx in groups.values():
        out[idx] = prep(torch.stack([images[i] for i in idx]), device)
    return out
