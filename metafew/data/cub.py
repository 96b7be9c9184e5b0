"""CUB-200-2011 (Wah et al. 2011) with the few-shot class split of Chen et al. (2019).

200 bird species, 11,788 photos. The split of "A Closer Look at Few-shot Classification"
(Chen et al. 2019, ``CloserLookFewShot``): the 200 class folders sorted by name, class ``i``
(0-based) is ``train`` when ``i % 2 == 0`` (100 classes), ``val`` when ``i % 4 == 1`` (50) and
``test`` when ``i % 4 == 3`` (50). The lists ship with metafew
(``metafew/data/splits/cub/*.txt``).

The data is the official ``CUB_200_2011.tgz`` (Caltech DATA, md5-checked), extracted:
``CUB_200_2011/images/NNN.Name/*.jpg`` with ``classes.txt`` (``1 001.Black_footed_Albatross``)
and ``images.txt`` (``1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``),
looked for in ``<root>/cub/CUB_200_2011`` and ``<root>/CUB_200_2011``; the archive lying
in one of those folders is extracted next to itself, and ``download=True`` fetches it.
Images are RGB ``image_size`` squares (84 by default: scaled to cover, center-cropped,
bicubic; grayscale photos converted), decoded once over all cores and cached; ImageNet mean/std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..paths import data_candidates, data_root, find_data
from .base import FewShotDataset, cache_key, cached_array
from .caltech101 import IMAGENET_MEAN, IMAGENET_STD
from .decode import ChunkedArray, decode_files_chunked
from .download import check_md5, dataset_not_found, download_file, extract_archive
from .packaged import split_classes
from .registry import DatasetSpec, register_dataset

__all__ = ["CUB", "CUB_MD5", "CUB_URL", "LAYOUT", "SUBSETS", "chen_split", "cub_info", "find_cub", "locate_cub"]

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
SUBSETS = ("train", "val", "test")
PLACES = ("cub", "")  # <root>/cub/CUB_200_2011, <root>/CUB_200_2011
LAYOUT = f"{FOLDER}/images/NNN.Name/*.jpg + classes.txt + images.txt (the official {ARCHIVE}, extracted)"
_VERSION = "cub-v1"


def _rel(name: str) -> list[str]:
    return [f"{p}/{name}" if p else name for p in PLACES]


def _is_cub(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "images.txt").is_file() and (folder / "classes.txt").is_file()


def find_cub(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The extracted ``CUB_200_2011`` folder under the data roots, or None."""
    return find_data(root, _rel(FOLDER), _is_cub)


def _not_found(root: str | os.PathLike[str] | None) -> DatasetNotFoundError:
    looked = [*data_candidates(root, _rel(FOLDER)), *data_candidates(root, _rel(ARCHIVE))]
    return dataset_not_found(f"CUB-200-2011 ({LAYOUT})", looked, "cub", CUB_URL)


