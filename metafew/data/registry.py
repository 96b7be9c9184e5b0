"""Datasets by name: ``load_dataset("omniglot", "train")``, and cheap facts for ``metafew data info``.

Names: ``omniglot`` (Vinyals split: train/val/test/trainval), ``omniglot-lake`` (Lake's
background/evaluation sets), the MedMNIST 2D names (``pneumoniamnist``, ... : train/val/test),
``caltech101`` (train/val/test/all) and ``folder:PATH`` (a user's ``PATH/<class>/<image>``
tree; subset ``all`` is PATH itself, any other subset ``s`` is the folder ``PATH/s``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import data_root
from .base import FewShotDataset
from . import caltech101 as _caltech
from . import medmnist as _med
from . import omniglot as _omni
from .download import dataset_not_found
from .image_folder import IMAGE_EXTENSIONS, ImageFolder

__all__ = ["DatasetSpec", "available_datasets", "load_dataset", "dataset_info", "download_dataset", "FOLDER_PREFIX"]

FOLDER_PREFIX = "folder:"


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset name offers."""

    name: str
    description: str
    subsets: tuple[str, ...]
    default_subset: str
    url: str
    image_shape: tuple[int, int, int] | None  # (C, H, W) at the default options; None: depends on the data
    options: tuple[str, ...] = field(default=())  # extra keyword options load_dataset passes on


def _specs() -> dict[str, DatasetSpec]:
    specs = {
        "omniglot": DatasetSpec(
            "omniglot",
            "Omniglot, Vinyals et al. split: 4 rotations of each character are classes (20 images each)",
            _omni.SUBSETS["vinyals"],
            "train",
            _omni.OMNIGLOT_URLS["images_background"],
            (1, 28, 28),
            ("image_size",),
        ),
        "omniglot-lake": DatasetSpec(
            "omniglot-lake",
            "Omniglot, Lake et al. background (964 characters) / evaluation (659) sets, unrotated",
            _omni.SUBSETS["lake"],
            "background",
            _omni.OMNIGLOT_URLS["images_background"],
            (1, 28, 28),
            ("image_size",),
        ),
    }
    for name, info in _med.MEDMNIST_INFO.items():
        if name == "chestmnist":
            continue  # multi-label: not usable for few-shot episodes
        specs[name] = DatasetSpec(
            name,
            f"MedMNIST v2 {name} ({info.task}, {len(info.labels)} classes), official splits",
            _med.SPLITS,
            "train",
            info.url(name),
            (info.channels, 28, 28),
        )
    specs["caltech101"] = DatasetSpec(
        "caltech101",
        "Caltech-101, 101 object classes; seeded 65/15/21 class split (BACKGROUND_Google left out)",
        _caltech.SUBSETS,
        "train",
        _caltech.CALTECH101_URL,
        (3, 84, 84),
        ("image_size", "include_background", "seed"),
    )
    specs["folder:PATH"] = DatasetSpec(
        "folder:PATH",
        f"your own PATH/<class>/<image> tree ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})",
        ("all",),
        "all",
        "",
        None,
        ("image_size", "channels", "on_error"),
    )
    return specs


def available_datasets() -> dict[str, DatasetSpec]:
    """Every dataset name :func:`load_dataset` accepts, with its subsets and source."""
    return _specs()


def _spec(name: str) -> DatasetSpec:
    specs = _specs()
    key = name.lower()
    if key == "chestmnist":
        _med._info(key)  # raises the multi-label explanation
    if key not in specs or key == "folder:path":
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(specs)}")
    return specs[key]


def _check_subset(spec: DatasetSpec, subset: str | None) -> str:
    subset = spec.default_subset if subset is None else subset
    if subset not in spec.subsets:
        raise DatasetError(f"{spec.name} has no subset {subset!r}; choose one of {', '.join(spec.subsets)}")
    return subset


