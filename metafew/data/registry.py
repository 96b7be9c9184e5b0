"""Datasets by name: ``load_dataset("omniglot", "train")``, and cheap facts for ``metafew data info``.

Every dataset module registers a :class:`DatasetSpec` in :data:`DATASETS` next to its
loader (``omniglot.py``: ``omniglot``, ``omniglot-lake``; ``medmnist.py``: the MedMNIST 2D
names; ``caltech101.py``; ``image_folder.py``: ``folder:PATH``), and the functions here only
look specs up and call them. Adding a dataset is one :func:`register_dataset` call, in
metafew or in another package (or through the ``metafew.datasets`` entry-point group)::

    from metafew.data import DatasetSpec, register_dataset

    register_dataset(DatasetSpec(
        "my-xrays", "my X-ray collection", ("train", "test"), "train", "https://example.org",
        (1, 64, 64), load=lambda subset, root, download, **options: ...,
    ))

A spec with an ``argument`` (``folder`` with ``argument="PATH"``) is named
``folder:PATH``: the text after the colon is passed to its callables as the keyword
``path`` (the argument's lower-cased name).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError, DatasetNotFoundError
from ..paths import data_root
from ..registry import Registry, did_you_mean
from .base import FewShotDataset, Storage

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "available_datasets",
    "dataset_info",
    "dataset_options",
    "download_dataset",
    "load_dataset",
    "register_dataset",
]

Root = str | os.PathLike[str] | None


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset name offers, and the callables that do the work.

    Attributes:
        name: the registered name (case-insensitive), e.g. ``"omniglot"``.
        description: one line for listings.
        subsets: the class splits ``load`` accepts, e.g. ``("train", "val", "test")``.
        default_subset: used when no subset is given.
        url: the official source ("" for local data).
        image_shape: ``(C, H, W)`` at the default options; None when it depends on the data.
        load: ``load(subset, root, download, **options) -> FewShotDataset``.
        info: ``info(root) -> dict`` of cheap facts (``path``, ``looked_in``, ``subsets``:
            ``{subset: {"classes": n, "images": m}}``, ...) without decoding images;
            raises DatasetNotFoundError when the data is missing. None: no such facts.
        download: ``download(root) -> [paths]`` fetches the official files (keeping what is
            there). None: nothing to download.
        options: the extra keyword options ``load`` takes (others are refused by name).
        argument: for a parametric name such as ``folder:PATH``, the placeholder
            (``"PATH"``); the text after ``name:`` goes to every callable as the keyword
            ``argument.lower()``.
        open_subsets: whether subsets other than ``subsets`` are accepted (``folder:PATH``'s
            sub-folders); ``load`` then checks them itself.
        unsupported: why this known name cannot be used (it gets this message instead of
            "unknown dataset"); such a spec is not listed by :func:`available_datasets`.
    """

    name: str
    description: str
    subsets: tuple[str, ...]
    default_subset: str
    url: str
    image_shape: tuple[int, int, int] | None
    load: Callable[..., FewShotDataset]
    info: Callable[..., dict[str, Any]] | None = None
    download: Callable[..., list[Path]] | None = None
    options: tuple[str, ...] = field(default=())
    argument: str | None = None
    open_subsets: bool = False
    unsupported: str | None = None

    @property
    def usage(self) -> str:
        """How the name is written: ``name``, or ``name:ARGUMENT`` for a parametric spec."""
        return f"{self.name}:{self.argument}" if self.argument else self.name


