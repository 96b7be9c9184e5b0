"""Caltech-101 (Fei-Fei, Fergus & Perona 2004) as a few-shot benchmark, CC BY 4.0.

101 object classes (31 to 800 images each) plus ``BACKGROUND_Google`` clutter, which is
not an object class and is left out unless ``include_background=True``.

Class split (there is no standard few-shot split of Caltech-101, so metafew fixes one):
the 101 object class names are sorted, shuffled with ``numpy.random.default_rng(seed)``,
and sliced into 65 ``train``, 15 ``val`` and 21 ``test`` classes; ``all`` is every class.
With ``include_background=True``, ``BACKGROUND_Google`` is added to ``train`` and ``all``
(never to val/test), so the object-class split does not change.

Images: RGB (grayscale JPEGs are converted), scaled so the shorter side is
``image_size`` (bicubic, antialiased) and center-cropped to ``image_size x image_size``
(84 by default); decoded once over all cores and cached. Normalised with the ImageNet
mean/std, as pretrained backbones expect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..paths import data_candidates, data_root, find_data
from .base import FewShotDataset, cache_key, cached_array
from .decode import ChunkedArray, decode_files_chunked, take
from .download import check_md5, dataset_not_found, download_and_extract, extract_archive, making_dirs, offline
from .registry import DatasetSpec, register_dataset

__all__ = [
    "CALTECH101_MD5",
    "CALTECH101_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLIT_SIZES",
    "SUBSETS",
    "Caltech101",
    "caltech101_info",
    "caltech101_split",
    "find_caltech101",
    "locate_caltech101",
]

# The archive torchvision downloads: a zip that nests 101_ObjectCategories.tar.gz.
CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
CALTECH101_MD5 = "3138e1922a9193bfa496528edbbc45d0"
CALTECH101_INNER_MD5 = "b224c7392d521a49829488ab0f1120d9"  # 101_ObjectCategories.tar.gz
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = "BACKGROUND_Google"
SPLIT_SIZES = {"train": 65, "val": 15, "test": 21}
SUBSETS = ("train", "val", "test", "all")
_JPEG = (".jpg", ".jpeg")
_VERSION = "caltech101-v1"


_LAYOUTS = (
    "caltech101/101_ObjectCategories",  # also torchvision's Caltech101(root) layout
    "caltech-101/101_ObjectCategories",  # the official zip, extracted as is
    "101_ObjectCategories",
)


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    return data_candidates(root, _LAYOUTS)


def find_caltech101(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``101_ObjectCategories`` folder under a data root (:func:`metafew.paths.data_roots`), or None."""
    return find_data(root, _LAYOUTS, Path.is_dir)


