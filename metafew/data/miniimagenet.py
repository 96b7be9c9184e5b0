"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

100 ImageNet classes of 600 images each, split into 64 ``train``, 16 ``val`` and 20
``test`` classes (the split of Ravi & Larochelle's ``train.csv``/``val.csv``/``test.csv``;
the class lists ship with metafew, ``metafew/data/splits/mini-imagenet/*.txt``).

There is no official download any more (the images came from ImageNet under its terms),
so metafew reads the two layouts the dataset circulates in, from ``<root>/mini-imagenet``
(also ``miniimagenet``, ``mini_imagenet``, ``miniImageNet``):

* **CSV + images** (Ravi & Larochelle's layout, used by most code bases):
  ``{train,val,test}.csv`` with a ``filename,label`` header and one line per image, and
  an ``images/`` folder holding those JPEGs (``images/n0153282900000005.jpg``, or
  ``images/<wnid>/<file>``). Without the CSVs, ``images/`` alone is read with the packaged
  split (the class of ``n0153282900000005.jpg`` is its first 9 characters, or its folder).
* **pickles** (Ren et al. 2018's cache): ``mini-imagenet-cache-{train,val,test}.pkl``, each a
  dict with ``image_data`` (uint8 ``N x 84 x 84 x 3``, RGB) and ``class_dict``
  (``{wnid: [indices]}``), read with an unpickler that builds only numpy arrays.

The classes found must be exactly those of the Ravi split (another split is refused: read it
with ``folder:PATH``). Images are RGB ``image_size`` squares (84 by default; JPEGs are scaled
to cover and center-cropped, bicubic), decoded once and cached; ImageNet mean/std.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import data_candidates, find_data
from .base import FewShotDataset, cache_key, cached_array
from .caltech101 import IMAGENET_MEAN, IMAGENET_STD
from .decode import ChunkedArray, decode_files_chunked, is_image_file, take
from .download import dataset_not_found
from .packaged import file_stamp, load_pickle, resize_array, split_classes, str_keys
from .registry import DatasetSpec, register_dataset

__all__ = ["LAYOUTS", "SUBSETS", "MiniImageNet", "find_mini_imagenet", "locate_mini_imagenet", "mini_imagenet_info"]

SUBSETS = ("train", "val", "test")
PLACES = ("mini-imagenet", "miniimagenet", "mini_imagenet", "miniImageNet")
SOURCE = "https://github.com/twitter-research/meta-learning-lstm (split CSVs); images from ImageNet"
LAYOUTS = (
    "{train,val,test}.csv (filename,label) + images/*.jpg (Ravi & Larochelle), "
    "or mini-imagenet-cache-{train,val,test}.pkl (image_data N x 84 x 84 x 3 + class_dict)"
)
_VERSION = "mini-imagenet-v1"


def _pickle(folder: Path, subset: str) -> Path:
    return folder / f"mini-imagenet-cache-{subset}.pkl"


def _layout(folder: Path) -> str | None:
    """``"csv"``, ``"pickle"``, ``"images"`` (images/ without CSVs) or None for a folder without the data."""
    if (folder / "images").is_dir() and all((folder / f"{s}.csv").is_file() for s in SUBSETS):
        return "csv"
    if any(_pickle(folder, s).is_file() for s in SUBSETS):
        return "pickle"
    if (folder / "images").is_dir():
        return "images"
    return None


def find_mini_imagenet(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The mini-ImageNet folder (CSVs + ``images/``, or the pickles) under the data roots, or None."""
    return find_data(root, PLACES, lambda p: p.is_dir() and _layout(p) is not None)


def locate_mini_imagenet(root: str | os.PathLike[str] | None = None) -> Path:
    """The mini-ImageNet folder, or a DatasetNotFoundError naming the layouts and where it looked."""
    folder = find_mini_imagenet(root)
    if folder is None:
        raise _not_found(root)
    return folder


def _not_found(root: str | os.PathLike[str] | None) -> DatasetNotFoundError:
    return dataset_not_found(
        f"mini-ImageNet ({LAYOUTS})",
        data_candidates(root, PLACES),
        "mini-imagenet",
        SOURCE,
        can_download=False,
    )


def _check_classes(found: set[str], subset: str, where: Path) -> list[str]:
    wanted = split_classes("mini-imagenet", subset)
    if found != set(wanted):
        extra, missing = sorted(found - set(wanted)), sorted(set(wanted) - found)
        what = f"class {extra[0]!r} is not" if extra else f"class {missing[0]!r} of the split is missing"
        raise DatasetError(
            f"{where}: {what} in the Ravi & Larochelle {subset} split ({len(found)} classes found, "
            f"{len(wanted)} expected); read other splits with folder:PATH"
        )
    return wanted


def _csv_files(folder: Path, subset: str) -> dict[str, list[str]]:
    """``{wnid: [file names]}`` of ``<subset>.csv``, in file order."""
    path = folder / f"{subset}.csv"
    out: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DatasetError(f"{path}: expected a 'filename,label' header line, got {rows[0] if rows else 'nothing'}")
    for i, row in enumerate(rows[1:], 2):
        if len(row) < 2:
            raise DatasetError(f"{path} line {i}: expected 'filename,label', got {','.join(row)!r}")
        out.setdefault(row[1].strip(), []).append(row[0].strip())
    return out


def _image_listing(images: Path) -> dict[str, list[str]]:
    """``{wnid: [paths relative to images/]}`` from the folder: flat Ravi names, or one sub-folder per class."""
    out: dict[str, list[str]] = {}
    with os.scandir(images) as it:
        entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
    for name, is_dir in entries:
        if is_dir:
            with os.scandir(images / name) as it:
                files = sorted(e.name for e in it if is_image_file(e.name) and not e.name.startswith("."))
            out.setdefault(name, []).extend(f"{name}/{f}" for f in files)
        elif is_image_file(name):
            out.setdefault(name[:9], []).append(name)
    return out


def _files(folder: Path, layout: str, subset: str) -> tuple[list[str], list[list[str]]]:
    """The split's classes and, per class, image paths relative to ``folder``."""
    images = folder / "images"
    if layout == "csv":
        by_class = _csv_files(folder, subset)
        wanted = _check_classes(set(by_class), subset, folder / f"{subset}.csv")
        first = by_class[wanted[0]][0]
        nested = not (images / first).exists() and (images / wanted[0] / first).exists()
        rel = [[f"images/{c}/{f}" if nested else f"images/{f}" for f in by_class[c]] for c in wanted]
        return wanted, rel
    listing = _image_listing(images)
    wanted = split_classes("mini-imagenet", subset)
    missing = [c for c in wanted if not listing.get(c)]
    if missing:
        raise DatasetError(f"{images} has no images of class {missing[0]!r} of the Ravi {subset} split")
    return wanted, [[f"images/{f}" for f in listing[c]] for c in wanted]


def _from_files(folder: Path, layout: str, subset: str, image_size: int) -> FewShotDataset:
    classes, rel = _files(folder, layout, subset)
    flat = [r for rs in rel for r in rs]
    labels = np.repeat(np.arange(len(classes)), [len(rs) for rs in rel])
    key = cache_key(_VERSION, image_size, str(folder.resolve()), flat)

    def failed(bad: dict[int, str]) -> None:
        i, reason = min(bad.items())
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DatasetError(f"{folder / flat[i]}: could not be decoded ({reason}){more}")

    def build() -> ChunkedArray:
        paths, size = [str(folder / r) for r in flat], (image_size, image_size)
        return decode_files_chunked(paths, size, 3, on_failures=failed, desc="decoding mini-ImageNet")

    def load() -> np.ndarray:
        return cached_array(f"mini-imagenet-{subset}-{image_size}", key, build)

    return _dataset(subset, labels, classes, load, image_size, key)


def _read_cache_pickle(path: Path, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 84, 84], [2, M] int64 of (pickle index, label))`` from one cache pickle."""
    d = str_keys(load_pickle(path), str(path))
    if "image_data" not in d or "class_dict" not in d:
        raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict', got keys {sorted(d)}")
    images = np.asarray(d["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(f"{path}: image_data is {images.dtype} {images.shape}, expected uint8 N x H x W x 3")
    class_dict = str_keys(d["class_dict"], f"{path} class_dict")
    wanted = _check_classes(set(class_dict), subset, path)
    index = [np.asarray(class_dict[c], dtype=np.int64) for c in wanted]
    flat = np.concatenate(index)
    if len(flat) and (flat.min() < 0 or flat.max() >= len(images)):
        raise DatasetError(f"{path}: class_dict indexes images outside 0..{len(images) - 1}")
    labels = np.repeat(np.arange(len(wanted)), [len(i) for i in index])
    return images.transpose(0, 3, 1, 2), np.stack([flat, labels])


def _from_pickle(folder: Path, subset: str, image_size: int) -> FewShotDataset:
    path = _pickle(folder, subset)
    if not path.is_file():
        present = [s for s in SUBSETS if _pickle(folder, s).is_file()]
        raise DatasetNotFoundError(
            f"mini-ImageNet {subset} not found: {path} is missing (this folder has the pickles of {', '.join(present)})"
        )
    key = cache_key(_VERSION, image_size, file_stamp([path]))
    name = f"mini-imagenet-{subset}-{image_size}"

    def images_of(read: tuple[np.ndarray, np.ndarray]) -> ChunkedArray:
        images, index = read
        size = (image_size, image_size)
        return take(images, index[0], lambda block, _: resize_array(block, size), (3, *size))

    def build_index() -> np.ndarray:
        read = _read_cache_pickle(path, subset)
        cached_array(name, key, lambda: images_of(read), mapped=True)  # one read of the pickle fills both caches
        return read[1]

    index = cached_array(f"mini-imagenet-{subset}-index", key, build_index)
    classes = split_classes("mini-imagenet", subset)

    def load() -> np.ndarray:
        return cached_array(name, key, lambda: images_of(_read_cache_pickle(path, subset)))

    return _dataset(subset, index[1], classes, load, image_size, key)


def _dataset(
    subset: str, labels: np.ndarray, classes: list[str], load: Any, image_size: int, key: str
) -> FewShotDataset:
    return FewShotDataset(
        f"mini-imagenet/{subset}",
        labels,
        classes,
        load,
        channels=3,
        image_size=(image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cache_key=key,  # names the memory-mapped copy (the decoded cache itself: it is the whole subset)
    )


def MiniImageNet(
    subset: str = "train", root: str | os.PathLike[str] | None = None, download: bool = False, image_size: int = 84
) -> FewShotDataset:
    """One subset of mini-ImageNet, Ravi split (``train`` 64, ``val`` 16, ``test`` 20 classes of 600 images).

    Args:
        subset: ``train``, ``val`` or ``test``.
        root: data root; the data is in ``<root>/mini-imagenet/`` in one of :data:`LAYOUTS`.
        download: accepted for symmetry; there is no official download, so a missing dataset
            is a DatasetNotFoundError saying which files to put where.
        image_size: side of the square RGB images (84 is the standard).
    """
    if subset not in SUBSETS:
        raise DatasetError(f"unknown mini-ImageNet subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    folder = locate_mini_imagenet(root)
    layout = _layout(folder)
    if layout == "pickle":
        return _from_pickle(folder, subset, image_size)
    assert layout is not None
    return _from_files(folder, layout, subset, image_size)


def mini_imagenet_info(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts for ``metafew data info mini-imagenet``: where it is, which layout, the classes/images
    of each subset (from the CSVs or the file listing; for the pickles, their size: images are counted on load).

    Raises DatasetNotFoundError (naming where it looked and the layouts) when it is missing.
    """
    looked = [str(p) for p in data_candidates(root, PLACES)]
    folder = find_mini_imagenet(root)
    if folder is None:
        raise _not_found(root)
    layout = _layout(folder)
    subsets: dict[str, dict[str, Any]] = {}
    files: dict[str, Any] = {}
    for s in SUBSETS:
        n_classes = len(split_classes("mini-imagenet", s))
        if layout == "pickle":
            p = _pickle(folder, s)
            files[s] = f"{p.name}, {p.stat().st_size / 2**20:.0f} MB" if p.is_file() else f"{p.name} absent"
            subsets[s] = {"classes": n_classes if p.is_file() else 0, "images": None if p.is_file() else 0}
        else:
            assert layout is not None
            _, rel = _files(folder, layout, s)
            subsets[s] = {"classes": len(rel), "images": sum(len(r) for r in rel)}
    info: dict[str, Any] = {"path": str(folder), "layout": layout, "looked_in": looked, "subsets": subsets}
    if files:
        info["files"] = files
    return info


def _load(subset: str, root: str | os.PathLike[str] | None, download: bool, **options: Any) -> FewShotDataset:
    return MiniImageNet(subset, root, download, **options)


register_dataset(
    DatasetSpec(
        "mini-imagenet",
        "mini-ImageNet, Ravi & Larochelle split: 64/16/20 ImageNet classes of 600 images (84x84 RGB)",
        SUBSETS,
        "train",
        SOURCE,
        (3, 84, 84),
        load=_load,
        info=mini_imagenet_info,
        options=("image_size",),
    )
)
