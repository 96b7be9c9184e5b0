"""MedMNIST v2 (Yang et al. 2023): 12 standardised 28x28 biomedical 2D datasets, CC BY 4.0.

Each dataset is one ``<name>.npz`` (keys ``{train,val,test}_{images,labels}``) with the
official train/val/test split; images are ``N x 28 x 28`` (grayscale) or
``N x 28 x 28 x 3``, labels ``N x 1``. URLs, md5s and label names are those of the
``medmnist`` package's ``INFO`` (v2, zenodo record 6496656). The md5 is checked once per
file (the verdict is cached by size and mtime); a file that then fails to read (a flipped
byte keeps both) raises a one-line DatasetError naming it, and its verdict is forgotten. Mean/std are per dataset, from its train
split. ChestMNIST is multi-label (14 findings per image) and cannot be used for
single-label few-shot episodes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DatasetError
from ..paths import cache_dir, data_candidates, find_data
from .base import FewShotDataset
from .download import check_md5_cached, dataset_not_found, download_file, forget_md5, offline
from .normalize import channel_stats
from .registry import DatasetSpec, register_dataset

__all__ = [
    "MEDMNIST_INFO",
    "SPLITS",
    "UNSUPPORTED",
    "MedMNIST",
    "MedMNISTInfo",
    "find_medmnist",
    "locate_medmnist",
    "medmnist_info",
]

SPLITS = ("train", "val", "test")
_ZENODO = "https://zenodo.org/record/6496656/files/{}.npz?download=1"


class MedMNISTInfo(NamedTuple):
    """What the ``medmnist`` package's ``INFO`` says about one 2D dataset."""

    md5: str
    task: str
    labels: tuple[str, ...]
    channels: int
    n_samples: tuple[int, int, int]  # train, val, test

    def url(self, name: str) -> str:
        return _ZENODO.format(name)


_ORGAN = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip

MEDMNIST_INFO: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(
        "a8b06965200029087d5bd730944a56c1",
        "multi-class",
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        3,
        (89996, 10004, 7180),
    ),
    "chestmnist": MedMNISTInfo(
        "02c8a6516a18b556561a56cbdd36c4a8",
        "multi-label, binary-class",
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        1,
        (78468, 11219, 22433),
    ),
    "dermamnist": MedMNISTInfo(
        "0744692d530f8e62ec473284d019b0c7",
        "multi-class",
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        3,
        (7007, 1003, 2005),
    ),
    "octmnist": MedMNISTInfo(
        "c68d92d5b585d8d81f7112f81e2d0842",
        "multi-class",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        1,
        (97477, 10832, 1000),
    ),
    "pneumoniamnist": MedMNISTInfo(
        "28209eda62fecd6e6a2d98b1501bb15f", "binary-class", ("normal", "pneumonia"), 1, (4708, 524, 624)
    ),
    "retinamnist": MedMNISTInfo(
        "bd4c0672f1bba3e3a89f0e4e876791e4", "ordinal-regression", ("0", "1", "2", "3", "4"), 3, (1080, 120, 400)
    ),
    "breastmnist": MedMNISTInfo(
        "750601b1f35ba3300ea97c75c52ff8f6", "binary-class", ("malignant", "normal, benign"), 1, (546, 78, 156)
    ),
    "bloodmnist": MedMNISTInfo(
        "7053d0359d879ad8a5505303e11de1dc",
        "multi-class",
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        3,
        (11959, 1712, 3421),
    ),
    "tissuemnist": MedMNISTInfo(
        "ebe78ee8b05294063de985d821c1c34b",
        "multi-class",
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        1,
        (165466, 23640, 47280),
    ),
    "organamnist": MedMNISTInfo("866b832ed4eeba67bfb9edee1d5544e6", "multi-class", _ORGAN, 1, (34581, 6491, 17778)),
    "organcmnist": MedMNISTInfo("0afa5834fb105f7705a7d93372119a21", "multi-class", _ORGAN, 1, (13000, 2392, 8268)),
    "organsmnist": MedMNISTInfo("e5c39f1af030238290b9557d9503af9d", "multi-class", _ORGAN, 1, (13940, 2452, 8829)),
}

# Per-channel mean/std of the train split in [0, 1] units, computed once from the official
# .npz over every train pixel (metafew.data.normalize.channel_stats). Datasets not listed
# here get theirs computed from their train split on first load and cached in the cache dir.
_TRAIN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "pneumoniamnist": ((0.5719,), (0.1684,)),
    "breastmnist": ((0.3276,), (0.2057,)),
}


# MedMNIST names that cannot make few-shot episodes, and why.
UNSUPPORTED = {
    "chestmnist": (
        "chestmnist is multi-label (14 findings per image): few-shot episodes need exactly one "
        "class per image, so it is not supported; use another MedMNIST dataset"
    ),
}


def _candidates(name: str, root: str | os.PathLike[str] | None) -> list[Path]:
    return data_candidates(root, (f"medmnist/{name}.npz", f"{name}.npz"))


def find_medmnist(name: str, root: str | os.PathLike[str] | None = None) -> Path | None:
    """Path of ``<name>.npz`` under a data root (:func:`metafew.paths.data_roots`), or None."""
    return find_data(root, (f"medmnist/{name}.npz", f"{name}.npz"), Path.is_file)


