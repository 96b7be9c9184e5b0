"""The dataset every sampler and learner works on, in memory or memory-mapped.

A :class:`FewShotDataset` is a labelled set of images held as one uint8 tensor
``[N, C, H, W]`` (decoded once, cached on disk), a label tensor ``[N]`` and the
class names. Class names and labels are known from the file listing alone;
images are decoded on first access of :attr:`images`.

Storage (``storage=`` here and on :func:`metafew.data.load_dataset`):

* ``"memory"``: the images are read into RAM (what small datasets get).
* ``"mmap"``: the decoded images are written once to ``<cache>/mapped/<name>-<key>.npy``
  (atomically: temp file + rename) and memory-mapped (``np.load(mmap_mode="c")``): pages
  are read from disk on first touch and the OS page cache keeps the hot ones, so a
  dataset larger than RAM works and several processes share one copy. :attr:`images` is
  then a CPU tensor over the map; :class:`~metafew.data.EpisodeSampler` gathers episodes
  from it on the host and prefetches the next meta-batch in a background thread.
* ``"auto"`` (default): ``"mmap"`` when the decoded size (``N*C*H*W`` bytes, known
  without decoding) exceeds :func:`memory_budget`: ``$METAFEW_MEMORY_BUDGET`` (e.g.
  ``4GiB``, ``500MB``, ``0`` = always map), else a quarter of the machine's RAM.

The mapped file is checked when opened (its ``.npy`` header, dtype, shape and size: a
truncated or foreign file is a one-line :class:`~metafew.errors.DatasetError` naming it).
Building it never holds the whole decoded dataset in memory: the loaders hand back a
:class:`~metafew.data.decode.ChunkedArray` (a decode, or a gather from the map of the
decoded cache) that is written block by block into ``np.lib.format.open_memmap`` of a
temp file, renamed when complete; the extra memory is a block (``decode.CHUNK_BYTES``,
or ``2 x workers x decode.FILE_CHUNK`` images of a pool decode), not the dataset. Every
later load, in any process, only maps it. Datasets that pass a ``cache_key`` keep their
map under the cache dir (or, when their decoded cache already is exactly the dataset,
map that file: no second copy on disk); others map an unnamed temporary file for the
life of the process.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..cache_keys import decoded_cache_key
from ..errors import DatasetError
from ..paths import cache_dir
from .decode import ChunkedArray, take
from .normalize import Normalize

ImageLoader = Callable[[], np.ndarray | torch.Tensor | ChunkedArray]
Storage = Literal["auto", "memory", "mmap"]
STORAGES: tuple[str, ...] = ("auto", "memory", "mmap")
MEMORY_BUDGET_ENV = "METAFEW_MEMORY_BUDGET"


class FewShotDataset(torch.utils.data.Dataset):
    """Images of one split, grouped by class.

    Args:
        name: a readable identifier, e.g. ``"omniglot/vinyals-train"``.
        labels: class index of every image, ``[N]`` in ``0..len(classes)-1``.
        classes: class names, one per label value.
        images: a uint8 tensor ``[N, C, H, W]``, or a zero-argument callable that
            decodes and returns it (as a numpy or torch uint8 array, or a
            :class:`~metafew.data.decode.ChunkedArray`, which a mapped dataset writes to its
            map block by block) on first use.
        mean, std: per-channel normalisation statistics in ``[0, 1]`` units.
        image_size: ``(H, W)``; channels: ``C`` (known without decoding).
        storage: ``"auto"`` (default), ``"memory"`` or ``"mmap"`` (see the module
            docstring). ``"auto"`` decides when a loader's images are first read (images
            given as an array stay in memory); setting :attr:`storage` to ``"memory"`` or
            ``"mmap"`` later moves images already read.
        cache_key: what determines the images (files, size, decoder version), e.g. a
            :func:`cache_key`; with it a memory-mapped copy is kept at
            ``<cache>/mapped/<name>-<key>.npy`` and reused by later processes. Without
            it a mapped copy lives in an unnamed temporary file for this process only.
    """

    def __init__(
        self,
        name: str,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes: Sequence[str],
        images: torch.Tensor | np.ndarray | ImageLoader,
        *,
        channels: int,
        image_size: tuple[int, int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        storage: Storage = "auto",
        cache_key: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.classes = list(classes)
        self.channels = int(channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = tuple(float(m) for m in (mean if mean is not None else [0.5] * self.channels))
        self.std = tuple(float(s) for s in (std if std is not None else [0.5] * self.channels))
        self.cache_key = cache_key
        self._storage: str = _check_storage(storage)
        self._images: torch.Tensor | None = None
        self._loader: ImageLoader | None = None
        self._normalizer: Normalize | None = None
        self._map_path: Path | None = None  # the .npy the images are mapped from (None: in memory)
        self._map_persistent = False  # whether that file stays (keyed) or is an unlinked temporary
        if self.labels.ndim != 1:
            raise DatasetError(f"{name}: labels must be one-dimensional, got shape {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DatasetError(f"{name}: labels fall outside 0..{len(self.classes) - 1}")
        if callable(images):
            self._loader = images
        else:
            self._set_images(images)

    # -- images -----------------------------------------------------------------
    @property
    def images(self) -> torch.Tensor:
        """uint8 ``[N, C, H, W]``; decoded (or read from the disk cache) on first access.

        A CPU tensor over the memory map when :attr:`is_mapped`: indexing it reads only
        the pages of the images asked for.
        """
        if self._images is None:
            assert self._loader is not None
            self._set_images(self._loader)
            self._loader = None
        assert self._images is not None
        return self._images

    @property
    def storage(self) -> str:
        """The storage asked for: ``"auto"``, ``"memory"`` or ``"mmap"`` (:attr:`is_mapped` says what it became)."""
        return self._storage

    @storage.setter
    def storage(self, value: Storage) -> None:
        self._storage = _check_storage(value)
        if self._images is not None and value != "auto" and self.is_mapped != (value == "mmap"):
            self._set_images(self._images)  # already read: move it to the storage now asked for

    @property
    def is_mapped(self) -> bool:
        """Whether the images are memory-mapped from a file rather than held in RAM (decided when first read)."""
        return self._map_path is not None

    @property
    def mapped_path(self) -> Path | None:
        """The ``.npy`` file the images are mapped from (None in memory, or for an unlinked temporary map)."""
        return self._map_path if self._map_persistent else None

    @property
    def nbytes(self) -> int:
        """Decoded size of the images in bytes, ``N*C*H*W`` (known without decoding)."""
        return len(self.labels) * self.channels * self.image_size[0] * self.image_size[1]

    def _resolve_storage(self, lazy: bool = True) -> str:
        """``"memory"`` or ``"mmap"``; ``"auto"`` maps only images still to be read (``lazy``) above the budget."""
        if self._storage != "auto":
            return self._storage
        return "mmap" if lazy and self.nbytes > memory_budget() else "memory"

    def _shape(self) -> tuple[int, int, int, int]:
        return (len(self.labels), self.channels, *self.image_size)

    def _set_images(self, source: torch.Tensor | np.ndarray | ImageLoader) -> None:
        """Hold ``source`` (an array, or the loader to call) in the storage :attr:`storage` resolves to.

        An array already in memory stays there under ``"auto"``: only ``"mmap"`` copies it to a map.
        """
        if self._resolve_storage(lazy=callable(source)) != "mmap":
            array = source() if callable(source) else source
            if isinstance(array, ChunkedArray):  # a streamed decode: assembled in memory, as asked
                self._check_shape(array.shape)
                array = array.materialize()
            elif _is_file_mapped(array):  # a loader handed back a map: read it in, as asked
                array = np.array(array)
            elif self._map_path is not None and isinstance(array, torch.Tensor):  # from "mmap" to "memory"
                array = array.clone()
            self._images = self._check_images(array)
            self._map_path, self._map_persistent = None, False
            return
        path = mapped_cache_path(self.name, self.cache_key) if self.cache_key else None
        mapped = None if path is None else open_mapped(path, self._shape(), missing_ok=True)
        if mapped is None:
            got: torch.Tensor | np.ndarray | ChunkedArray
            if callable(source):
                with _prefer_mapped_caches():  # a loader's own cache is mapped, not read whole
                    got = source()
            else:
                got = source
            if isinstance(got, ChunkedArray):  # decoded (or gathered) block by block into the map
                self._check_shape(got.shape)
                mapped, path = write_mapped(got, path)
            else:
                array = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
                self._check_images(array)  # shape and dtype, before writing anything
                self._check_shape(array.shape)
                if _is_file_mapped(array):  # the loader's own cache file, mapped: no second copy
                    self._images = self._check_images(array)
                    self._map_path = Path(array.filename)  # type: ignore[attr-defined]
                    self._map_persistent = _maps_whole_npy(array, self._map_path)  # e.g. the decoded cache
                    return
                mapped, path = write_mapped(array, path)
        self._images = self._check_images(mapped)
        self._map_path, self._map_persistent = path, self.cache_key is not None

    def _check_shape(self, shape: Sequence[int]) -> None:
        """DatasetError unless ``shape`` is the declared ``[N, C, H, W]`` (checked before anything is written)."""
        if len(shape) != 4 or shape[0] != len(self.labels):
            raise DatasetError(
                f"{self.name}: images must be [N, C, H, W] with N = {len(self.labels)}, got {tuple(shape)}"
            )
        if tuple(shape[1:]) != self._shape()[1:]:
            raise DatasetError(f"{self.name}: images are {tuple(shape[1:])}, not the declared {self._shape()[1:]}")

    def _check_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(images)
        if t.dtype != torch.uint8 or t.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 [N, C, H, W], got {t.dtype} {tuple(t.shape)}")
        if t.shape[0] != len(self.labels):
            raise DatasetError(f"{self.name}: {t.shape[0]} images but {len(self.labels)} labels")
        return t.contiguous()

    @property
    def is_loaded(self) -> bool:
        return self._images is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._map_persistent and self._images is not None:  # a worker re-maps the file, never a copy of it
            state["_images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._images is None and self._loader is None and self._map_path is not None:
            mapped = open_mapped(self._map_path, self._shape())
            assert mapped is not None
            self._images = self._check_images(mapped)

    @property
    def normalizer(self) -> Normalize:
        """The :class:`Normalize` of this dataset's ``mean``/``std``: uint8 images to network inputs."""
        if self._normalizer is None or (self._normalizer.mean, self._normalizer.std) != (self.mean, self.std):
            self._normalizer = Normalize(self.mean, self.std)
        return self._normalizer

    # -- class structure --------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> torch.Tensor:
        """Number of images of each class, ``[num_classes]``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, class_ids: Sequence[int], name: str | None = None) -> FewShotDataset:
        """A dataset of the given classes only, relabelled ``0..len(class_ids)-1``."""
        class_ids = [int(c) for c in class_ids]
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(class_ids, dtype=torch.long)] = torch.arange(len(class_ids))
        keep = remap[self.labels] >= 0
        index = keep.nonzero().squeeze(1)
        parent = self

        def load() -> torch.Tensor | ChunkedArray:
            if parent.is_mapped:  # gathered a block at a time: a mapped subset never lands in RAM whole
                return take(parent.images.numpy(), index.numpy())
            return parent.images[index]

        return FewShotDataset(
            name or f"{self.name}[{len(class_ids)} classes]",
            remap[self.labels[index]],
            [self.classes[c] for c in class_ids],
            parent.images[index] if parent.is_loaded and not parent.is_mapped else load,
            channels=self.channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            storage=self._storage,  # type: ignore[arg-type]
            cache_key=cache_key(self.cache_key, class_ids) if self.cache_key else None,
        )

    @classmethod
    def from_torch(cls, dataset: torch.utils.data.Dataset, **options: Any) -> FewShotDataset:
        """A map-style torch dataset of ``(image, label)`` (torchvision's ``ImageFolder``, ``CIFAR100``, your own).

        Read once: labels from ``dataset.targets`` when present, images decoded to uint8
        ``[C, H, W]`` of one size and cached under ``name`` (no cache without a name). The
        options (``name``, ``image_size``, ``channels``, ``cache``, ``mean``, ``std``) are those
        of :func:`metafew.data.torch_dataset.from_torch_dataset`.
        """
        from .torch_dataset import from_torch_dataset

        return from_torch_dataset(dataset, **options)

    # -- torch Dataset protocol (interop with DataLoader, learn2learn, ...) ------
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """One image as normalised float ``[C, H, W]`` and its label."""
        return self.normalizer(self.images[i]), int(self.labels[i])

    def __repr__(self) -> str:
        h, w = self.image_size
        mapped = ", mapped" if self.is_mapped else ""
        return (
            f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
            f"shape=({self.channels}, {h}, {w}){mapped})"
        )


# -- disk cache of decoded images ------------------------------------------------


def cache_key(*parts: object) -> str:
    """A short stable hash of what determines a decoded array (files, size, version)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_array(
    name: str,
    key: str,
    build: Callable[[], np.ndarray | ChunkedArray],
    *,
    sources: str | os.PathLike[str] | None = None,
    mapped: bool | None = None,
) -> np.ndarray:
    """Return ``build()``, cached as ``<cache>/decoded/<name>-<key>.npy``.

    ``build`` may return a :class:`~metafew.data.decode.ChunkedArray` (a streamed decode):
    its blocks are then written straight into ``np.lib.format.open_memmap`` of the temp
    file, so a decode larger than memory never exists as one array; the result is a map of
    the file while a memory-mapped dataset is being built (or with ``mapped=True``: e.g. to
    fill the cache without reading it back), else the file read in.

    The file's key is ``key`` plus what else decides the pixels
    (:func:`metafew.cache_keys.decoded_cache_key`): the decode code, the metafew, numpy and
    Pillow versions, and with ``sources`` a fingerprint of the source files (names, sizes,
    modification times), so a changed decoder, library or source file is never served stale.

    The file is written atomically (temp file + rename), so an interrupted decode
    never leaves a half-written cache behind, and concurrent processes (pytest-xdist
    workers, DDP ranks) wait on a lock file instead of decoding the same images twice.
    Loading a cached array is a single ``np.load``; while a memory-mapped
    :class:`FewShotDataset` is being built it is a map of the file instead (so the
    loader's indexing reads only what the dataset needs).
    """
    if mapped is not None:
        token = _MAP_CACHES.set(mapped)
        try:
            return cached_array(name, key, build, sources=sources)
        finally:
            _MAP_CACHES.reset(token)
    path = cache_dir() / "decoded" / f"{name}-{decoded_cache_key(key, sources=sources)}.npy"
    cached = _load_npy(path)
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return _realize(build())  # no writable cache: decode every time
    with _file_lock(path.with_suffix(".lock")):
        cached = _load_npy(path)  # another process may have built it while we waited
        if cached is not None:
            return cached
        built = build()
        if isinstance(built, ChunkedArray):
            try:
                _fill_npy_atomic(path, built)
            except OSError:  # a full or read-only cache: decode again, without it
                return _realize(built)
            cached = _load_npy(path)
            return cached if cached is not None else _realize(built)
        with contextlib.suppress(OSError):  # a full or read-only cache only costs a re-decode next time
            _save_atomic(path, built)
    return built


def _realize(built: np.ndarray | ChunkedArray) -> np.ndarray:
    """A build's array: a ChunkedArray is mapped from an unnamed temp file while a mapped dataset is
    built (never whole in memory), else assembled in memory."""
    if not isinstance(built, ChunkedArray):
        return built
    if _MAP_CACHES.get():
        return write_mapped(built, None)[0]
    return built.materialize()


def _load_npy(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        if _MAP_CACHES.get():
            return _map_npy(path)
        return np.load(path)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)  # corrupt cache: rebuild
        return None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save(path, array)`` through a temp file in the same folder and a rename: all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- memory-mapped storage -------------------------------------------------------

_MAP_CACHES: contextvars.ContextVar[bool] = contextvars.ContextVar("metafew_map_caches", default=False)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"4GiB"``, ``"4G"``, ``"500MB"``, ``"1.5gb"`` or ``"1048576"``.

    Binary units throughout (``K``/``KB``/``KiB`` = 1024 bytes, ``G`` = 2**30): a memory
    budget is compared with RAM, which is counted in powers of two.

    >>> parse_size("4GiB") == parse_size("4G") == 4 * 2**30, parse_size("1.5MB"), parse_size("0")
    (True, 1572864, 0)
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise DatasetError(f"cannot read {text!r} as a size; write it like 4GiB, 500MB or 0")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def memory_budget() -> int:
    """Bytes a dataset may take in RAM before ``storage="auto"`` memory-maps it.

    ``$METAFEW_MEMORY_BUDGET`` (``"4GiB"``, ``"0"``: map every dataset), else a quarter of
    the machine's physical memory (4 GiB where that cannot be read). The budget is per
    dataset: a few datasets of one run each stay under it.
    """
    env = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if env:
        try:
            return parse_size(env)
        except DatasetError as e:
            raise DatasetError(f"${MEMORY_BUDGET_ENV}: {e}") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):  # Windows, or an unknown sysconf name
        return 4 << 30