def locate_caltech101(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The ``101_ObjectCategories`` folder, downloading it when missing and ``download`` is set."""
    folder = find_caltech101(root)
    if folder is None:
        if not download or offline():
            raise dataset_not_found("Caltech-101", _candidates(root), "caltech101", CALTECH101_URL)
        folder = _download(root)
    return folder


def _download(root: str | os.PathLike[str] | None) -> Path:
    dest = data_root(root) / "caltech101"
    with making_dirs(dest):  # removed again, when it was made here, if anything fails
        work = Path(tempfile.mkdtemp(dir=dest, prefix=".caltech-"))
        try:
            download_and_extract(CALTECH101_URL, CALTECH101_MD5, work)
            inner = next(work.rglob("101_ObjectCategories.tar.gz"), None)
            if inner is None:
                raise DatasetError(f"{CALTECH101_URL} did not contain 101_ObjectCategories.tar.gz")
            check_md5(inner, CALTECH101_INNER_MD5)
            extract_archive(inner, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest / "101_ObjectCategories"


def _listing(folder: Path) -> tuple[list[str], list[list[str]]]:
    """Class folder names (sorted, background included) and their sorted JPEG file names."""
    names, files = [], []
    with os.scandir(folder) as it:
        dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for d in dirs:
        with os.scandir(folder / d) as it:
            jpgs = sorted(e.name for e in it if e.name.lower().endswith(_JPEG) and not e.name.startswith("."))
        names.append(d)
        files.append(jpgs)
    return names, files


def caltech101_split(classes: list[str], seed: int = 0) -> dict[str, list[str]]:
    """The seeded class split: sorted object classes, shuffled by ``default_rng(seed)``, sliced 65/15/21."""
    objects = sorted(c for c in classes if c != BACKGROUND)
    order = np.random.default_rng(seed).permutation(len(objects))
    shuffled = [objects[i] for i in order]
    n_train, n_val = SPLIT_SIZES["train"], SPLIT_SIZES["val"]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
        "all": objects,
    }


def Caltech101(
    subset: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
    include_background: bool = False,
    seed: int = 0,
) -> FewShotDataset:
    """One class subset of Caltech-101 as a :class:`FewShotDataset` of RGB ``image_size`` squares.

    Args:
        subset: ``train`` (65 classes), ``val`` (15), ``test`` (21) or ``all`` (101).
        root: data root; images are in ``<root>/caltech101/101_ObjectCategories/<class>/*.jpg``.
        download: fetch the official archive when the images are missing.
        image_size: side of the square images.
        include_background: add ``BACKGROUND_Google`` as a class to ``train`` and ``all``.
        seed: seeds the class split (0 is the documented default split).
    """
    if subset not in SUBSETS:
        raise DatasetError(f"unknown Caltech-101 subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    folder = locate_caltech101(root, download)
    names, files = _listing(folder)
    objects = [n for n in names if n != BACKGROUND]
    if len(objects) != 101:
        raise DatasetError(f"{folder} has {len(objects)} object class folders; Caltech-101 has 101")
    split = caltech101_split(names, seed)
    wanted = list(split[subset])
    if include_background and subset in ("train", "all"):
        if BACKGROUND not in names:
            raise DatasetError(f"{folder / BACKGROUND} is missing but include_background=True")
        wanted.append(BACKGROUND)

    # One cached array for every image of every folder (background included), in listing order.
    rel = [f"{n}/{f}" for n, fs in zip(names, files) for f in fs]
    starts = np.cumsum([0] + [len(fs) for fs in files])
    pos = {n: i for i, n in enumerate(names)}
    index = np.concatenate([np.arange(starts[pos[c]], starts[pos[c] + 1]) for c in wanted])
    labels = np.repeat(np.arange(len(wanted)), [len(files[pos[c]]) for c in wanted])
    empty = [c for c in wanted if not files[pos[c]]]
    if empty:
        raise DatasetError(f"class folder {folder / empty[0]} has no JPEG images")
    key = cache_key(_VERSION, image_size, rel)

    def failed(bad: dict[int, str]) -> None:
        i, reason = next(iter(sorted(bad.items())))
        raise DatasetError(f"{folder / rel[i]}: could not be decoded ({reason})")

    def build() -> ChunkedArray:
        paths = [str(folder / r) for r in rel]
        return decode_files_chunked(paths, (image_size, image_size), 3, on_failures=failed, desc="decoding Caltech-101")

    def load() -> ChunkedArray:
        return take(cached_array(f"caltech101-{image_size}", key, build, sources=folder), index)

    return FewShotDataset(
        f"caltech101/{subset}" + ("" if seed == 0 else f"-seed{seed}"),
        labels,
        wanted,
        load,
        channels=3,
        image_size=(image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cache_key=cache_key(key, wanted),  # names the memory-mapped copy
    )


def caltech101_info(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts about the Caltech-101 folder: where it is and the classes/images per subset, from the listing.

    Raises DatasetNotFoundError (naming where it looked) when the folder is missing.
    """
    looked = [str(c) for c in _candidates(root)]
    folder = find_caltech101(root)
    if folder is None:
        raise dataset_not_found("Caltech-101", looked, "caltech101", CALTECH101_URL)
    names, files = _listing(folder)
    count = dict(zip(names, (len(f) for f in files)))
    split = caltech101_split(names)
    subsets = {s: {"classes": len(cs), "images": sum(count[c] for c in cs)} for s, cs in split.items()}
    return {"path": str(folder), "looked_in": looked, "subsets": subsets, "background_images": count.get(BACKGROUND, 0)}


def _download_spec(root: str | os.PathLike[str] | None = None) -> list[Path]:
    return [locate_caltech101(root, download=True)]


register_dataset(
    DatasetSpec(
        "caltech101",
        "Caltech-101, 101 object classes; seeded 65/15/21 class split (BACKGROUND_Google left out)",
        SUBSETS,
        "train",
        CALTECH101_URL,
        (3, 84, 84),
        load=Caltech101,  # Caltech101(subset, root, download, image_size=, include_background=, seed=)
        info=caltech101_info,
        download=_download_spec,
        options=("image_size", "include_background", "seed"),
    )
)
