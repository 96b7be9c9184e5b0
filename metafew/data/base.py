"""The in-memory dataset every sampler and learner works on.

A :class:`FewShotDataset` is a labelled set of images held as one uint8 tensor
``[N, C, H, W]`` (decoded once, cached on disk), a label tensor ``[N]`` and the
class names. Class names and labels are known from the file listing alone;
images are decoded on first access of :attr:`images`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError
from ..paths import cache_dir
from .normalize import Normalize

ImageLoader = Callable[[], np.ndarray | torch.Tensor]


class FewShotDataset(torch.utils.data.Dataset):
    """Images of one split, grouped by class.

    Args:
        name: a readable identifier, e.g. ``"omniglot/vinyals-train"``.
        labels: class index of every image, ``[N]`` in ``0..len(classes)-1``.
        classes: class names, one per label value.
        images: a uint8 tensor ``[N, C, H, W]``, or a zero-argument callable that
            decodes and returns it (as a numpy or torch uint8 array) on first use.
        mean, std: per-channel normalisation statistics in ``[0, 1]`` units.
        image_size: ``(H, W)``; channels: ``C`` (known without decoding).
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
    ) -> None:
        super().__init__()
        self.name = name
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.classes = list(classes)
        self.channels = int(channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = tuple(float(m) for m in (mean if mean is not None else [0.5] * self.channels))
        self.std = tuple(float(s) for s in (std if std is not None else [0.5] * self.channels))
        self._images: torch.Tensor | None = None
        self._loader: ImageLoader | None = None
        self._normalizer: Normalize | None = None
        if callable(images):
            self._loader = images
        else:
            self._images = self._check_images(images)
        if self.labels.ndim != 1:
            raise DatasetError(f"{name}: labels must be one-dimensional, got shape {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DatasetError(f"{name}: labels fall outside 0..{len(self.classes) - 1}")

    # -- images -----------------------------------------------------------------
    @property
    def images(self) -> torch.Tensor:
        """uint8 ``[N, C, H, W]``; decoded (or read from the disk cache) on first access."""
        if self._images is None:
            assert self._loader is not None
            self._images = self._check_images(self._loader())
            self._loader = None
        return self._images

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

        def load() -> torch.Tensor:
            return parent.images[index]

        return FewShotDataset(
            name or f"{self.name}[{len(class_ids)} classes]",
            remap[self.labels[index]],
            [self.classes[c] for c in class_ids],
            parent.images[index] if parent.is_loaded else load,
            channels=self.channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
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
        return (
            f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
            f"shape=({self.channels}, {h}, {w}))"
        )


# -- disk cache of decoded images ------------------------------------------------


def cache_key(*parts: object) -> str:
    """A short stable hash of what determines a decoded array (files, size, version)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_array(name: str, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Return ``build()``, cached as ``<cache>/decoded/<name>-<key>.npy``.

    The file is written atomically (temp file + rename), so an interrupted decode
    never leaves a half-written cache behind, and concurrent processes (pytest-xdist
    workers, DDP ranks) wait on a lock file instead of decoding the same images twice.
    Loading a cached array is a single ``np.load``.
    """
    path = cache_dir() / "decoded" / f"{name}-{key}.npy"
    cached = _load_npy(path)
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return build()  # no writable cache: decode every time
    with _file_lock(path.with_suffix(".lock")):
        cached = _load_npy(path)  # another process may have built it while we waited
        if cached is not None:
            return cached
        array = build()
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
        except OSError:
            pass  # a full or read-only cache only costs a re-decode next time
    return array


def _load_npy(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        return np.load(path)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)  # corrupt cache: rebuild
        return None


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