def _check_storage(storage: object) -> str:
    if storage not in STORAGES:
        raise DatasetError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return str(storage)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def mapped_cache_path(name: str, key: str) -> Path:
    """Where the memory-mapped copy of dataset ``name`` with cache key ``key`` lives: ``<cache>/mapped/<name>-<key>.npy``."""
    return cache_dir() / "mapped" / f"{_slug(name)}-{key}.npy"


@contextlib.contextmanager
def _prefer_mapped_caches() -> Iterator[None]:
    """Within: :func:`cached_array` maps its files instead of reading them whole."""
    token = _MAP_CACHES.set(True)
    try:
        yield
    finally:
        _MAP_CACHES.reset(token)


def _is_file_mapped(array: object) -> bool:
    return isinstance(array, np.memmap) and getattr(array, "_mmap", None) is not None


def _maps_whole_npy(array: np.ndarray, path: Path) -> bool:
    """Whether ``array`` (a file map) is the whole of the ``.npy`` at ``path``, so that mapping the
    file again (in a worker, a later process) gives the same images; False for a view or an unlinked file."""
    if not array.flags.c_contiguous:
        return False
    try:
        shape, dtype, fortran, _ = _npy_layout(path)
    except (OSError, ValueError):
        return False
    return tuple(shape) == tuple(array.shape) and dtype == array.dtype and not fortran


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data_offset)`` from a ``.npy`` header; ValueError if it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, dtype, fortran, f.tell()