def locate_cub(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The ``CUB_200_2011`` folder: found, else extracted from an archive lying there, else downloaded (md5-checked)."""
    folder = find_cub(root)
    if folder is not None:
        return folder
    archive = find_data(root, _rel(ARCHIVE), Path.is_file)
    if archive is None and download:
        archive = download_file(CUB_URL, data_root(root) / "cub" / ARCHIVE, CUB_MD5)
    if archive is None:
        raise _not_found(root)
    check_md5(archive, CUB_MD5)
    extract_archive(archive, archive.parent)
    if not _is_cub(archive.parent / FOLDER):
        raise DatasetError(f"{archive} did not contain {FOLDER}/images, classes.txt and images.txt")
    return archive.parent / FOLDER


def chen_split(classes: list[str]) -> dict[str, list[str]]:
    """Chen et al.'s rule on the sorted class names: ``i % 2 == 0`` train, ``i % 4 == 1`` val, ``i % 4 == 3`` test."""
    ordered = sorted(classes)
    return {
        "train": [c for i, c in enumerate(ordered) if i % 2 == 0],
        "val": [c for i, c in enumerate(ordered) if i % 4 == 1],
        "test": [c for i, c in enumerate(ordered) if i % 4 == 3],
    }


def _numbered(path: Path) -> list[str]:
    """The second field of every ``<id> <value>`` line of ``classes.txt`` / ``images.txt``."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path} line {i}: expected '<id> <name>', got {line!r}")
        out.append(parts[1].strip())
    return out


def _listing(folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The class names of ``classes.txt`` and ``{class: [image paths relative to images/]}`` of ``images.txt``."""
    classes = _numbered(folder / "classes.txt")
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for rel in _numbered(folder / "images.txt"):
        cls = rel.partition("/")[0]
        if cls not in by_class:
            raise DatasetError(f"{folder / 'images.txt'} lists {rel!r}, whose class is not in classes.txt")
        by_class[cls].append(rel)
    return classes, by_class


def _subset_classes(folder: Path, classes: list[str], subset: str) -> list[str]:
    wanted = split_classes("cub", subset)
    missing = [c for c in wanted if c not in set(classes)]
    if missing:
        raise DatasetError(f"{folder / 'classes.txt'} lacks class {missing[0]!r} of Chen et al.'s {subset} split")
    return wanted


def CUB(
    subset: str = "train", root: str | os.PathLike[str] | None = None, download: bool = False, image_size: int = 84
) -> FewShotDataset:
    """One subset of CUB-200-2011, Chen et al. split (``train`` 100, ``val`` 50, ``test`` 50 classes).

    Args:
        subset: ``train``, ``val`` or ``test``.
        root: data root; the images are in ``<root>/cub/CUB_200_2011/`` (or ``<root>/CUB_200_2011/``).
        download: fetch the official archive (md5-checked) when it is missing.
        image_size: side of the square RGB images (84 is the standard).
    """
    if subset not in SUBSETS:
        raise DatasetError(f"unknown CUB subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    folder = locate_cub(root, download)
    classes, by_class = _listing(folder)
    wanted = _subset_classes(folder, classes, subset)
    empty = [c for c in wanted if not by_class[c]]
    if empty:
        raise DatasetError(f"{folder / 'images.txt'} lists no image of class {empty[0]!r}")
    rel = [r for c in wanted for r in by_class[c]]
    labels = np.repeat(np.arange(len(wanted)), [len(by_class[c]) for c in wanted])
    key = cache_key(_VERSION, image_size, str(folder.resolve()), rel)

    paths = [str(folder / "images" / r) for r in rel]

    def failed(bad: dict[int, str]) -> None:
        i, reason = min(bad.items())
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DatasetError(f"{paths[i]}: could not be decoded ({reason}){more}")

    def build() -> ChunkedArray:
        size = (image_size, image_size)
        return decode_files_chunked(paths, size, 3, on_failures=failed, desc="decoding CUB-200-2011")

    def load() -> np.ndarray:
        return cached_array(f"cub-{subset}-{image_size}", key, build)

    return FewShotDataset(
        f"cub/{subset}",
        labels,
        wanted,
        load,
        channels=3,
        image_size=(image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cache_key=key,  # names the memory-mapped copy (the decoded cache itself: it is the whole subset)
    )


def cub_info(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts for ``metafew data info cub``: where it is, the layout, classes/images per subset (from
    ``classes.txt`` and ``images.txt``; no image is opened).

    Raises DatasetNotFoundError (naming where it looked and the layout) when it is missing.
    """
    looked = [str(p) for p in data_candidates(root, _rel(FOLDER))]
    folder = find_cub(root)
    if folder is None:
        raise _not_found(root)
    classes, by_class = _listing(folder)
    subsets = {}
    for s in SUBSETS:
        wanted = _subset_classes(folder, classes, s)
        subsets[s] = {"classes": len(wanted), "images": sum(len(by_class[c]) for c in wanted)}
    return {"path": str(folder), "layout": LAYOUT, "looked_in": looked, "subsets": subsets}


def _load(subset: str, root: str | os.PathLike[str] | None, download: bool, **options: Any) -> FewShotDataset:
    return CUB(subset, root, download, **options)


def _download(root: str | os.PathLike[str] | None = None) -> list[Path]:
    return [locate_cub(root, download=True)]


register_dataset(
    DatasetSpec(
        "cub",
        "CUB-200-2011 birds, Chen et al. 2019 split: 100/50/50 classes (84x84 RGB)",
        SUBSETS,
        "train",
        CUB_URL,
        (3, 84, 84),
        load=_load,
        info=cub_info,
        download=_download,
        options=("image_size",),
    )
)
