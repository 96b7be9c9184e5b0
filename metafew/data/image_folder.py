"""A user's own images: a ``root/<class>/<image>`` tree as a :class:`FewShotDataset`.

Also home of the image-decoding helpers the other file-based datasets (Caltech-101,
Omniglot) share: :func:`load_image` (open, convert, resize, center-crop) and
:func:`parallel_chunks` (a process pool over all cores for the one-time cold decode).

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

import functools
import multiprocessing as mp
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError, DatasetNotFoundError
from .base import FewShotDataset, cache_key, cached_array

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "load_image", "parallel_chunks", "decode_workers"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_SIZE = 84
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_VERSION = "image-folder-v1"

T = TypeVar("T")
R = TypeVar("R")


# -- decoding helpers (shared with caltech101.py / omniglot.py) -------------------------


def decode_workers() -> int:
    """How many processes a cold decode uses: ``$METAFEW_DECODE_WORKERS``, else every usable core."""
    env = os.environ.get("METAFEW_DECODE_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def parallel_chunks(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    *,
    chunk_size: int = 512,
    desc: str = "decoding",
    workers: int | None = None,
) -> list[R]:
    """``[fn(chunk) for chunk in chunks(items)]``, computed in a process pool, in order.

    Used for the one-time decode of a dataset: PIL releases little of the GIL, so
    processes (forked where the platform allows: no re-import of torch per worker)
    are what scales over cores. Small jobs run in-process. ``fn`` must be a
    module-level function.
    """
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    workers = min(decode_workers() if workers is None else workers, len(chunks))
    if mp.current_process().daemon:  # e.g. inside a DataLoader worker: no children allowed
        workers = 1
    bar = _progress(len(items), desc)
    try:
        if workers <= 1:
            out = []
            for c in chunks:
                out.append(fn(c))
                bar.update(len(c))
            return out
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
            with ctx.Pool(workers) as pool:
                out = []
                for c, r in zip(chunks, pool.imap(fn, chunks)):
                    out.append(r)
                    bar.update(len(c))
                return out
    finally:
        bar.close()


def _progress(total: int, desc: str):  # noqa: ANN202 - tqdm or a stand-in
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency

        class _NoBar:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...

        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)


def image_channels(img: Image.Image) -> int:
    """1 for a grayscale image (gray modes, or a palette of grays), else 3; read from the header."""
    if img.mode in _GRAY_MODES:
        return 1
    if img.mode in ("P", "PA"):
        pal = img.getpalette() or []
        rgb = np.asarray(pal[: len(pal) // 3 * 3], dtype=np.int32).reshape(-1, 3)
        return 1 if len(rgb) and bool((rgb == rgb[:, :1]).all()) else 3
    return 3


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to ``L`` (channels=1) or ``RGB`` (3); alpha is composited onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else (255.0 if a.max() <= 255 else float(a.max()))
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None,
    channels: int,
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """Decode one image file to uint8 ``[C, H, W]``.

    ``size=(H, W)``: scale so the image covers ``H x W`` (antialiased), then center-crop;
    ``None``: keep the image's size. JPEGs are decoded at a reduced scale when that
    still covers the target (``draft``), which makes large photos much faster.
    """
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
        img.seek(0)  # first frame of a GIF / page of a TIFF
        img = _to_mode(img, channels)
        if size is not None and (img.height, img.width) != size:
            img = _cover_crop(img, size, resample)
        a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _cover_crop(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    th, tw = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), resample)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def _decode_chunk(
    paths: Sequence[str], size: tuple[int, int], channels: int
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk of files; return the good images and ``(position, reason)`` of bad ones."""
    good: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            good.append(load_image(p, size, channels))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((i, f"{type(e).__name__}: {e}"))
    arr = np.stack(good) if good else np.zeros((0, channels, *size), dtype=np.uint8)
    return arr, bad


def decode_files(
    paths: Sequence[str], size: tuple[int, int], channels: int, desc: str = "decoding images"
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many files over all cores: ``(images [n_good, C, H, W], {index: reason} of failures)``."""
    chunk = 256
    results = parallel_chunks(
        functools.partial(_decode_chunk, size=size, channels=channels), paths, chunk_size=chunk, desc=desc
    )
    bad = {j * chunk + i: reason for j, (_, errs) in enumerate(results) for i, reason in errs}
    if not results:
        return np.zeros((0, channels, *size), dtype=np.uint8), bad
    return np.concatenate([arr for arr, _ in results]), bad


def _probe(paths: Sequence[str]) -> np.ndarray:
    """Worker: ``[n, 3]`` int32 of (channels, width, height) from headers; channels 0 = unreadable.

    Only headers are read (plus PNG chunk checksums), so this is much cheaper than
    decoding; a file that passes here but fails to decode is still caught later.
    """
    out = np.zeros((len(paths), 3), dtype=np.int32)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                row = (image_channels(img), img.width, img.height)
                img.verify()  # PNG: walks the chunks and checks CRCs (catches truncation) without decoding
            out[i] = row
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass
    return out


def _probe_all(paths: Sequence[str]) -> np.ndarray:
    if not paths:
        return np.zeros((0, 3), dtype=np.int32)
    return np.concatenate(parallel_chunks(_probe, paths, chunk_size=1024, desc="reading image headers"))


# -- the dataset ----------------------------------------------------------------------


def _listing(root: Path) -> tuple[list[str], list[list[os.DirEntry[str]]], list[tuple[Path, str]]]:
    """Class names, image entries per class, and ``(path, reason)`` problems found by name alone."""
    if not root.exists():
        raise DatasetNotFoundError(f"image folder not found: {root.absolute()} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root.absolute()} is not a folder (expected root/<class>/<image> folders)")
    dirs, stray = [], []
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
                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    imgs.append(e)
                else:
                    problems.append(
                        (Path(e.path), f"is not an image file (supported: {' '.join(IMAGE_EXTENSIONS)})")
                    )
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


def channel_stats(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and std in ``[0, 1]`` units, ``[2, C]`` float64 (exact, in chunks)."""
    c = images.shape[1]
    s = np.zeros(c)
    ss = np.zeros(c)
    n = 0
    for i in range(0, len(images), 4096):
        x = images[i : i + 4096].astype(np.float64) / 255.0
        s += x.sum(axis=(0, 2, 3))
        ss += (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        return np.stack([np.full(c, 0.5), np.full(c, 0.5)])
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return np.stack([mean, np.where(std > 0, std, 1.0)])


def ImageFolder(  # noqa: N802 - reads like a class, returns the shared dataset type
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
    ok = np.ones(len(paths), dtype=bool)

    bad: list[tuple[Path, str]] = []
    if size is None or channels is None:
        meta = cached_array(f"{slug}-meta", key0, lambda: _probe_all(paths))
        readable = meta[:, 0] > 0
        for i in np.flatnonzero(~readable):
            bad.append((Path(paths[i]), "is not a readable image (corrupt or unknown format)"))
        ok &= readable
        _handle(bad, on_error)
        if channels is None:
            channels = 1 if ok.any() and bool((meta[ok, 0] == 1).all()) else 3
        if size is None:
            sizes = Counter((int(h), int(w)) for w, h in meta[ok, 1:])
            size = next(iter(sizes)) if len(sizes) == 1 else (DEFAULT_SIZE, DEFAULT_SIZE)
    assert size is not None and channels is not None
    key1 = cache_key(key0, size, channels, np.packbits(ok).tobytes())
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