DATASETS: Registry[DatasetSpec] = Registry("dataset", group="metafew.datasets")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name``; a name registered twice is a ConfigError."""
    if not isinstance(spec, DatasetSpec):
        raise ConfigError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    DATASETS.register(spec.name, spec)
    return spec


def available_datasets() -> dict[str, DatasetSpec]:
    """Every dataset name :func:`load_dataset` accepts (as written, e.g. ``folder:PATH``), with its spec.

    >>> names = available_datasets()
    >>> "omniglot" in names and "folder:PATH" in names and "chestmnist" not in names
    True
    >>> names["omniglot"].subsets
    ('train', 'val', 'test', 'trainval')
    """
    return {
        spec.usage: spec for _, spec in DATASETS.items() if isinstance(spec, DatasetSpec) and spec.unsupported is None
    }


def _lookup(name: str) -> tuple[DatasetSpec, dict[str, str]]:
    """The spec behind ``name`` and the keyword argument its ``name:ARG`` part becomes."""
    text = str(name)
    prefix, sep, arg = text.partition(":")
    spec: DatasetSpec | None = None
    extra: dict[str, str] = {}
    if sep and prefix.lower() in DATASETS:
        candidate = _entry(prefix)
        if candidate.argument:
            spec, extra = candidate, {candidate.argument.lower(): arg}
    if spec is None:
        if text.lower() not in DATASETS:
            listed = list(available_datasets())
            hint = did_you_mean(text.lower(), listed) or (did_you_mean(prefix.lower(), listed) if sep else "")
            raise DatasetError(f"unknown dataset {text!r}{hint} (available: {', '.join(listed)})")
        spec = _entry(text)
        if spec.argument:
            raise DatasetError(f"dataset {spec.name!r} needs a {spec.argument}: write it as {spec.usage}")
    if spec.unsupported is not None:
        raise DatasetError(spec.unsupported)
    return spec, extra


def _entry(name: str) -> DatasetSpec:
    spec = DATASETS.get(name)
    if not isinstance(spec, DatasetSpec):  # e.g. a plug-in entry point naming something else
        raise DatasetError(f"dataset {name!r} is registered as a {type(spec).__name__}, not a DatasetSpec")
    return spec


def _check_subset(spec: DatasetSpec, subset: str | None) -> str:
    subset = spec.default_subset if subset is None else subset
    if subset not in spec.subsets and not spec.open_subsets:
        raise DatasetError(f"{spec.name} has no subset {subset!r}; choose one of {', '.join(spec.subsets)}")
    return subset


def _check_options(spec: DatasetSpec, options: dict[str, Any]) -> None:
    extra = sorted(set(options) - set(spec.options))
    if extra:
        ok = ", ".join(spec.options) or "none"
        raise DatasetError(f"{spec.usage} does not take option(s) {', '.join(extra)} (accepted: {ok})")


def dataset_options(name: str) -> tuple[str, ...]:
    """The keyword options ``load_dataset(name, ...)`` accepts (``DatasetSpec.options``).

    >>> dataset_options("folder:/data/x"), dataset_options("breastmnist")
    (('image_size', 'channels', 'on_error'), ())
    """
    return _lookup(name)[0].options


def load_dataset(
    name: str,
    subset: str | None = None,
    root: Root = None,
    download: bool = False,
    storage: Storage = "auto",
    **options: Any,
) -> FewShotDataset:
    """Load a dataset by name (see :func:`available_datasets`).

    Args:
        name: a registered name (``omniglot``, ``omniglot-lake``, a MedMNIST name,
            ``caltech101``, ...) or ``folder:PATH``.
        subset: a class split/subset (default: the dataset's ``default_subset``, e.g. ``train``).
        root: data root (default ``$METAFEW_DATA``, else ``~/.cache/metafew/data``; see
            :func:`metafew.paths.data_root`).
        download: fetch missing official files into the data root, md5-checked and resumable
            (not for ``folder:``; ``$METAFEW_MIRROR`` fetches them elsewhere, ``$METAFEW_OFFLINE`` refuses).
        storage: ``"auto"`` (memory-map when larger than ``$METAFEW_MEMORY_BUDGET``), ``"memory"``
            or ``"mmap"``; see :class:`FewShotDataset`.
        options: dataset-specific options, e.g. ``image_size`` (see ``DatasetSpec.options``).

    >>> ds = load_dataset("omniglot", "val")
    >>> ds.num_classes, ds.channels, ds.image_size
    (688, 1, (28, 28))
    >>> load_dataset("omniglott", "train")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    metafew.errors.DatasetError: unknown dataset 'omniglott'; did you mean 'omniglot'? (available: ...)
    """
    spec, extra = _lookup(name)
    subset = _check_subset(spec, subset)
    _check_options(spec, options)
    dataset = spec.load(subset, root, download, **extra, **options)
    dataset.storage = storage  # checked by the setter
    return dataset


def download_dataset(name: str, root: Root = None) -> list[Path]:
    """Fetch a dataset's official files into the data root (``metafew data download NAME``).

    Files already present are kept (and md5-checked where a checksum is published). For
    ``omniglot``/``omniglot-lake`` this fetches both image zips and Lake's one-shot runs.
    Returns the paths the dataset now lives at.
    """
    spec, extra = _lookup(name)
    if spec.download is None:
        where = f" from {spec.url}" if spec.url else ""
        raise DatasetError(f"{name} cannot be downloaded by metafew; get it yourself{where}")
    return spec.download(root, **extra)


def dataset_info(name: str, root: Root = None) -> dict[str, Any]:
    """Cheap facts about a dataset, without decoding any image.

    Returns a dict with ``name``, ``description``, ``url``, ``found`` (bool; None when the
    dataset offers no facts), ``path`` (where it was found, or None), ``looked_in`` (paths
    checked), ``image_shape`` (C, H, W), ``data_root`` (not for ``folder:PATH``),
    ``subsets`` (``{subset: {"classes": n, "images": m}}``) and, when not found,
    ``message`` (how to get it). Never raises for a missing dataset.

    >>> info = dataset_info("omniglot")
    >>> info["found"], info["image_shape"], info["subsets"]["val"]
    (True, (1, 28, 28), {'classes': 688, 'images': 13760})
    """
    spec, extra = _lookup(name)
    info: dict[str, Any] = {
        "name": str(name) if spec.argument else spec.name,
        "description": spec.description,
        "url": spec.url,
        "image_shape": spec.image_shape,
    }
    if not spec.argument:  # a parametric name carries its own location
        info["data_root"] = str(data_root(root))
    info["subsets"] = {}
    if spec.info is None:
        info["found"] = None
        return info
    try:
        info.update(spec.info(root, **extra))
        info.setdefault("found", True)
    except DatasetNotFoundError as e:
        info.update(found=False, path=None, message=str(e))
    return info
