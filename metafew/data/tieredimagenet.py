"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes grouped into 34 super-categories.

The split is by super-category, so test classes are far from training ones: ``train`` has
351 classes (20 super-categories), ``val`` 97 (6), ``test`` 160 (8), 779,165 images in all.
The class lists ship with metafew (``metafew/data/splits/tiered-imagenet/*.txt``, Ren et
al.'s ``tiered_imagenet_split`` CSVs: ``class wnid,super-category wnid``).

There is no official download any more; metafew reads the files of Ren et al.'s release
(``tiered-imagenet.tar``) from ``<root>/tiered-imagenet`` (also ``tieredimagenet``,
``tiered_imagenet``, ``tieredImageNet``), for each subset:

* ``{subset}_labels.pkl``: a dict with ``label_specific`` (class index of every image),
  ``label_general`` (super-category index), ``label_specific_str`` and
  ``label_general_str`` (their WordNet ids);
* the images, either as released, ``{subset}_images_png.pkl`` (a list of 84x84 PNG
  encodings, one per image), or as the ``{subset}_images.npz`` (``images``, uint8
  ``N x 84 x 84 x 3``) that Ren et al.'s ``decompress`` makes from it with OpenCV and that
  many code bases read instead. That array is in OpenCV's BGR order; metafew flips it to RGB
  (``npz_order="rgb"`` for an npz written in RGB). When both are there the PNGs are read.

Pickles are read with an unpickler that builds only numpy arrays. The classes found must be
those of Ren et al.'s split. Images are RGB ``image_size`` squares (84 by default), decoded
once over all cores and cached; ImageNet mean/std.

Memory: a pickle cannot be read in parts, so the first load of a subset from
``{subset}_images_png.pkl`` unpickles the whole list of PNG encodings at once: the peak
memory is about that file's size, held while the images are decoded a block at a time into
the cache file (the memory map of a dataset over the budget; the decoded array never exists
whole in memory on that path). Measured (tracemalloc, memory-mapped): 120 MiB for an 89 MiB
pickle of 2,910 PNGs (59 MiB decoded), the chunks in flight to the decode processes
included. Later loads read or map the cache and never open the pickle again. A ``{subset}_images.npz`` is read a block of rows at
a time. ``metafew data info tiered-imagenet`` says which applies (``memory``).
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import data_candidates, find_data
from .base import FewShotDataset, cache_key, cached_array
from .caltech101 import IMAGENET_MEAN, IMAGENET_STD
from .decode import DECODE_ERRORS, ChunkedArray, decode_error_reason, decoded_chunks, rows_per_block, take
from .download import dataset_not_found
from .packaged import as_text, decode_bytes, file_stamp, load_pickle, resize_array, split_fields, str_keys
from .registry import DatasetSpec, register_dataset

__all__ = ["LAYOUT", "SUBSETS", "TieredImageNet", "find_tiered_imagenet", "tiered_imagenet_info"]

SUBSETS = ("train", "val", "test")
PLACES = ("tiered-imagenet", "tieredimagenet", "tiered_imagenet", "tieredImageNet")
SOURCE = "https://github.com/renmengye/few-shot-ssl-public (tiered-imagenet.tar); images from ImageNet"
LAYOUT = (
    "{train,val,test}_labels.pkl (label_specific, label_general, label_specific_str) + "
    "{train,val,test}_images_png.pkl (list of PNG bytes) or {train,val,test}_images.npz (images N x 84 x 84 x 3)"
)
_VERSION = "tiered-imagenet-v1"


def _labels_file(folder: Path, subset: str) -> Path:
    return folder / f"{subset}_labels.pkl"


def _image_files(folder: Path, subset: str) -> tuple[Path, Path]:
    return folder / f"{subset}_images_png.pkl", folder / f"{subset}_images.npz"


def _has_subset(folder: Path, subset: str) -> bool:
    return _labels_file(folder, subset).is_file() and any(p.is_file() for p in _image_files(folder, subset))


def find_tiered_imagenet(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The tieredImageNet folder (a ``*_labels.pkl`` with its images) under the data roots, or None."""
    return find_data(root, PLACES, lambda p: p.is_dir() and any(_has_subset(p, s) for s in SUBSETS))


def _not_found(root: str | os.PathLike[str] | None, subset: str | None = None) -> DatasetNotFoundError:
    what = "tieredImageNet" + (f" {subset}" if subset else "")
    return dataset_not_found(
        f"{what} ({LAYOUT})", data_candidates(root, PLACES), "tiered-imagenet", SOURCE, can_download=False
    )


def split_table(subset: str) -> dict[str, str]:
    """``{class wnid: super-category wnid}`` of Ren et al.'s ``subset`` split, in file order."""
    return {fields[0]: fields[1] for fields in split_fields("tiered-imagenet", subset)}


@functools.lru_cache(maxsize=6)
def _read_labels_cached(path: Path, stamp: tuple[Any, ...], subset: str) -> tuple[np.ndarray, list[str], list[str]]:
    d = str_keys(load_pickle(path), str(path))
    try:
        specific = np.asarray(d["label_specific"], dtype=np.int64).reshape(-1)
        names = as_text(d["label_specific_str"])
        general = as_text(d.get("label_general_str", []))
    except KeyError as e:
        raise DatasetError(f"{path} lacks {e.args[0]!r}: expected label_specific and label_specific_str") from e
    if len(specific) and (specific.min() < 0 or specific.max() >= len(names)):
        raise DatasetError(f"{path}: label_specific falls outside 0..{len(names) - 1}")
    wanted = split_table(subset)
    if set(names) != set(wanted):
        extra, missing = sorted(set(names) - set(wanted)), sorted(set(wanted) - set(names))
        what = f"class {extra[0]!r} is not" if extra else f"class {missing[0]!r} of the split is missing"
        raise DatasetError(
            f"{path}: {what} in Ren et al.'s {subset} split ({len(names)} classes, {len(wanted)} expected)"
        )
    return specific, names, general


def _read_labels(folder: Path, subset: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Class index of every image, the class wnids (label order) and the super-category wnids."""
    path = _labels_file(folder, subset)
    return _read_labels_cached(path, tuple(file_stamp([path])), subset)


def _decode_chunk(items: Sequence[Any], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: PNG encodings to uint8 ``[n, 3, size, size]``; ``(position in the chunk, reason)`` of bad ones."""
    out = np.zeros((len(items), 3, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for j, data in enumerate(items):
        try:
            out[j] = decode_bytes(data, (size, size), 3)
        except DECODE_ERRORS as e:
            bad.append((j, decode_error_reason(e)))
    return out, bad


def _decode_png_pickle(path: Path, n: int, size: int) -> ChunkedArray:
    """The PNG pickle, decoded over the pool a chunk at a time (the encodings are read whole: a pickle)."""
    encoded = load_pickle(path)
    if not isinstance(encoded, (list, tuple)):
        raise DatasetError(f"{path}: expected a pickled list of PNG encodings, got {type(encoded).__name__}")
    if len(encoded) != n:
        raise DatasetError(f"{path}: {len(encoded)} images but {n} labels")

    def failed(bad: dict[int, str]) -> None:
        i, reason = min(bad.items())
        more = f" ({len(bad) - 1} more bad image(s))" if len(bad) > 1 else ""
        raise DatasetError(f"{path}: image {i} could not be decoded ({reason}){more}")

    decode = functools.partial(_decode_chunk, size=size)
    return decoded_chunks(decode, encoded, (n, 3, size, size), on_failures=failed, desc="decoding tieredImageNet")


def _read_npz(path: Path, n: int, size: int, order: str) -> ChunkedArray:
    """The ``images`` of the npz read a block of rows at a time from its zip member (stored or deflated),
    flipped to RGB when ``order == "bgr"``, channels first, resized: never the whole array in memory."""

    def not_readable(e: BaseException) -> DatasetError:
        return DatasetError(f"{path}: not a readable npz with an 'images' array ({type(e).__name__}: {e})")

    def blocks() -> Iterator[np.ndarray]:
        try:
            with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_2_0 if version == (2, 0) else None
                shape, fortran, dtype = (read_header or np.lib.format.read_array_header_1_0)(f)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                    raise DatasetError(f"{path}: images is {dtype} {shape}, expected uint8 N x H x W x 3")
                if shape[0] != n:
                    raise DatasetError(f"{path}: {shape[0]} images but {n} labels")
                row = shape[1] * shape[2] * 3
                per = rows_per_block((3, max(size, shape[1]), max(size, shape[2])))
                for lo in range(0, n, per):
                    k = min(per, n - lo)
                    data = f.read(k * row)
                    if len(data) != k * row:
                        raise EOFError(f"the array ends after {lo * row + len(data):,} of {n * row:,} bytes")
                    hwc = np.frombuffer(data, dtype=np.uint8).reshape(k, shape[1], shape[2], 3)
                    if order == "bgr":
                        hwc = hwc[..., ::-1]
                    yield resize_array(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)), (size, size))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise not_readable(e) from e

    return ChunkedArray((n, 3, size, size), blocks)


def TieredImageNet(
    subset: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 84,
    npz_order: str = "bgr",
) -> FewShotDataset:
    """One subset of tieredImageNet (``train`` 351, ``val`` 97, ``test`` 160 classes) as a :class:`FewShotDataset`.

    Args:
        subset: ``train``, ``val`` or ``test``.
        root: data root; the files are in ``<root>/tiered-imagenet/`` (see :data:`LAYOUT`).
        download: accepted for symmetry; there is no official download, so a missing dataset is a
            DatasetNotFoundError saying which files to put where.
        image_size: side of the square RGB images (84 is the standard).
        npz_order: channel order of a ``{subset}_images.npz``: ``"bgr"`` (Ren et al.'s decompress) or ``"rgb"``.
    """
    if subset not in SUBSETS:
        raise DatasetError(f"unknown tieredImageNet subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    if npz_order not in ("bgr", "rgb"):
        raise DatasetError(f"npz_order must be 'bgr' or 'rgb', got {npz_order!r}")
    folder = find_tiered_imagenet(root)
    if folder is None:
        raise _not_found(root)
    if not _has_subset(folder, subset):
        raise _not_found(root, subset)
    specific, names, _ = _read_labels(folder, subset)
    wanted = list(split_table(subset))
    remap = np.asarray([wanted.index(n) for n in names], dtype=np.int64)  # label order -> split-file order
    order = np.argsort(remap[specific], kind="stable")  # group images by class, in split-file order
    labels = remap[specific][order]
    png, npz = _image_files(folder, subset)
    source = png if png.is_file() else npz
    key = cache_key(_VERSION, image_size, file_stamp([source]), npz_order if source == npz else "png")
    n = len(specific)

    def build() -> ChunkedArray:
        if source == png:
            return _decode_png_pickle(png, n, image_size)
        return _read_npz(npz, n, image_size, npz_order)

    grouped = bool(np.array_equal(order, np.arange(n)))  # Ren et al.'s files are stored class by class

    def load() -> np.ndarray | ChunkedArray:
        full = cached_array(f"tiered-imagenet-{subset}-{image_size}", key, build)
        return full if grouped else take(full, order)

    return FewShotDataset(
        f"tiered-imagenet/{subset}",
        labels,
        wanted,
        load,
        channels=3,
        image_size=(image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cache_key=cache_key(key, file_stamp([_labels_file(folder, subset)])),  # names the memory-mapped copy
    )


def tiered_imagenet_info(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts for ``metafew data info tiered-imagenet``: where it is, which image files each subset
    has (and their size), classes, super-categories and images per subset (from the label pickles).

    Raises DatasetNotFoundError (naming where it looked and the layout) when it is missing.
    """
    looked = [str(p) for p in data_candidates(root, PLACES)]
    folder = find_tiered_imagenet(root)
    if folder is None:
        raise _not_found(root)
    subsets: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    pickles: dict[str, int] = {}  # subset -> size of the PNG pickle its images come from
    for s in SUBSETS:
        png, npz = _image_files(folder, s)
        if not _has_subset(folder, s):
            subsets[s] = {"classes": 0, "images": 0}
            files[s] = f"absent ({_labels_file(folder, s).name} + {png.name} or {npz.name} expected)"
            continue
        specific, names, _ = _read_labels(folder, s)
        source = png if png.is_file() else npz
        files[s] = f"{source.name}, {source.stat().st_size / 2**20:.0f} MB"
        if source == png:
            pickles[s] = source.stat().st_size
        supers = len(set(split_table(s).values()))
        subsets[s] = {"classes": len(names), "images": len(specific), "super_categories": supers}
    info: dict[str, Any] = {"path": str(folder), "layout": LAYOUT, "looked_in": looked, "files": files}
    if pickles:
        largest = max(pickles, key=lambda s: pickles[s])
        info["memory"] = (
            f"the first load of a subset from its PNG pickle ({', '.join(pickles)}) reads the pickle whole (a pickle "
            f"cannot be read in parts): peak memory about the pickle's size (up to {pickles[largest] / 2**20:.0f} MB, "
            f"{largest}) while the images are decoded a block at a time into the cache / memory map; later loads "
            "only read or map the cache; an npz is read a block of rows at a time"
        )
    return {**info, "subsets": subsets}


def _load(subset: str, root: str | os.PathLike[str] | None, download: bool, **options: Any) -> FewShotDataset:
    return TieredImageNet(subset, root, download, **options)


register_dataset(
    DatasetSpec(
        "tiered-imagenet",
        "tieredImageNet (Ren et al. 2018): 351/97/160 ImageNet classes in 20/6/8 super-categories (84x84 RGB)",
        SUBSETS,
        "train",
        SOURCE,
        (3, 84, 84),
        load=_load,
        info=tiered_imagenet_info,
        options=("image_size", "npz_order"),
    )
)