def locate_medmnist(name: str, root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """Path of a checked ``<name>.npz``, downloading it from zenodo when missing and ``download`` is set."""
    name = name.lower()
    info = _info(name)
    path = find_medmnist(name, root)
    if path is None:
        if not download or offline():
            raise dataset_not_found(f"MedMNIST {name}", _candidates(name, root), name, info.url(name))
        path = download_file(info.url(name), _candidates(name, root)[0], info.md5)
    check_md5_cached(path, info.md5)
    return path


def _info(name: str) -> MedMNISTInfo:
    key = name.lower()
    if key not in MEDMNIST_INFO:
        raise DatasetError(f"unknown MedMNIST dataset {name!r}; choose one of {', '.join(MEDMNIST_INFO)}")
    if key in UNSUPPORTED:
        raise DatasetError(UNSUPPORTED[key])
    return MEDMNIST_INFO[key]


# What reading a damaged .npz raises (a truncated zip, a flipped byte: bad CRC, bad deflate
# stream, bad .npy header); a missing or unreadable file (FileNotFoundError,
# PermissionError) is not corruption and keeps its own error.
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


@contextlib.contextmanager
def _reading(path: Path, name: str) -> Iterator[None]:
    """Turn a read failure of ``<name>.npz`` into a one-line DatasetError naming the file; forget its md5 verdict."""
    try:
        yield
    except (DatasetError, FileNotFoundError, PermissionError):
        raise
    except _CORRUPT_ERRORS as e:
        forget_md5(path)  # the cached verdict (same size and mtime) no longer vouches for it
        raise DatasetError(
            f"{path} is corrupt or incomplete ({type(e).__name__}: {e}); delete it and run "
            f"`metafew data download {name}` to fetch it again"
        ) from e


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DatasetError(f"{path}: expected images N x H x W or N x H x W x 3, got shape {images.shape}")


def _train_stats(name: str, path: Path, md5: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name in _TRAIN_STATS:
        return _TRAIN_STATS[name]
    cache = cache_dir() / "stats" / f"medmnist-{name}-{md5}.json"
    try:
        d = json.loads(cache.read_text())
        return tuple(d["mean"]), tuple(d["std"])
    except (OSError, ValueError, KeyError):
        pass
    with _reading(path, name), np.load(path) as f:
        if "train_images" not in f.files:
            raise DatasetError(f"{path}: missing train_images")
        stats = channel_stats(_to_nchw(f["train_images"], path))
    mean, std = tuple(float(m) for m in stats[0]), tuple(float(s) for s in stats[1])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump({"mean": mean, "std": std}, out)
        os.replace(tmp, cache)
    except OSError:
        pass
    return mean, std


def MedMNIST(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> FewShotDataset:
    """One official split of a MedMNIST v2 2D dataset, its label names as class names.

    Args:
        name: ``pathmnist``, ``dermamnist``, ``octmnist``, ``pneumoniamnist``, ``retinamnist``,
            ``breastmnist``, ``bloodmnist``, ``tissuemnist``, ``organ{a,c,s}mnist``
            (``chestmnist`` raises: it is multi-label).
        split: ``train``, ``val`` or ``test``.
        root: data root; the file is ``<root>/medmnist/<name>.npz`` (or ``<root>/<name>.npz``).
        download: fetch the file from zenodo when it is missing.
    """
    name = name.lower()
    info = _info(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown MedMNIST split {split!r}; choose one of {', '.join(SPLITS)}")
    path = locate_medmnist(name, root, download)

    with _reading(path, name), np.load(path) as f:  # an NpzFile reads only the members asked for
        if f"{split}_labels" not in f.files or f"{split}_images" not in f.files:
            raise DatasetError(f"{path}: missing {split}_images / {split}_labels")
        raw = f[f"{split}_labels"]
    if raw.ndim == 2 and raw.shape[1] != 1:
        raise DatasetError(f"{path}: labels are multi-label ({raw.shape[1]} per image); few-shot episodes need one")
    labels = raw.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(info.labels)):
        raise DatasetError(f"{path}: {split} labels fall outside 0..{len(info.labels) - 1}")
    mean, std = _train_stats(name, path, info.md5, info.channels)

    def load() -> np.ndarray:
        with _reading(path, name), np.load(path) as f:
            return _to_nchw(f[f"{split}_images"], path)

    return FewShotDataset(
        f"medmnist/{name}-{split}",
        labels,
        list(info.labels),
        load,
        channels=info.channels,
        image_size=(28, 28),
        mean=mean,
        std=std,
    )


def medmnist_info(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts about ``<name>.npz`` (path, per-split counts from the label arrays, label names), no image read.

    Raises DatasetNotFoundError (naming where it looked) when the file is missing.
    """
    name = name.lower()
    meta = _info(name)
    looked = [str(c) for c in _candidates(name, root)]
    path = find_medmnist(name, root)
    if path is None:
        raise dataset_not_found(f"MedMNIST {name}", looked, name, meta.url(name))
    subsets = {}
    with _reading(path, name), np.load(path) as f:
        for s in SPLITS:
            key = f"{s}_labels"
            n = int(f[key].shape[0]) if key in f.files else 0
            subsets[s] = {"classes": len(meta.labels), "images": n}
    return {"path": str(path), "looked_in": looked, "subsets": subsets, "labels": list(meta.labels), "md5": meta.md5}


def _download(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    return [locate_medmnist(name, root, download=True)]


def _spec(name: str, info: MedMNISTInfo) -> DatasetSpec:
    return DatasetSpec(
        name,
        f"MedMNIST v2 {name} ({info.task}, {len(info.labels)} classes), official splits",
        SPLITS,
        "train",
        info.url(name),
        (info.channels, 28, 28),
        load=functools.partial(MedMNIST, name),
        info=functools.partial(medmnist_info, name),
        download=functools.partial(_download, name),
        unsupported=UNSUPPORTED.get(name),  # known, so it gets its explanation, but never listed
    )


for _name, _meta in MEDMNIST_INFO.items():
    register_dataset(_spec(_name, _meta))
del _name, _meta
