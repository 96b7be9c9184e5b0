"""A user's own images: a ``root/<class>/<image>`` tree as a :class:`FewShotDataset`.

Registered as the ``folder:PATH`` dataset (``load_dataset("folder:/data/xrays", "train")``:
subset ``all`` is PATH itself, any other subset ``s`` the folder ``PATH/s``). The
decoding itself lives in :mod:`metafew.data.decode`, shared with the other datasets.

Decoding policy of :func:`ImageFolder`:

* ``channels=None``: 1 if every image is grayscale (modes ``1``/``L``/``LA``/``I;16``/...,
  or a palette of grays), else 3; every image is converted to that. Transparent
  pixels are composited onto white.
* ``image_size=None``: the images' own size if they all share one (no resizing),
  else 84x84. Resizing scales the image so it covers the target (bicubic,
  antialiased), then center-crops, so the aspect ratio is never distorted.
* bad files (corrupt images, non-image files in a class folder, an empty class
  folder): ``on_error="raise"`` raises a :class:`DatasetError` naming the file;
  ``"skip"`` leaves it out with a warning naming it. Hidden files are ignored;
  files at the top level (next to the class folders) are ignored with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from .base import FewShotDataset, cache_key, cached_array
from .decode import (
    IMAGE_EXTENSIONS,
    ImageTooLarge,
    decode_files,
    decode_workers,
    image_channels,
    is_image_file,
    load_image,
    parallel_chunks,
    pixel_limit_tag,
    probe_files,
)
from .normalize import channel_stats
from .registry import DatasetSpec, register_dataset

# load_image, parallel_chunks, decode_workers, decode_files, image_channels and channel_stats are
# re-exported from .decode / .normalize, where they now live
__all__ = [
    "FOLDER_PREFIX",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "channel_stats",
    "decode_files",
    "decode_workers",
    "folder_info",
    "image_channels",
    "load_folder",
    "load_image",
    "parallel_chunks",
]

FOLDER_PREFIX = "folder:"
DEFAULT_SIZE = 84
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_VERSION = "image-folder-v1"


# -- the dataset ----------------------------------------------------------------------


def _listing(root: Path) -> tuple[list[str], list[list[os.DirEntry[str]]], list[tuple[Path, str]]]:
    """Class names, image entries per class, and ``(path, reason)`` problems found by name alone."""
    if not root.exists():
        raise DatasetNotFoundError(f"image folder not found: {root.absolute()} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root.absolute()} is not a folder (expected root/<class>/<image> folders)")
    dirs: list[os.DirEntry[str]] = []
    stray: list[os.DirEntry[str]] = []
    with os.scandir(root) as it:
        for e in it:
            if e.name.startswith(".") or e.name.lower() in _IGNORED_FILES:
                continue
            (dirs if e.is_dir() else stray).append(e)
    if stray:
        names = ", ".join(sorted(e.name for e in stray)[:5]) + (" ..." if len(stray) > 5 else "")
        warnings.warn(
            f"{root}: ignoring {len(stray)} file(s) at the top level ({names}); images must be in "
            "root/<class>/ folders",
            stacklevel=3,
        )
    if not dirs:
        what = "is empty" if not stray else "has no class folders, only files"
        raise DatasetError(
            f"{root.absolute()} {what}: expected one sub-folder of images per class (root/<class>/<image>)"
        )
    classes: list[str] = []
    files: list[list[os.DirEntry[str]]] = []
    problems: list[tuple[Path, str]] = []
    for d in sorted(dirs, key=lambda e: e.name):
        imgs = []
        with os.scandir(d.path) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.name.startswith(".") or e.name.lower() in _IGNORED_FILES or e.is_dir():
                    continue
                if is_image_file(e.name):
                    imgs.append(e)
                else:
                    problems.append((Path(e.path), f"is not an image file (supported: {' '.join(IMAGE_EXTENSIONS)})"))
        classes.append(d.name)
        files.append(imgs)
    return classes, files, problems


def _handle(problems: Sequence[tuple[Path, str]], on_error: str) -> None:
    if not problems:
        return
    if on_error == "raise":
        path, reason = problems[0]
        more = f" ({len(problems) - 1} more bad file(s))" if len(problems) > 1 else ""
        raise DatasetError(f"{path}: {reason}{more}; pass on_error='skip' to leave bad files out")
    for path, reason in problems[:20]:
        warnings.warn(f"{path}: {reason}; left out", stacklevel=3)
    if len(problems) > 20:
        warnings.warn(f"... and {len(problems) - 20} more bad files left out", stacklevel=3)


def _slug(root: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", root.resolve().name)[:40] or "root"


def _as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 1:
        raise DatasetError(f"image_size must be positive, got {image_size!r}")
    return size


def ImageFolder(
    root: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    name: str | None = None,
) -> FewShotDataset:
    """Load ``root/<class>/<image>`` (png/jpg/jpeg/bmp/gif/tif/tiff/webp) as a :class:`FewShotDataset`.

    Images are decoded once over all cores and cached (key: relative paths, sizes and
    mtimes of the files, the image size and channels), so a second load only lists
    the folder. Mean/std are computed from the images themselves.

    Args:
        root: the folder holding one sub-folder per class.
        image_size: ``H`` (square) or ``(H, W)``; ``None``: see the module docstring.
        channels: 1 or 3; ``None``: 1 if every image is grayscale, else 3.
        on_error: ``"raise"`` on a bad file, or ``"skip"`` it with a warning.
        name: dataset name (default ``"folder:<root>"``).
    """
    if on_error not in ("raise", "skip"):
        raise DatasetError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1, 3 or None, got {channels!r}")
    root = Path(root).expanduser()
    size = _as_size(image_size)
    classes, entries, problems = _listing(root)
    _handle(problems, on_error)
    if on_error == "raise":  # fail before a long decode
        for c, files in enumerate(entries):
            if not files:
                exts = " ".join(IMAGE_EXTENSIONS)
                raise DatasetError(f"class folder {root / classes[c]} has no image files ({exts})")

    # Flatten; the file stats are part of the cache key, so edited files are re-decoded.
    paths: list[str] = []
    owner: list[int] = []
    stamp: list[tuple[str, int, int]] = []
    for c, files in enumerate(entries):
        for e in files:
            st = e.stat()
            paths.append(e.path)
            owner.append(c)
            stamp.append((os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns))
    slug = f"folder-{_slug(root)}"
    key0 = cache_key(_VERSION, stamp)
    limit = pixel_limit_tag()  # what is refused as too large depends on PIL's pixel limit
    ok = np.ones(len(paths), dtype=bool)

    bad: list[tuple[Path, str]] = []
    if size is None or channels is None:
        meta = cached_array(f"{slug}-meta", cache_key(key0, "probe-v2", *limit), lambda: probe_files(paths))
        readable = meta[:, 0] > 0
        for i in np.flatnonzero(~readable):
            if meta[i, 0] == -1:  # above PIL's decompression-bomb limit: (-1, pixels, limit)
                bad.append((Path(paths[i]), f"is {ImageTooLarge(int(meta[i, 1]), int(meta[i, 2]))}"))
            else:
                bad.append((Path(paths[i]), "is not a readable image (corrupt or unknown format)"))
        ok &= readable
        _handle(bad, on_error)
        if channels is None:
            channels = 1 if ok.any() and bool((meta[ok, 0] == 1).all()) else 3
        if size is None:
            sizes = Counter((int(h), int(w)) for w, h in meta[ok, 1:])
            size = next(iter(sizes)) if len(sizes) == 1 else (DEFAULT_SIZE, DEFAULT_SIZE)
    assert size is not None and channels is not None
    key1 = cache_key(key0, size, channels, np.packbits(ok).tobytes(), *limit)
    todo = [i for i in range(len(paths)) if ok[i]]
    state: dict[str, object] = {}

    def decode_all() -> np.ndarray:
        if "images" not in state:
            arr, failed = decode_files([paths[i] for i in todo], size, channels, desc=f"decoding {root.name}")
            state["images"], state["failed"] = arr, {todo[j]: r for j, r in failed.items()}
        return state["images"]  # type: ignore[return-value]

    def build_ok() -> np.ndarray:
        decode_all()
        failed: dict[int, str] = state["failed"]  # type: ignore[assignment]
        mask = ok.copy()
        mask[list(failed)] = False
        if on_error == "raise" and failed:
            _handle([(Path(paths[i]), f"could not be decoded ({r})") for i, r in sorted(failed.items())], on_error)
        return mask.astype(np.uint8)

    final = cached_array(f"{slug}-ok", key1, build_ok).astype(bool)
    newly = np.flatnonzero(ok & ~final).tolist()
    failed_reasons: dict[int, str] = state.get("failed", {})  # type: ignore[assignment]
    reasons = [failed_reasons.get(i, "corrupt image") for i in newly]
    _handle([(Path(paths[i]), f"could not be decoded ({r})") for i, r in zip(newly, reasons)], on_error)

    labels_all = np.asarray(owner, dtype=np.int64)[final]
    counts = np.bincount(labels_all, minlength=len(classes))
    empty = [c for c in range(len(classes)) if counts[c] == 0]
    if empty:
        problems = [(root / classes[c], "has no (readable) images") for c in empty]
        if on_error == "raise" or len(empty) == len(classes):
            p, reason = problems[0]
            more = f" ({len(empty) - 1} more empty class folder(s))" if len(empty) > 1 else ""
            raise DatasetError(f"class folder {p} {reason}{more}")
        _handle(problems, on_error)
        keep = [c for c in range(len(classes)) if counts[c] > 0]
        remap = np.full(len(classes), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        labels_all = remap[labels_all]
        classes = [classes[c] for c in keep]

    stats = cached_array(f"{slug}-stats", key1, lambda: channel_stats(decode_all()))
    images: np.ndarray | Callable[[], np.ndarray]
    if "images" in state:
        images = cached_array(f"{slug}-images", key1, decode_all)  # writes the cache now
    else:
        images = lambda: cached_array(f"{slug}-images", key1, decode_all)  # noqa: E731
    return FewShotDataset(
        name or f"folder:{root}",
        labels_all,
        classes,
        images,
        channels=channels,
        image_size=size,
        mean=stats[0].tolist(),
        std=stats[1].tolist(),
    )


# -- the registered "folder:PATH" dataset ------------------------------------------------


def _folder_root(path: str, subset: str) -> Path:
    """The folder a ``folder:PATH`` subset names: PATH itself for ``all``, else ``PATH/<subset>``."""
    base = Path(path).expanduser()
    if not path or str(base) == ".":
        raise DatasetError("folder: needs a path, e.g. folder:/data/my_images")
    if subset == "all":
        return base
    sub = base / subset
    if not sub.is_dir():
        raise DatasetNotFoundError(
            f"subset {subset!r} of {FOLDER_PREFIX}{path} not found: {sub.absolute()} is not a folder "
            "(use subset 'all' for PATH itself, or a sub-folder name such as 'train')"
        )
    return sub


def load_folder(subset: str, root: Any, download: bool, *, path: str, **options: Any) -> FewShotDataset:
    """The ``folder:PATH`` loader of the dataset registry (``root`` and ``download`` do not apply)."""
    folder = _folder_root(path, subset)
    name = f"{FOLDER_PREFIX}{path}" + ("" if subset == "all" else f"/{subset}")
    return ImageFolder(folder, name=name, **options)


def folder_info(root: Any = None, *, path: str) -> dict[str, Any]:
    """Cheap facts about ``folder:PATH``: its class folders and image files, counted by name only."""
    base = Path(path).expanduser()
    info: dict[str, Any] = {"description": "image folder", "looked_in": [str(base.absolute())]}
    if not base.is_dir():
        return {**info, "found": False, "path": None, "message": f"{base.absolute()} is not a folder"}
    classes = images = 0
    with os.scandir(base) as it:
        for d in it:
            if d.is_dir() and not d.name.startswith("."):
                with os.scandir(d.path) as files:
                    n = sum(1 for e in files if is_image_file(e.name))
                classes += 1
                images += n
    return {
        **info,
        "subsets": {"all": {"classes": classes, "images": images}},
        "found": True,
        "path": str(base.absolute()),
    }


def _no_download(root: Any = None, *, path: str) -> list[Path]:
    raise DatasetError(f"{FOLDER_PREFIX}{path} is a local folder; there is nothing to download")


register_dataset(
    DatasetSpec(
        "folder",
        f"your own PATH/<class>/<image> tree ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})",
        ("all",),
        "all",
        "",
        None,
        load=load_folder,
        info=folder_info,
        download=_no_download,
        options=("image_size", "channels", "on_error"),
        argument="PATH",
        open_subsets=True,
    )
)
