"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100.

Both are built from the official python version of CIFAR-100 (Krizhevsky 2009,
``cifar-100-python.tar.gz``: the ``train``, ``test`` and ``meta`` pickles), pooling its
50,000 training and 10,000 test images, so every one of the 100 fine classes has 600
32x32 RGB images:

* ``cifar-fs``: a random split of the 100 fine classes into 64 ``train``, 16 ``val`` and
  20 ``test`` classes (the lists of Bertinetto et al.'s code release).
* ``fc100``: a split by the 20 coarse superclasses, 12 / 4 / 4 (60 / 20 / 20 fine classes),
  so test classes are semantically far from training ones (Oreshkin et al., TADAM).

The class lists ship with metafew (``metafew/data/splits/{cifar-fs,fc100}/*.txt``, each
naming its source). The data is looked for as the extracted ``cifar-100-python/`` folder
(torchvision's layout: ``<root>/cifar-100-python``, or ``<root>/cifar100/cifar-100-python``)
or as the archive itself in those places (extracted next to it after its md5 is checked);
``download=True`` fetches the archive from its official URL. The pickles are read with an
unpickler that builds only numpy arrays. Images are cached decoded (and, at another
``image_size``, resized with the bicubic cover-crop of :mod:`metafew.data.decode`);
normalised with the CIFAR-100 training-set mean/std.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import data_candidates, data_root, find_data
from .base import FewShotDataset, cache_key, cached_array
from .decode import ChunkedArray, take
from .download import check_md5, dataset_not_found, download_file, extract_archive
from .packaged import as_text, file_stamp, load_pickle, resize_array, split_classes, str_keys
from .registry import DatasetSpec, register_dataset

__all__ = [
    "CIFAR100_MD5",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR100_URL",
    "CIFARFS",
    "FC100",
    "SUBSETS",
    "cifar100_info",
    "find_cifar100",
    "locate_cifar100",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
# Per-channel mean/std of the 50,000 CIFAR-100 training images, in [0, 1] units (the values
# the few-shot CIFAR code bases normalise with).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SUBSETS = ("train", "val", "test")
_PLACES = ("cifar100", "")  # <root>/cifar100/cifar-100-python, <root>/cifar-100-python
_VERSION = "cifar100-v1"
LAYOUT = f"{FOLDER}/{{train,test,meta}} (the official {ARCHIVE}, extracted, or the archive itself)"


def _folders(root: str | os.PathLike[str] | None) -> list[Path]:
    return data_candidates(root, [f"{p}/{FOLDER}" if p else FOLDER for p in _PLACES])


def _is_cifar(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def find_cifar100(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The extracted ``cifar-100-python`` folder (``train``, ``test``, ``meta``) under the data roots, or None."""
    return find_data(root, [f"{p}/{FOLDER}" if p else FOLDER for p in _PLACES], _is_cifar)


def _not_found(title: str, cli_name: str, root: str | os.PathLike[str] | None) -> DatasetNotFoundError:
    looked = [*_folders(root), *(f.parent / ARCHIVE for f in _folders(root))]
    return dataset_not_found(f"{title} (CIFAR-100, {LAYOUT})", looked, cli_name, CIFAR100_URL)


def locate_cifar100(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    *,
    title: str = "CIFAR-100",
    cli_name: str = "cifar-fs",
) -> Path:
    """The ``cifar-100-python`` folder: found, else extracted from an archive lying there, else downloaded.

    An archive found or downloaded is md5-checked before it is extracted next to itself.
    """
    folder = find_cifar100(root)
    if folder is not None:
        return folder
    archive = find_data(root, [f"{p}/{ARCHIVE}" if p else ARCHIVE for p in _PLACES], Path.is_file)
    if archive is None and download:
        archive = download_file(CIFAR100_URL, data_root(root) / "cifar100" / ARCHIVE, CIFAR100_MD5)
    if archive is None:
        raise _not_found(title, cli_name, root)
    check_md5(archive, CIFAR100_MD5)
    extract_archive(archive, archive.parent)
    if not _is_cifar(archive.parent / FOLDER):
        raise DatasetError(f"{archive} did not contain {FOLDER}/train, test and meta")
    return archive.parent / FOLDER


def _read(folder: Path, name: str) -> dict[str, Any]:
    return str_keys(load_pickle(folder / name), str(folder / name))


@functools.lru_cache(maxsize=4)
def _labels_cached(folder: Path, stamp: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    meta = _read(folder, "meta")
    try:
        fine_names, coarse_names = as_text(meta["fine_label_names"]), as_text(meta["coarse_label_names"])
    except KeyError as e:
        raise DatasetError(f"{folder / 'meta'} lacks {e.args[0]!r}: not the CIFAR-100 python version") from e
    fine, coarse = [], []
    for name in ("train", "test"):
        d = _read(folder, name)
        try:
            fine.append(np.asarray(d["fine_labels"], dtype=np.int64))
            coarse.append(np.asarray(d["coarse_labels"], dtype=np.int64))
        except KeyError as e:
            raise DatasetError(f"{folder / name} lacks {e.args[0]!r}: not the CIFAR-100 python version") from e
    return np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names


def _labels(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Fine and coarse label of every image (train pickle first, then test) and the class names."""
    return _labels_cached(folder, tuple(file_stamp([folder / f for f in FILES])))


def _images(folder: Path, n: int) -> np.ndarray:
    """All images, train pickle first, as uint8 ``[N, 3, 32, 32]``."""
    parts = []
    for name in ("train", "test"):
        data = np.asarray(_read(folder, name).get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{folder / name}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072")
        parts.append(data.reshape(-1, 3, 32, 32))
    images = np.concatenate(parts)
    if len(images) != n:
        raise DatasetError(f"{folder}: {len(images)} images but {n} labels")
    return images


def _split(
    kind: str, subset: str, fine_names: list[str], coarse_names: list[str], fine_to_coarse: np.ndarray
) -> list[int]:
    """Fine class ids of a subset: CIFAR-FS lists fine classes, FC100 coarse ones (all their fine classes)."""
    wanted = split_classes(kind, subset)
    names = fine_names if kind == "cifar-fs" else coarse_names
    index = {n: i for i, n in enumerate(names)}
    missing = [w for w in wanted if w not in index]
    if missing:
        level = "fine" if kind == "cifar-fs" else "coarse"
        raise DatasetError(f"the CIFAR-100 meta file has no {level} class {missing[0]!r} of the {kind} {subset} split")
    if kind == "cifar-fs":
        return [index[w] for w in wanted]
    return [
        int(f) for w in wanted for f in sorted(np.flatnonzero(fine_to_coarse == index[w]), key=lambda f: fine_names[f])
    ]


def _fine_to_coarse(fine: np.ndarray, coarse: np.ndarray, n_fine: int) -> np.ndarray:
    out = np.full(n_fine, -1, dtype=np.int64)
    out[fine] = coarse
    return out


def _dataset(
    kind: str, subset: str, root: str | os.PathLike[str] | None, download: bool, image_size: int
) -> FewShotDataset:
    title = "CIFAR-FS" if kind == "cifar-fs" else "FC100"
    if subset not in SUBSETS:
        raise DatasetError(f"unknown {title} subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    folder = locate_cifar100(root, download, title=title, cli_name=kind)
    fine, coarse, fine_names, coarse_names = _labels(folder)
    classes = _split(kind, subset, fine_names, coarse_names, _fine_to_coarse(fine, coarse, len(fine_names)))
    per_class = [np.flatnonzero(fine == c) for c in classes]
    index = np.concatenate(per_class)
    labels = np.repeat(np.arange(len(classes)), [len(p) for p in per_class])
    stamp = file_stamp([folder / f for f in FILES])
    key = cache_key(_VERSION, image_size, stamp)
    n = len(fine)

    size = (image_size, image_size)

    def build() -> ChunkedArray:  # resized a block at a time
        return take(_images(folder, n), None, lambda block, _: resize_array(block, size), (3, *size))

    def load() -> ChunkedArray:
        return take(cached_array(f"cifar100-{image_size}", key, build), index)

    return FewShotDataset(
        f"{kind}/{subset}",
        labels,
        [fine_names[c] for c in classes],
        load,
        channels=3,
        image_size=(image_size, image_size),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        cache_key=cache_key(key, classes),  # names the memory-mapped copy
    )


def CIFARFS(
    subset: str = "train", root: str | os.PathLike[str] | None = None, download: bool = False, image_size: int = 32
) -> FewShotDataset:
    """One CIFAR-FS subset (``train`` 64, ``val`` 16, ``test`` 20 fine classes of 600 images) as a :class:`FewShotDataset`.

    Args:
        subset: ``train``, ``val`` or ``test``.
        root: data root; CIFAR-100 is ``<root>/cifar-100-python/`` or ``<root>/cifar100/cifar-100-python/``.
        download: fetch the official archive (md5-checked) when it is missing.
        image_size: side of the square images (32 is the standard; others are resized bicubically).
    """
    return _dataset("cifar-fs", subset, root, download, image_size)


def FC100(
    subset: str = "train", root: str | os.PathLike[str] | None = None, download: bool = False, image_size: int = 32
) -> FewShotDataset:
    """One FC100 subset (``train`` 60, ``val`` 20, ``test`` 20 fine classes from 12 / 4 / 4 superclasses).

    Arguments as for :func:`CIFARFS`; class names are the CIFAR-100 fine names.
    """
    return _dataset("fc100", subset, root, download, image_size)


def cifar100_info(kind: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts for ``metafew data info cifar-fs|fc100``: where CIFAR-100 is, the expected layout,
    the classes/images of each subset (from the label pickles; no image is converted).

    Raises DatasetNotFoundError (naming where it looked and the layout) when it is missing.
    """
    title = "CIFAR-FS" if kind == "cifar-fs" else "FC100"
    looked = [str(p) for p in _folders(root)]
    folder = find_cifar100(root)
    if folder is None:
        raise _not_found(title, kind, root)
    fine, coarse, fine_names, coarse_names = _labels(folder)
    f2c = _fine_to_coarse(fine, coarse, len(fine_names))
    counts = np.bincount(fine, minlength=len(fine_names))
    subsets = {}
    for s in SUBSETS:
        classes = _split(kind, s, fine_names, coarse_names, f2c)
        subsets[s] = {"classes": len(classes), "images": int(counts[classes].sum())}
    size = sum((folder / f).stat().st_size for f in FILES)
    return {
        "path": str(folder),
        "layout": LAYOUT,
        "looked_in": looked,
        "size_mb": round(size / 2**20, 1),
        "subsets": subsets,
    }


def _loader(kind: str):
    def load(subset: str, root: str | os.PathLike[str] | None, download: bool, **options: Any) -> FewShotDataset:
        return (CIFARFS if kind == "cifar-fs" else FC100)(subset, root, download, **options)

    return load


def _download(kind: str):
    def download(root: str | os.PathLike[str] | None = None) -> list[Path]:
        return [locate_cifar100(root, download=True, cli_name=kind)]

    return download


register_dataset(
    DatasetSpec(
        "cifar-fs",
        "CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 fine classes split 64/16/20, 600 32x32 images each",
        SUBSETS,
        "train",
        CIFAR100_URL,
        (3, 32, 32),
        load=_loader("cifar-fs"),
        info=functools.partial(cifar100_info, "cifar-fs"),
        download=_download("cifar-fs"),
        options=("image_size",),
    )
)
register_dataset(
    DatasetSpec(
        "fc100",
        "FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60/20/20 fine classes (12/4/4 superclasses)",
        SUBSETS,
        "train",
        CIFAR100_URL,
        (3, 32, 32),
        load=_loader("fc100"),
        info=functools.partial(cifar100_info, "fc100"),
        download=_download("fc100"),
        options=("image_size",),
    )
)