def _map_npy(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Map a ``.npy`` copy-on-write after checking its header and size; ValueError naming what is wrong."""
    file_shape, dtype, fortran, offset = _npy_layout(path)
    if shape is not None and (tuple(file_shape) != tuple(shape) or dtype != np.uint8 or fortran):
        raise ValueError(f"it holds {dtype} {tuple(file_shape)}, not uint8 {tuple(shape)}")
    want = offset + math.prod(file_shape) * dtype.itemsize
    have = path.stat().st_size
    if have != want:
        raise ValueError(f"it is truncated or padded: {have:,} bytes where its header needs {want:,}")
    # "c" (copy-on-write), not "r": torch wants a writable array, and a stray in-place
    # write then changes this process's copy instead of crashing on a read-only page.
    return np.load(path, mmap_mode="c")


def open_mapped(path: Path, shape: tuple[int, ...], *, missing_ok: bool = False) -> np.ndarray | None:
    """The uint8 ``[N, C, H, W]`` memory map of ``path``; DatasetError naming it when it is damaged.

    ``missing_ok``: None for a file that does not exist yet (it is then written by the caller).
    """
    if missing_ok and not path.exists():
        return None
    try:
        return _map_npy(path, shape)
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{path}: the memory-mapped image cache is damaged ({e}); delete it and it is rebuilt on the next load"
        ) from None


def write_mapped(array: np.ndarray | ChunkedArray, path: Path | None) -> tuple[np.ndarray, Path]:
    """Write ``array`` as a ``.npy`` at ``path`` atomically and return ``(its memory map, path)``.

    ``path=None``: an unnamed temporary file in the cache folder (else the system temp
    folder), unlinked once mapped (POSIX keeps it while mapped). Written a few MB at a
    time (a :class:`~metafew.data.decode.ChunkedArray` block by block, as it is decoded)
    into the map of a temp file, then renamed: an interrupted write leaves no file
    under the final name, and concurrent writers of one path wait on a lock.
    """
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot write the memory-mapped image cache {path}: {e}") from None
        with _file_lock(path.with_suffix(".lock")):
            existing = open_mapped(path, array.shape, missing_ok=True)  # written while we waited
            if existing is None:
                _write_npy_atomic(path, array)
                existing = open_mapped(path, array.shape)
            assert existing is not None
            return existing, path
    folder = cache_dir() / "mapped"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".anonymous-", suffix=".npy")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _fill_npy(tmp_path, array)
        mapped = open_mapped(tmp_path, array.shape)
    finally:
        with contextlib.suppress(OSError):  # Windows cannot unlink a mapped file: it stays until reboot/cleanup
            tmp_path.unlink()
    assert mapped is not None
    return mapped, tmp_path


_FLUSH_BYTES = 256 << 20  # written pages are flushed to disk this often, so few are dirty at a time


def _fill_npy(path: Path, array: np.ndarray | ChunkedArray) -> None:
    """Write ``array`` as the ``.npy`` at ``path`` through ``np.lib.format.open_memmap``, a block at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(array.shape))
    try:
        row = max(1, math.prod(array.shape[1:]))
        if isinstance(array, ChunkedArray):
            flushed = [0]

            def flush(rows_done: int, target: np.memmap = out) -> None:
                if (rows_done - flushed[0]) * row >= _FLUSH_BYTES:
                    target.flush()
                    flushed[0] = rows_done

            array.write_into(out, on_block=flush)
        else:
            per = max(1, (64 << 20) // row)
            for lo in range(0, len(array), per):
                out[lo : lo + per] = array[lo : lo + per]
        out.flush()
    finally:
        del out
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fill_npy_atomic(path: Path, array: np.ndarray | ChunkedArray) -> None:
    """:func:`_fill_npy` into a temp file beside ``path``, renamed to it when complete: all or nothing.

    Whatever interrupts it (an error of the decode, Ctrl-C, a full disk: OSError, raised as is)
    leaves no file under the final name and no temp file; a killed process can leave only a
    ``.npy.tmp`` that nothing ever reads.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy.tmp")
    os.close(fd)
    try:
        _fill_npy(Path(tmp), array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_npy_atomic(path: Path, array: np.ndarray | ChunkedArray) -> None:
    try:
        _fill_npy_atomic(path, array)
    except OSError as e:  # a full disk, a read-only cache
        raise DatasetError(f"cannot write the memory-mapped image cache {path}: {e}") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builders just both decode
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def as_path(p: str | os.PathLike[str]) -> Path:
    return Path(p).expanduser()