def _check_options(spec_name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(options) - set(allowed))
    if extra:
        ok = ", ".join(allowed) or "none"
        raise DatasetError(f"{spec_name} does not take option(s) {', '.join(extra)} (accepted: {ok})")


def _folder_root(name: str, subset: str | None) -> Path:
    path = Path(name[len(FOLDER_PREFIX) :]).expanduser()
    if not str(path) or str(path) == ".":
        raise DatasetError("folder: needs a path, e.g. folder:/data/my_images")
    if subset in (None, "all"):
        return path
    sub = path / subset
    if not sub.is_dir():
        raise DatasetNotFoundError(
            f"subset {subset!r} of {name} not found: {sub.absolute()} is not a folder "
            "(use subset 'all' for PATH itself, or a sub-folder name such as 'train')"
        )
    return sub


def load_dataset(
    name: str,
    subset: str | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    **options: Any,
) -> FewShotDataset:
    """Load a dataset by name (see :func:`available_datasets`).

    Args:
        name: ``omniglot``, ``omniglot-lake``, a MedMNIST name, ``caltech101`` or ``folder:PATH``.
        subset: a class split/subset (default: the dataset's first, e.g. ``train``).
        root: data root (default ``$METAFEW_DATA``, else ``~/.cache/metafew/data``).
        download: fetch missing official files (not for ``folder:``).
        options: dataset-specific options, e.g. ``image_size``.
    """
    if name.lower().startswith(FOLDER_PREFIX):
        _check_options("folder:", options, ("image_size", "channels", "on_error"))
        path = _folder_root(name, subset)
        return ImageFolder(path, name=f"{name}" + ("" if subset in (None, "all") else f"/{subset}"), **options)
    spec = _spec(name)
    subset = _check_subset(spec, subset)
    _check_options(spec.name, options, spec.options)
    loaders: dict[str, Callable[[], FewShotDataset]] = {
        "omniglot": lambda: _omni.Omniglot(subset, "vinyals", root, download, **options),
        "omniglot-lake": lambda: _omni.Omniglot(subset, "lake", root, download, **options),
        "caltech101": lambda: _caltech.Caltech101(subset, root, download, **options),
    }
    if spec.name in loaders:
        return loaders[spec.name]()
    return _med.MedMNIST(spec.name, subset, root, download)


def download_dataset(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Fetch a dataset's official files into the data root (``metafew data download NAME``).

    Files already present are kept (and md5-checked where a checksum is published). For
    ``omniglot``/``omniglot-lake`` this fetches both image zips and Lake's one-shot runs.
    Returns the paths the dataset now lives at.
    """
    if name.lower().startswith(FOLDER_PREFIX):
        raise DatasetError(f"{name} is a local folder; there is nothing to download")
    spec = _spec(name)
    if spec.name in ("omniglot", "omniglot-lake"):
        from .lake import locate_lake_runs

        return [_omni.locate_omniglot(root, download=True), locate_lake_runs(root, download=True)]
    if spec.name == "caltech101":
        return [_caltech.locate_caltech101(root, download=True)]
    return [_med.locate_medmnist(spec.name, root, download=True)]


def dataset_info(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts about a dataset, without decoding any image.

    Returns a dict with ``name``, ``description``, ``url``, ``found`` (bool), ``path``
    (where it was found, or None), ``looked_in`` (paths checked), ``image_shape``
    (C, H, W), ``subsets`` (``{subset: {"classes": n, "images": m}}``) and, when not
    found, ``message`` (how to get it). Never raises for a missing dataset.
    """
    if name.lower().startswith(FOLDER_PREFIX):
        return _folder_info(name)
    spec = _spec(name)
    info: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "url": spec.url,
        "image_shape": spec.image_shape,
        "data_root": str(data_root(root)),
        "subsets": {},
    }
    try:
        if spec.name in ("omniglot", "omniglot-lake"):
            info.update(_omniglot_info(spec, root))
        elif spec.name == "caltech101":
            info.update(_caltech_info(root))
        else:
            info.update(_medmnist_info(spec.name, root))
        info["found"] = True
    except DatasetNotFoundError as e:
        info.update(found=False, path=None, message=str(e))
    return info


