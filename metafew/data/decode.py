"""The one home of image decoding: files (or PIL images) to uint8 ``[C, H, W]`` arrays.

Every reader of image files uses these primitives, so a file is decoded the same way
wherever it is read: :func:`metafew.data.ImageFolder` and Caltech-101 (:func:`load_image`
over a process pool, :func:`decode_files`), Omniglot and Lake's runs
(:func:`decode_drawing`), and ``metafew adapt``/``predict`` on a user's files
(:mod:`metafew.adaptation.preprocess`).

Policy of :func:`load_image` / :func:`convert_image`:

* modes: converted to ``L`` (1 channel) or ``RGB`` (3); transparent pixels are
  composited onto white; 16-bit and 32-bit gray is scaled to 8 bits.
* size: scaled so the image covers the target (bicubic, antialiased), then
  center-cropped, so the aspect ratio is never distorted.
* very large images: a file above PIL's decompression-bomb limit (``2 *
  PIL.Image.MAX_IMAGE_PIXELS`` pixels) is refused with :class:`ImageTooLarge`, whose
  message gives its pixel count; ``$METAFEW_MAX_IMAGE_PIXELS`` (read at import, ``0``:
  no limit) sets ``PIL.Image.MAX_IMAGE_PIXELS`` to allow such files.

Streaming (datasets larger than memory): :class:`ChunkedArray` is a decode whose shape is
known up front and whose images come block by block; :func:`decode_files_chunked` and
:func:`decoded_chunks` (a pool's results in order, at most a few chunks in flight) and
:func:`take` (a gather from an array or a map) make one. :func:`metafew.data.base.cached_array`
and a memory-mapped :class:`~metafew.data.FewShotDataset` write it straight into a
``.npy`` map, so no array of the whole dataset is ever allocated.

The cached decoded arrays depend on exactly this code: a change to what it produces
must bump the ``_VERSION`` of the datasets that cache its output.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..progress import progress

__all__ = [
    "CHUNK_BYTES",
    "DECODE_ERRORS",
    "IMAGE_EXTENSIONS",
    "PIXEL_LIMIT_ENV",
    "ChunkedArray",
    "ImageTooLarge",
    "apply_pixel_limit",
    "convert_image",
    "cover_crop",
    "decode_drawing",
    "decode_error_reason",
    "decode_files",
    "decode_files_chunked",
    "decode_workers",
    "decoded_chunks",
    "image_channels",
    "is_image_file",
    "iter_parallel_chunks",
    "load_image",
    "open_image",
    "parallel_chunks",
    "pixel_limit_tag",
    "probe_files",
    "probe_image",
    "rows_per_block",
    "take",
    "to_array",
    "to_mode",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# What PIL raises on a file that is not a (complete, supported) image.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)

PIXEL_LIMIT_ENV = "METAFEW_MAX_IMAGE_PIXELS"
_PIL_DEFAULT_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # PIL's own MAX_IMAGE_PIXELS


class ImageTooLarge(Image.DecompressionBombError):
    """A valid image above PIL's decompression-bomb limit; the message gives its size and how to allow it."""

    def __init__(self, pixels: int, limit: int) -> None:
        self.pixels, self.limit = pixels, limit
        super().__init__(
            f"too large to decode safely ({pixels:,} pixels, above PIL's decompression-bomb limit of "
            f"{limit:,}); if you trust the file, set {PIXEL_LIMIT_ENV}={pixels} (or 0 for no limit) to allow it"
        )

    def __reduce__(self) -> tuple[type[ImageTooLarge], tuple[int, int]]:
        return type(self), (self.pixels, self.limit)


