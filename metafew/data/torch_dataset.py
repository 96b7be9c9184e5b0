"""Any map-style torch ``Dataset`` of ``(image, label)`` as a :class:`FewShotDataset`.

:func:`from_torch_dataset` (also :meth:`FewShotDataset.from_torch`) reads the dataset
once, each item at most once: labels from its ``targets`` attribute when it has one
(torchvision's ``ImageFolder``, ``CIFAR100``, ``MNIST``...), else from its items; every
image (a PIL image, a uint8 or ``[0, 1]`` float tensor ``[C, H, W]``, a numpy array
``[H, W, C]`` or ``[H, W]``) becomes uint8 ``[C, H, W]`` of one size through
:func:`metafew.data.decode.convert_image`, so a user's dataset is decoded the way
metafew decodes files. Given a ``name``, the decoded array is cached on disk: the
next call with that name reads neither the images nor, with ``targets``, the items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError
from ..progress import progress
from .base import FewShotDataset, cache_key, cached_array
from .decode import convert_image, image_channels
from .normalize import channel_stats

_VERSION = "torch-dataset-v1"
_CHANNELS = (1, 3, 4)


def from_torch_dataset(
    dataset: Any,
    *,
    name: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    cache: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    show_progress: bool = True,
) -> FewShotDataset:
    """A :class:`FewShotDataset` of a map-style dataset whose items are ``(image, label)``.

    Args:
        dataset: anything with ``len()`` and integer indexing, e.g. a
            ``torch.utils.data.Dataset``; ``dataset[i]`` is ``(image, label)`` with an
            int label. Its ``targets`` (when present) are read instead of the items'
            labels, its ``classes`` (when present) name the labels.
        name: the key of the disk cache of decoded images (no cache without one); the
            caller makes sure one name means one dataset.
        image_size: ``H`` or ``(H, W)``; default: the first image's. Other sizes are
            scaled to cover it and center-cropped.
        channels: 1 or 3; default: the first image's (gray stays gray, colour is RGB).
        cache: False never reads or writes the cache.
        mean, std: the normalisation; default: measured on the images.

    Labels are relabelled ``0..C-1`` in sorted order of the values present (the
    identity when every class has an image).
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DatasetError(
            f"{type(dataset).__name__} is not a map-style dataset (it needs __len__ and __getitem__); "
            "wrap an iterable dataset in a list first"
        )
    title = name or type(dataset).__name__
    n = len(dataset)
    if n == 0:
        raise DatasetError(f"{title}: the dataset is empty")
    size = _as_size(image_size)
    if channels is not None and channels not in (1, 3):
        raise DatasetError(f"{title}: channels must be 1 or 3, got {channels!r}")
    targets = _targets(dataset, n, title)
    first_item: tuple[Any, Any] | None = None  # kept, so that decoding does not read item 0 again
    if size is None or channels is None:  # the first image says (one item read)
        first_item = _item(dataset, 0, title)
        first = _pil(first_item[0], 0, title)
        channels = channels or image_channels(first)
        size = size or (first.height, first.width)
    chans = int(channels)
    found: dict[str, np.ndarray] = {}

    def decode() -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((n, chans, size[0], size[1]), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        for i in progress(range(n), desc=f"decoding {title}", enable=show_progress, unit="img"):
            image, label = first_item if i == 0 and first_item is not None else _item(dataset, i, title)
            images[i] = convert_image(_pil(image, i, title), size, chans)
            labels[i] = _label(label, f"{title}: item {i}")
        found["labels"] = labels
        return images, labels

    def build_images() -> np.ndarray:
        return decode()[0]

    def build_labels() -> np.ndarray:
        images, labels = decode()
        found["images"] = images
        return labels

    use_cache = cache and name is not None
    slug = "torch-" + (re.sub(r"[^A-Za-z0-9_-]+", "_", name or "")[:40] or "dataset")
    key = cache_key(_VERSION, name, n, size, chans)
    if targets is None:
        labels = cached_array(f"{slug}-labels", key, build_labels) if use_cache else build_labels()
    else:
        labels = targets
    if "images" in found:
        images = found.pop("images")
        if use_cache:
            images = cached_array(f"{slug}-images", key, lambda: images)  # writes the cache now
    else:
        images = cached_array(f"{slug}-images", key, build_images) if use_cache else build_images()
    if targets is not None and "labels" in found and not np.array_equal(found["labels"], targets):
        raise DatasetError(f"{title}: its targets attribute does not match the labels of its items")
    if images.shape != (n, chans, size[0], size[1]):
        raise DatasetError(f"{title}: cached images have shape {images.shape}; remove the cache or pass another name")

    present, remapped = np.unique(labels, return_inverse=True)
    classes = _class_names(getattr(dataset, "classes", None), present)
    if mean is None or std is None:
        stats = channel_stats(images)
        mean = tuple(stats[0]) if mean is None else mean
        std = tuple(stats[1]) if std is None else std
    return FewShotDataset(
        title,
        remapped.reshape(-1),
        classes,
        torch.from_numpy(np.ascontiguousarray(images)),
        channels=chans,
        image_size=size,
        mean=mean,
        std=std,
    )


def _as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if min(size) < 1:
        raise DatasetError(f"image_size must be positive, got {image_size!r}")
    return size


def _item(dataset: Any, i: int, title: str) -> tuple[Any, Any]:
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise DatasetError(f"{title}: item {i} is {what}, not an (image, label) pair")
    return item[0], item[1]


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{where}: the label must be an int, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _targets(dataset: Any, n: int, title: str) -> np.ndarray | None:
    """The dataset's ``targets`` as int64 ``[n]``, or None when it has none of that length."""
    targets = getattr(dataset, "targets", None)
    if targets is None or isinstance(targets, (str, bytes)):
        return None
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    if isinstance(targets, np.ndarray) and targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        return targets.astype(np.int64) if len(targets) == n else None
    try:
        values = [_label(t, f"{title}: targets[{i}]") for i, t in enumerate(targets)]
    except TypeError:
        return None
    return np.asarray(values, dtype=np.int64) if len(values) == n else None


def _class_names(classes: Any, present: np.ndarray) -> list[str]:
    names = list(classes) if isinstance(classes, (list, tuple)) else None
    if names is not None and len(present) and 0 <= int(present.min()) and int(present.max()) < len(names):
        return [str(names[int(c)]) for c in present]
    return [str(int(c)) for c in present]


def _pil(image: Any, i: int, title: str) -> Image.Image:
    """An item's image as a PIL image of mode L, RGB or RGBA (or whatever mode PIL gave)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        a = image.detach().cpu().numpy()
        channels_first = True
    elif isinstance(image, np.ndarray):
        a = image
        channels_first = False
    else:
        raise DatasetError(
            f"{title}: item {i} has a {type(image).__name__} image; give a PIL image, a tensor or a numpy array"
        )
    if a.ndim == 3:
        lead, last = a.shape[0] in _CHANNELS, a.shape[-1] in _CHANNELS
        if lead and (channels_first or not last):
            a = a.transpose(1, 2, 0)
        elif not last:
            raise DatasetError(f"{title}: item {i} has an image of shape {a.shape}; need [C, H, W] or [H, W, C]")
        if a.shape[-1] == 1:
            a = a[..., 0]
    elif a.ndim != 2:
        raise DatasetError(f"{title}: item {i} has an image of shape {a.shape}; need [C, H, W], [H, W, C] or [H, W]")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if a.size and (float(a.min()) < -1e-3 or float(a.max()) > 1 + 1e-3):
            raise DatasetError(
                f"{title}: item {i} has float values in [{a.min():.3g}, {a.max():.3g}], not [0, 1] "
                "(drop Normalize from its transform: metafew normalises itself)"
            )
        a = np.clip(a * 255.0, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.dtype != np.uint8:
            if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
                raise DatasetError(f"{title}: item {i} has integer values outside 0..255")
            a = a.astype(np.uint8)
    else:
        raise DatasetError(f"{title}: item {i} has an image of dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))  # L, RGB or RGBA from the shape


__all__ = ["from_torch_dataset"]