def _omniglot_info(spec: DatasetSpec, root: str | os.PathLike[str] | None) -> dict[str, Any]:
    looked = [str(c) for c in _omni._candidates(root)]
    base = _omni.locate_omniglot(root)
    chars, files, starts, n_background = _omni._listing(base)
    per_char = np.diff(starts)
    subsets: dict[str, dict[str, int]] = {}
    if spec.name == "omniglot":
        index = {c: i for i, c in enumerate(chars)}
        for s in spec.subsets:
            lines = _omni._split_lines(s)
            n = sum(int(per_char[index[ln.rpartition("/")[0]]]) for ln in lines if ln.rpartition("/")[0] in index)
            subsets[s] = {"classes": len(lines), "images": n}
    else:
        subsets["background"] = {"classes": n_background, "images": int(per_char[:n_background].sum())}
        subsets["evaluation"] = {"classes": len(chars) - n_background, "images": int(per_char[n_background:].sum())}
    runs = _lake_runs_path(root)
    return {"path": str(base), "looked_in": looked, "subsets": subsets, "lake_runs": runs}


def _lake_runs_path(root: str | os.PathLike[str] | None) -> str | None:
    from .lake import find_lake_runs

    p = find_lake_runs(root)
    return str(p) if p else None


def _caltech_info(root: str | os.PathLike[str] | None) -> dict[str, Any]:
    looked = [str(c) for c in _caltech._candidates(root)]
    folder = _caltech.find_caltech101(root)
    if folder is None:
        raise dataset_not_found("Caltech-101", looked, "caltech101", _caltech.CALTECH101_URL)
    names, files = _caltech._listing(folder)
    count = dict(zip(names, (len(f) for f in files)))
    split = _caltech.caltech101_split(names)
    subsets = {s: {"classes": len(cs), "images": sum(count[c] for c in cs)} for s, cs in split.items()}
    extra = {"background_images": count.get(_caltech.BACKGROUND, 0)}
    return {"path": str(folder), "looked_in": looked, "subsets": subsets, **extra}


def _medmnist_info(name: str, root: str | os.PathLike[str] | None) -> dict[str, Any]:
    looked = [str(c) for c in _med._candidates(name, root)]
    path = _med.find_medmnist(name, root)
    meta = _med.MEDMNIST_INFO[name]
    if path is None:
        raise dataset_not_found(f"MedMNIST {name}", looked, name, meta.url(name))
    subsets = {}
    with np.load(path) as f:
        for s in _med.SPLITS:
            key = f"{s}_labels"
            n = int(f[key].shape[0]) if key in f.files else 0
            subsets[s] = {"classes": len(meta.labels), "images": n}
    return {"path": str(path), "looked_in": looked, "subsets": subsets, "labels": list(meta.labels), "md5": meta.md5}


def _folder_info(name: str) -> dict[str, Any]:
    path = Path(name[len(FOLDER_PREFIX) :]).expanduser()
    info: dict[str, Any] = {
        "name": name,
        "description": "image folder",
        "url": "",
        "image_shape": None,
        "looked_in": [str(path.absolute())],
        "subsets": {},
    }
    if not path.is_dir():
        return {**info, "found": False, "path": None, "message": f"{path.absolute()} is not a folder"}
    classes = images = 0
    with os.scandir(path) as it:
        for d in it:
            if d.is_dir() and not d.name.startswith("."):
                with os.scandir(d.path) as files:
                    n = sum(1 for e in files if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
                classes += 1
                images += n
    info["subsets"]["all"] = {"classes": classes, "images": images}
    return {**info, "found": True, "path": str(path.absolute())}