def apply_pixel_limit() -> None:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` from ``$METAFEW_MAX_IMAGE_PIXELS`` (a count; 0 = no limit), when set."""
    env = os.environ.get(PIXEL_LIMIT_ENV, "").strip().replace("_", "").replace(",", "")
    if env.isdigit():
        Image.MAX_IMAGE_PIXELS = int(env) or None


apply_pixel_limit()


def pixel_limit_tag() -> tuple[int | None, ...]:
    """``()`` under PIL's default pixel limit, else ``(limit,)``: a cache-key part for what is refused as too large."""
    limit = Image.MAX_IMAGE_PIXELS
    return () if limit == _PIL_DEFAULT_LIMIT else (limit,)


def open_image(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """``PIL.Image.open``, but a decompression bomb is an :class:`ImageTooLarge` giving its pixel count."""
    try:
        return Image.open(source)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        if m is None:
            raise
        raise ImageTooLarge(int(m.group(1)), int(m.group(2))) from None


def decode_error_reason(e: BaseException) -> str:
    """A one-line reason for a decode failure: :class:`ImageTooLarge`'s own message, else ``Type: message``."""
    if isinstance(e, ImageTooLarge):
        return str(e)
    return f"{type(e).__name__}: {e}"


_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}

T = TypeVar("T")
R = TypeVar("R")


# -- one image ------------------------------------------------------------------------


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of the :data:`IMAGE_EXTENSIONS` (by name alone, case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def image_channels(img: Image.Image) -> int:
    """1 for a grayscale image (gray modes, or a palette of grays), else 3; read from the header."""
    if img.mode in _GRAY_MODES:
        return 1
    if img.mode in ("P", "PA"):
        pal = img.getpalette() or []
        rgb = np.asarray(pal[: len(pal) // 3 * 3], dtype=np.int32).reshape(-1, 3)
        return 1 if len(rgb) and bool((rgb == rgb[:, :1]).all()) else 3
    return 3


def to_mode(img: Image.Image, channels: int) -> Image.Image:
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


def cover_crop(img: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale ``img`` so it covers ``size=(H, W)`` (never distorting it), then center-crop to exactly ``size``."""
    th, tw = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), resample)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def to_array(img: Image.Image) -> np.ndarray:
    """An ``L`` or ``RGB`` PIL image as uint8 ``[C, H, W]`` (channels first, as torch wants)."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def convert_image(
    img: Image.Image,
    size: tuple[int, int] | None,
    channels: int,
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """An opened PIL image to uint8 ``[C, H, W]``: :func:`to_mode`, then :func:`cover_crop` unless ``size`` matches."""
    img = to_mode(img, channels)
    if size is not None and (img.height, img.width) != size:
        img = cover_crop(img, size, resample)
    return to_array(img)


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None,
    channels: int,
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """Decode one image file to uint8 ``[C, H, W]``.

    ``size=(H, W)``: scale so the image covers ``H x W`` (antialiased), then center-crop;
    ``None``: keep the image's size. JPEGs are decoded at a reduced scale when that
    still covers the target (``draft``), which makes large photos much faster. The
    first frame of a GIF (page of a TIFF) is used.
    """
    with open_image(path) as img:
        if size is not None and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
        img.seek(0)  # first frame of a GIF / page of a TIFF
        return convert_image(img, size, channels, resample)


def decode_drawing(source: str | os.PathLike[str] | IO[bytes] | bytes, size: int) -> np.ndarray:
    """One Omniglot PNG (a path, file or its bytes) to uint8 ``[size, size]``: grayscale, LANCZOS-resized,
    inverted (strokes 255).

    The one preprocessing of Omniglot drawings, shared by :func:`metafew.data.Omniglot` and
    :func:`metafew.data.lake_runs`, so a learner trained on one applies to the other.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with open_image(source) as im:
        g = im.convert("L")
    if g.size != (size, size):
        g = g.resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(g, dtype=np.uint8)


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """``(channels, width, height)`` of an image file from its header, or None when it is unreadable.

    Raises :class:`ImageTooLarge` for a valid image above PIL's decompression-bomb limit.

    Much cheaper than decoding: only the header is read, plus (for PNG) a walk over the
    chunk checksums that catches truncated files. A file that passes here but fails to
    decode is still caught by the decode.
    """
    try:
        with open_image(path) as img:
            row = (image_channels(img), img.width, img.height)
            try:
                img.verify()  # PNG: walks the chunks and checks CRCs (catches truncation) without decoding
            except RuntimeError:  # "verify must be called directly after open": a palette was read
                with Image.open(path) as again:
                    again.verify()
    except ImageTooLarge:
        raise
    except DECODE_ERRORS:
        return None
    return row


# -- many images, over all cores --------------------------------------------------------


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
    module-level function. :func:`iter_parallel_chunks` yields the results instead.
    """
    return list(iter_parallel_chunks(fn, items, chunk_size=chunk_size, desc=desc, workers=workers))


def iter_parallel_chunks(
    fn: Callable[[Sequence[T]], R],
    items: Sequence[T],
    *,
    chunk_size: int = 512,
    desc: str = "decoding",
    workers: int | None = None,
) -> Iterator[R]:
    """:func:`parallel_chunks`, yielding each chunk's result in order as it is ready.

    At most ``2 * workers`` chunks are in flight (submitted and not yet consumed), so the
    results held at any time are bounded by a few chunks, however many items there are:
    what lets a dataset larger than memory be decoded straight into a file.
    """
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    workers = min(decode_workers() if workers is None else workers, len(chunks))
    if mp.current_process().daemon:  # e.g. inside a DataLoader worker: no children allowed
        workers = 1
    with progress(total=len(items), desc=desc, unit="img") as bar:
        if workers <= 1:
            for c in chunks:
                r = fn(c)
                bar.update(len(c))
                yield r
                del r  # not held while the next chunk is computed
            return
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
            pool = ctx.Pool(workers)
        with pool:  # leaving early (an error, a consumer that stops) terminates the workers
            todo = iter(chunks)
            pending: collections.deque[tuple[int, mp.pool.AsyncResult[R]]] = collections.deque()
            for c in todo:
                pending.append((len(c), pool.apply_async(fn, (c,))))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                n, job = pending.popleft()
                r = job.get()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((len(nxt), pool.apply_async(fn, (nxt,))))
                bar.update(n)
                yield r
                del r


# -- streamed decodes -------------------------------------------------------------------

CHUNK_BYTES = 16 << 20  # the size of a block of :func:`take`: ~16 MB of images


class ChunkedArray:
    """A uint8 array produced block by block: ``shape`` is known before anything is decoded.

    ``blocks()`` returns a fresh iterator over consecutive arrays of ``shape[1:]`` whose
    lengths add up to ``shape[0]`` (it may raise once all are produced, e.g. to report the
    files that failed). A memory-mapped dataset or :func:`~metafew.data.base.cached_array`
    writes the blocks straight into its ``.npy`` map (:meth:`write_into`), so the extra
    memory of a decode is one block, never the whole array; :meth:`materialize` builds it
    in memory when that is what is asked for.
    """

    def __init__(self, shape: Sequence[int], blocks: Callable[[], Iterable[np.ndarray]]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(np.uint8)
        self._blocks = blocks

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array, ``prod(shape)``."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"ChunkedArray(shape={self.shape})"

    def write_into(self, out: np.ndarray, on_block: Callable[[int], None] | None = None) -> None:
        """Write every block into ``out`` (an array or map of :attr:`shape`), in order; ``on_block(rows_done)``
        after each. Raises ValueError when the blocks do not add up to :attr:`shape`."""
        if tuple(out.shape) != self.shape:
            raise ValueError(f"cannot write {self.shape} into an array of shape {tuple(out.shape)}")
        lo = 0
        for block in self._blocks():
            block = np.asarray(block)
            hi = lo + len(block)
            if tuple(block.shape[1:]) != self.shape[1:] or hi > self.shape[0]:
                raise ValueError(f"a block of shape {tuple(block.shape)} at row {lo} does not fit {self.shape}")
            out[lo:hi] = block
            lo = hi
            del block
            if on_block is not None:
                on_block(lo)
        if lo != self.shape[0]:
            raise ValueError(f"the blocks gave {lo} rows, not {self.shape[0]}")

    def materialize(self) -> np.ndarray:
        """The whole array in memory (one allocation of :attr:`shape`, filled block by block)."""
        out = np.empty(self.shape, dtype=np.uint8)
        self.write_into(out)
        return out

    def __array__(self, dtype: Any = None, copy: object = None) -> np.ndarray:
        a = self.materialize()
        return a if dtype is None else a.astype(dtype)


def rows_per_block(row_shape: Sequence[int]) -> int:
    """Rows of ``row_shape`` (bytes per row: its product) that fit in one :data:`CHUNK_BYTES` block."""
    return max(1, CHUNK_BYTES // max(1, math.prod(row_shape)))


def take(
    array: np.ndarray,
    index: np.ndarray | None = None,
    transform: Callable[[np.ndarray, slice], np.ndarray] | None = None,
    row_shape: Sequence[int] | None = None,
) -> ChunkedArray:
    """``array[index]`` (all rows when ``index`` is None) as a :class:`ChunkedArray`, gathered
    :data:`CHUNK_BYTES` at a time: from a memory map it reads only what each block needs.

    ``transform(block, rows)`` maps each gathered block (``rows``: its slice of the output)
    to the output's rows, e.g. a resize; ``row_shape`` is then the per-image output shape
    (default: the input's).
    """
    n = len(array) if index is None else len(index)
    row_shape = tuple(array.shape[1:]) if row_shape is None else tuple(row_shape)
    per = rows_per_block(max(row_shape, tuple(array.shape[1:]), key=math.prod))

    def blocks() -> Iterator[np.ndarray]:
        for lo in range(0, n, per):
            rows = slice(lo, min(n, lo + per))
            if index is not None:
                block = np.asarray(array[index[rows]])  # a gather: already a copy of just these rows
            else:  # a view of the rows (of a map: read when written out), copied only to be transformed
                block = np.asarray(array[rows]) if transform is None else np.array(array[rows])
            out = block if transform is None else transform(block, rows)
            del block
            yield out
            del out  # one block alive at a time, not two

    return ChunkedArray((n, *row_shape), blocks)


def decoded_chunks(
    fn: Callable[[Sequence[T]], tuple[np.ndarray, list[tuple[int, str]]]],
    items: Sequence[T],
    shape: Sequence[int],
    *,
    on_failures: Callable[[dict[int, str]], None],
    chunk_size: int = 256,
    desc: str = "decoding",
) -> ChunkedArray:
    """A decode over a process pool (:func:`iter_parallel_chunks`) as a :class:`ChunkedArray` of ``shape``.

    ``fn(chunk)`` returns ``(images [len(chunk), ...], [(position in chunk, reason), ...])``,
    a failed image left in place (e.g. zeros). Once every chunk is written,
    ``on_failures({index: reason})`` is called when any failed; it is expected to raise
    (a one-line DatasetError naming the file), so a half-bad decode is never cached.
    """

    def blocks() -> Iterator[np.ndarray]:
        failed: dict[int, str] = {}
        for j, (arr, bad) in enumerate(iter_parallel_chunks(fn, items, chunk_size=chunk_size, desc=desc)):
            failed.update((j * chunk_size + i, reason) for i, reason in bad)
            yield arr
            del arr
        if failed:
            on_failures(failed)

    return ChunkedArray((len(items), *tuple(shape)[1:]), blocks)


def _decode_chunk(
    paths: Sequence[str], size: tuple[int, int], channels: int
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk of files; return the good images and ``(position, reason)`` of bad ones."""
    good: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            good.append(load_image(p, size, channels))
        except DECODE_ERRORS as e:
            bad.append((i, decode_error_reason(e)))
    arr = np.stack(good) if good else np.zeros((0, channels, *size), dtype=np.uint8)
    return arr, bad


def _decode_chunk_in_place(
    paths: Sequence[str], size: tuple[int, int], channels: int
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk of files to ``[len(paths), C, H, W]``, a bad file left as zeros."""
    out = np.zeros((len(paths), channels, *size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i] = load_image(p, size, channels)
        except DECODE_ERRORS as e:
            bad.append((i, decode_error_reason(e)))
    return out, bad


FILE_CHUNK = 256  # files per pool task of decode_files / decode_files_chunked


def decode_files(
    paths: Sequence[str], size: tuple[int, int], channels: int, desc: str = "decoding images"
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many files over all cores: ``(images [n_good, C, H, W], {index: reason} of failures)``."""
    chunk = FILE_CHUNK
    results = parallel_chunks(
        functools.partial(_decode_chunk, size=size, channels=channels), paths, chunk_size=chunk, desc=desc
    )
    bad = {j * chunk + i: reason for j, (_, errs) in enumerate(results) for i, reason in errs}
    if not results:
        return np.zeros((0, channels, *size), dtype=np.uint8), bad
    return np.concatenate([arr for arr, _ in results]), bad


def decode_files_chunked(
    paths: Sequence[str],
    size: tuple[int, int],
    channels: int,
    *,
    on_failures: Callable[[dict[int, str]], None],
    desc: str = "decoding images",
) -> ChunkedArray:
    """:func:`decode_files` streamed: a :class:`ChunkedArray` ``[len(paths), C, H, W]`` decoded
    :data:`FILE_CHUNK` files per pool task; ``on_failures({index: reason})`` (expected to raise) once
    all are decoded, when any file failed. Nothing is decoded until its blocks are read."""
    return decoded_chunks(
        functools.partial(_decode_chunk_in_place, size=size, channels=channels),
        paths,
        (len(paths), channels, *size),
        on_failures=on_failures,
        chunk_size=FILE_CHUNK,
        desc=desc,
    )


def _probe_chunk(paths: Sequence[str]) -> np.ndarray:
    """Worker: ``[n, 3]`` int64 of (channels, width, height) from headers; channels 0 = unreadable,
    -1 = too large (then ``(-1, pixels, limit)``)."""
    out = np.zeros((len(paths), 3), dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            row = probe_image(p)
        except ImageTooLarge as e:
            row = (-1, e.pixels, e.limit)
        if row is not None:
            out[i] = row
    return out


def probe_files(paths: Sequence[str], desc: str = "reading image headers") -> np.ndarray:
    """:func:`probe_image` of many files over all cores: int64 ``[n, 3]`` (channels, width, height);
    0s if unreadable; ``(-1, pixels, limit)`` if above the decompression-bomb limit (:class:`ImageTooLarge`)."""
    if not paths:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(parallel_chunks(_probe_chunk, paths, chunk_size=1024, desc=desc))
