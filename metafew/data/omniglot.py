"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1,623 handwritten characters, 20 drawings each.

Two class splits:

* ``split="vinyals"`` (Vinyals et al. 2016, as used by Prototypical Networks): every
  character in 4 rotations (0/90/180/270 degrees) is a class; ``train``/``val``/``test``
  have 4112/688/1692 classes (1028/172/423 characters), ``trainval`` = train + val.
  The split lists ship with metafew (``metafew/data/splits/omniglot_vinyals_*.txt``).
* ``split="lake"``: Lake et al.'s ``background`` (964 characters, 30 alphabets) and
  ``evaluation`` (659 characters, 20 alphabets) sets, unrotated.

All 32,460 PNGs are decoded once (in a process pool) into one uint8 array at
``image_size`` (PIL LANCZOS), inverted so strokes are 255 on a 0 background, and cached;
rotations are applied in memory when a split is built (``np.rot90`` of the uint8 array,
identical to ``torch.rot90`` and ~3x faster here; counter-clockwise, like PIL's ``rotate``).
Class names and labels come from the file listing alone; images load lazily.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..paths import data_candidates, data_root, find_data
from .base import FewShotDataset, cache_key, cached_array
from .decode import DECODE_ERRORS, ChunkedArray, decode_drawing, decode_error_reason, decoded_chunks, take
from .download import dataset_not_found, download_and_extract_all, offline
from .registry import DatasetSpec, register_dataset

__all__ = [
    "OMNIGLOT_MD5",
    "OMNIGLOT_MEAN",
    "OMNIGLOT_STD",
    "OMNIGLOT_URLS",
    "SUBSETS",
    "Omniglot",
    "decode_drawing",  # lives in .decode; re-exported
    "find_omniglot",
    "locate_omniglot",
    "omniglot_images",
    "omniglot_info",
    "split_lines",
]

OMNIGLOT_URLS = {
    "images_background": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SETS = ("images_background", "images_evaluation")
SUBSETS = {"vinyals": ("train", "val", "test", "trainval"), "lake": ("background", "evaluation")}

# Mean and std of all 19,280 images_background drawings, decoded as here (28x28 LANCZOS,
# inverted: strokes 255), over every pixel, in [0, 1] units; computed once with
# metafew.data.normalize.channel_stats(omniglot_images()[:19280]). Rotations leave
# them unchanged; other image sizes differ only slightly.
OMNIGLOT_MEAN = (0.0815,)
OMNIGLOT_STD = (0.2359,)

_VERSION = "omniglot-v1"  # bump when the decode changes


def find_omniglot(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding ``images_background/`` and ``images_evaluation/``, or None.

    Looks in ``<root>/omniglot``, torchvision's ``<root>/omniglot-py`` and ``<root>`` itself,
    for each data root (:func:`metafew.paths.data_roots`).
    """
    return find_data(root, _LAYOUTS, lambda c: all((c / s).is_dir() for s in SETS))


_LAYOUTS = ("omniglot", "omniglot-py", "")


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    return data_candidates(root, _LAYOUTS)


def locate_omniglot(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The folder holding both image sets, downloading the official zips when missing and ``download`` is set."""
    found = find_omniglot(root)
    if found is not None:
        return found
    if download and not offline():  # both zips arrive and pass their md5 before either is extracted
        dest = data_root(root) / "omniglot"
        download_and_extract_all([(OMNIGLOT_URLS[s], OMNIGLOT_MD5[s]) for s in SETS if not (dest / s).is_dir()], dest)
        return dest
    raise dataset_not_found(
        "Omniglot (images_background/ and images_evaluation/)",
        [c / "images_background" for c in _candidates(root)],
        "omniglot",
        list(OMNIGLOT_URLS.values()),
    )


def _listing(base: Path) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray, int]:
    """``(character keys "Alphabet/characterNN", relative file paths, start offset per character + end,
    number of images_background characters)``, sorted by set, alphabet, character, file name.

    No image is opened; the result is memoised per folder (and its mtime) within a process.
    """
    stamp = tuple((base / s).stat().st_mtime_ns for s in SETS)
    return _listing_cached(base, stamp)


@functools.lru_cache(maxsize=4)
def _listing_cached(base: Path, stamp: tuple[int, ...]) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray, int]:
    chars: list[str] = []
    files: list[str] = []
    starts = [0]
    n_background = 0
    for s in SETS:
        set_dir = os.path.join(base, s)
        for a in _subdirs(set_dir):
            alphabet_dir = os.path.join(set_dir, a)
            for c in _subdirs(alphabet_dir):
                with os.scandir(os.path.join(alphabet_dir, c)) as it:
                    pngs = sorted(e.name for e in it if e.name.endswith((".png", ".PNG")))
                prefix = f"{s}/{a}/{c}/"
                chars.append(f"{a}/{c}")
                files.extend([prefix + f for f in pngs])
                starts.append(len(files))
        if s == "images_background":
            n_background = len(chars)
    return tuple(chars), tuple(files), np.asarray(starts, dtype=np.int64), n_background


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _decode_chunk(paths: list[str], base: str, size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: PNGs (relative to ``base``) to uint8 ``[n, 1, size, size]``, and ``(position, reason)``
    of the files that could not be decoded (left as zeros)."""
    out = np.zeros((len(paths), 1, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i, 0] = decode_drawing(os.path.join(base, p), size)
        except DECODE_ERRORS as e:
            bad.append((i, decode_error_reason(e)))
    return out, bad


def omniglot_images(
    root: str | os.PathLike[str] | None = None, image_size: int = 28, download: bool = False
) -> np.ndarray:
    """All 32,460 drawings as one uint8 ``[N, 1, S, S]`` array (background set first), decoded once."""
    base = locate_omniglot(root, download)
    files = _listing(base)[1]
    return _all_images(base, files, image_size)


def _all_images(base: Path, files: tuple[str, ...], image_size: int) -> np.ndarray:
    key = cache_key(_VERSION, image_size, files)

    def failed(bad: dict[int, str]) -> None:
        i, reason = min(bad.items())
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DatasetError(
            f"{base / files[i]}: could not be decoded ({reason}){more}; the Omniglot files are corrupt - "
            "replace them (delete the folder and run `metafew data download omniglot`)"
        )

    def build() -> ChunkedArray:
        decode = functools.partial(_decode_chunk, base=str(base), size=image_size)
        shape = (len(files), 1, image_size, image_size)
        return decoded_chunks(decode, list(files), shape, on_failures=failed, chunk_size=512, desc="decoding Omniglot")

    return cached_array(f"omniglot-{image_size}", key, build, sources=base)


def split_lines(subset: str) -> list[str]:
    """The packaged Vinyals split list of ``subset``: one ``Alphabet/characterNN/rotDDD`` class per line."""
    text = resources.files("metafew.data").joinpath("splits").joinpath(f"omniglot_vinyals_{subset}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def Omniglot(
    subset: str,
    split: str = "vinyals",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 28,
) -> FewShotDataset:
    """One Omniglot subset as a :class:`FewShotDataset` of ``[1, image_size, image_size]`` images.

    Args:
        subset: ``train``/``val``/``test``/``trainval`` (vinyals) or ``background``/``evaluation`` (lake).
        split: ``"vinyals"`` (rotated characters as classes) or ``"lake"``.
        root: data root (default ``$METAFEW_DATA``, else ``~/.cache/metafew/data``); the images are in
            ``<root>/omniglot/``.
        download: fetch the official zips (md5-checked, resumable) into ``<root>/omniglot/`` when missing.
        image_size: side of the square images (28 is the standard).
    """
    if split not in SUBSETS:
        raise DatasetError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SUBSETS)}")
    if subset not in SUBSETS[split]:
        raise DatasetError(f"unknown Omniglot {split} subset {subset!r}; choose one of {', '.join(SUBSETS[split])}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    base = locate_omniglot(root, download)
    chars, files, starts, n_background = _listing(base)
    char_index = {c: i for i, c in enumerate(chars)}

    if split == "lake":
        lo, hi = (0, n_background) if subset == "background" else (n_background, len(chars))
        picks = [(i, 0) for i in range(lo, hi)]
        names = [chars[i] for i in range(lo, hi)]
    else:
        picks, names = [], []
        for line in split_lines(subset):
            character, _, rot = line.rpartition("/")
            if character not in char_index:
                raise DatasetError(
                    f"Omniglot at {base} lacks character {character!r} of the vinyals {subset} split; "
                    "the images_background/ or images_evaluation/ folder is incomplete"
                )
            deg = int(rot.removeprefix("rot"))
            if deg % 90:
                raise DatasetError(f"bad rotation in the vinyals split line {line!r}")
            picks.append((char_index[character], (deg // 90) % 4))
            names.append(line)

    counts = np.asarray([starts[c + 1] - starts[c] for c, _ in picks], dtype=np.int64)
    index = np.concatenate([np.arange(starts[c], starts[c + 1]) for c, _ in picks]) if picks else np.zeros(0, np.int64)
    rots = np.repeat(np.asarray([k for _, k in picks], dtype=np.int64), counts)
    labels = np.repeat(np.arange(len(picks)), counts)

    def rotate(block: np.ndarray, rows: slice) -> np.ndarray:
        for k in (1, 2, 3):  # each rotation group of the block at once (counter-clockwise)
            pos = np.flatnonzero(rots[rows] == k)
            if len(pos):
                block[pos] = np.rot90(block[pos], k, axes=(2, 3))
        return block

    def load() -> ChunkedArray:
        return take(_all_images(base, files, image_size), index, rotate if rots.any() else None)

    return FewShotDataset(
        f"omniglot/{split}-{subset}",
        labels,
        names,
        load,
        channels=1,
        image_size=(image_size, image_size),
        mean=OMNIGLOT_MEAN,
        std=OMNIGLOT_STD,
        cache_key=cache_key(_VERSION, image_size, files, split, names),  # names the memory-mapped copy
    )


def omniglot_info(split: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Cheap facts about Omniglot under ``split`` (``"vinyals"`` or ``"lake"``): where it is and the
    classes/images per subset, from the file listing alone; also where Lake's runs are (or None).

    Raises DatasetNotFoundError (naming where it looked) when the images are missing.
    """
    from .lake import find_lake_runs  # lake.py imports this module

    looked = [str(c) for c in _candidates(root)]
    base = locate_omniglot(root)
    chars, _, starts, n_background = _listing(base)
    per_char = np.diff(starts)
    subsets: dict[str, dict[str, int]] = {}
    if split == "vinyals":
        index = {c: i for i, c in enumerate(chars)}
        for s in SUBSETS["vinyals"]:
            lines = split_lines(s)
            n = sum(int(per_char[index[ln.rpartition("/")[0]]]) for ln in lines if ln.rpartition("/")[0] in index)
            subsets[s] = {"classes": len(lines), "images": n}
    else:
        subsets["background"] = {"classes": n_background, "images": int(per_char[:n_background].sum())}
        subsets["evaluation"] = {"classes": len(chars) - n_background, "images": int(per_char[n_background:].sum())}
    runs = find_lake_runs(root)
    return {"path": str(base), "looked_in": looked, "subsets": subsets, "lake_runs": str(runs) if runs else None}


def _download_all(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Both image sets and Lake's one-shot runs (what ``metafew data download omniglot`` fetches)."""
    from .lake import locate_lake_runs  # lake.py imports this module

    return [locate_omniglot(root, download=True), locate_lake_runs(root, download=True)]


def _loader(split: str):
    def load(subset: str, root: str | os.PathLike[str] | None, download: bool, **options: Any) -> FewShotDataset:
        return Omniglot(subset, split, root, download, **options)

    return load


register_dataset(
    DatasetSpec(
        "omniglot",
        "Omniglot, Vinyals et al. split: 4 rotations of each character are classes (20 images each)",
        SUBSETS["vinyals"],
        "train",
        OMNIGLOT_URLS["images_background"],
        (1, 28, 28),
        load=_loader("vinyals"),
        info=functools.partial(omniglot_info, "vinyals"),
        download=_download_all,
        options=("image_size",),
    )
)
register_dataset(
    DatasetSpec(
        "omniglot-lake",
        "Omniglot, Lake et al. background (964 characters) / evaluation (659) sets, unrotated",
        SUBSETS["lake"],
        "background",
        OMNIGLOT_URLS["images_background"],
        (1, 28, 28),
        load=_loader("lake"),
        info=functools.partial(omniglot_info, "lake"),
        download=_download_all,
        options=("image_size",),
    )
)
