"""N-way K-shot episodes, sampled by index on the target device.

:class:`EpisodeSampler` keeps the dataset's uint8 images on the target device and
draws each episode as an index tensor: no per-image decoding, PIL or Python loop
per image. All randomness comes from a CPU ``torch.Generator`` seeded by the user,
so the same seed gives the same episodes on any device and in any process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, TypeVar

import torch

from ..device import resolve_device
from ..errors import EpisodeError
from ..seeding import generator
from .base import FewShotDataset
from .normalize import Normalize

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_E = TypeVar("_E", bound="Episode")


@dataclass(frozen=True)
class Episode:
    """One task: labelled support images and query images to classify.

    ``support_y``/``query_y`` are episode labels in ``0..N-1``; ``classes[j]`` is the
    dataset class id behind episode label ``j``.
    """

    support_x: torch.Tensor  # [N*K, C, H, W] float
    support_y: torch.Tensor  # [N*K] long
    query_x: torch.Tensor  # [N*Q, C, H, W] float
    query_y: torch.Tensor  # [N*Q] long
    classes: torch.Tensor  # [N] long, dataset class ids

    @property
    def n_way(self) -> int:
        return int(self.classes.shape[-1])

    @property
    def k_shot(self) -> int:
        return self.support_y.shape[-1] // self.n_way

    @property
    def n_query(self) -> int:
        return self.query_y.shape[-1] // self.n_way

    def to(self: _E, device: str | torch.device, non_blocking: bool = True) -> _E:
        return replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )


@dataclass(frozen=True)
class EpisodeBatch(Episode):
    """B tasks stacked along a leading task dimension (``support_x`` is ``[B, N*K, C, H, W]``)."""

    def __len__(self) -> int:
        return int(self.support_x.shape[0])

    def __getitem__(self, i: int) -> Episode:
        return Episode(*(getattr(self, f.name)[i] for f in fields(self)))

    def __iter__(self) -> Iterator[Episode]:  # type: ignore[override]
        return (self[i] for i in range(len(self)))

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> EpisodeBatch:
        return EpisodeBatch(*(torch.stack([getattr(e, f.name) for e in episodes]) for f in fields(Episode)))


class EpisodeSet(Sequence[Episode]):
    """A fixed, ordered set of episodes: the same tasks at every call and for every learner."""

    def __init__(
        self, length: int, get: Callable[[slice, EpisodeBatch | None], EpisodeBatch], name: str = "episodes"
    ) -> None:
        self._length = length
        self._get = get
        self.name = name

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"episode {i} out of range for {len(self)} episodes")
        i %= len(self)
        return self._get(slice(i, i + 1), None)[0]

    def batches(self, batch_size: int, reuse: bool = False) -> Iterator[EpisodeBatch]:
        """Iterate the episodes ``batch_size`` at a time, in order.

        ``reuse=True``: each batch may be written into the memory of the one before, for
        loops that are done with a batch when they ask for the next (as ``evaluate`` is).
        """
        last = None
        for start in range(0, len(self), batch_size):
            last = self._get(slice(start, min(start + batch_size, len(self))), last if reuse else None)
            yield last

    @staticmethod
    def from_episodes(episodes: Sequence[Episode], name: str = "episodes") -> EpisodeSet:
        """Wrap explicit episodes (e.g. Lake's official runs) as an :class:`EpisodeSet`."""
        eps = list(episodes)
        return EpisodeSet(len(eps), lambda s, _reuse: EpisodeBatch.stack(eps[s]), name)


class EpisodeSampler:
    """Draw N-way K-shot episodes with Q queries per class from a :class:`FewShotDataset`.

    Args:
        dataset: the split to sample from (its classes are the episode classes): a
            :class:`FewShotDataset`, or any map-style torch ``Dataset`` of ``(image, label)``
            (torchvision's ``ImageFolder``, ``CIFAR100``, your own), read once by
            :meth:`FewShotDataset.from_torch` (call it yourself with a ``name`` to cache the images).
        n_way, k_shot, n_query: classes per episode, support and query images per class.
        seed: seeds the training stream (:meth:`sample`, :meth:`sample_batch`) and,
            separately, the fixed evaluation set (:meth:`fixed`).
        device: where images live and episodes are built (``"auto"``: CUDA if present).
        normalize: subtract the dataset's mean and divide by its std, per channel
            (:class:`metafew.data.Normalize`); False: only scale to ``[0, 1]``.
        augment: optional on-device augmentation ``f(x, generator) -> x`` applied to
            training episodes (never to :meth:`fixed` ones), e.g. :class:`metafew.data.FlipCrop`.
        too_few: a class with fewer than ``k_shot + n_query`` images raises
            (``"error"``, the default) or is left out with a warning (``"skip"``).
    """

    def __init__(
        self,
        dataset: FewShotDataset | torch.utils.data.Dataset,
        n_way: int,
        k_shot: int,
        n_query: int = 15,
        *,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        normalize: bool = True,
        augment: Augment | None = None,
        too_few: Literal["error", "skip"] = "error",
    ) -> None:
        for label, v in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            if not isinstance(v, int) or v < (0 if label == "n_query" else 1):
                raise EpisodeError(f"{label} must be a positive integer, got {v!r}")
        if not isinstance(dataset, FewShotDataset):
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise EpisodeError(
                    f"EpisodeSampler needs a FewShotDataset or a map-style torch Dataset, got {type(dataset).__name__}"
                )
            dataset = FewShotDataset.from_torch(dataset)  # read once; pass a converted one to cache it
        self.dataset = dataset
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.seed = seed
        self.device = resolve_device(device)
        self.normalize = normalize
        self.augment = augment

        need = k_shot + n_query
        counts = dataset.class_counts()
        short = (counts < need).nonzero().squeeze(1).tolist()
        if short:
            names = ", ".join(f"'{dataset.classes[c]}' ({int(counts[c])} images)" for c in short[:3])
            more = f" and {len(short) - 3} more" if len(short) > 3 else ""
            msg = (
                f"{dataset.name}: class {names}{more} has fewer than the {need} images a "
                f"{k_shot}-shot {n_query}-query episode needs"
            )
            if too_few == "error":
                raise EpisodeError(msg + " (use too_few='skip' to leave such classes out)")
            warnings.warn(msg + "; left out", stacklevel=2)
        eligible = (counts >= need).nonzero().squeeze(1)
        if n_way > len(eligible):
            extra = f" with at least {need} images" if short else ""
            raise EpisodeError(
                f"{n_way}-way episodes need {n_way} classes but {dataset.name} has only {len(eligible)}{extra}"
            )

        # [C, max_count] table of image indices per eligible class, padded with 0.
        order = torch.argsort(dataset.labels, stable=True)
        offsets = torch.cumsum(counts, 0) - counts
        self._class_ids = eligible
        self._counts = counts[eligible]
        max_count = int(self._counts.max())
        col = torch.arange(max_count)
        valid = col[None, :] < self._counts[:, None]
        gather = (offsets[eligible][:, None] + col[None, :]).clamp(max=len(order) - 1)
        self._table = torch.where(valid, order[gather], torch.zeros((), dtype=torch.long))
        self._valid = valid
        self._uniform = bool((self._counts == max_count).all())

        self.generator = generator(seed, "train")
        self._images: torch.Tensor | None = None
        self._normalizer = Normalize(dataset.mean, dataset.std) if normalize else Normalize.identity(dataset.channels)
        self._normalizer.scale_shift(self.device)  # made once, up front
        self._support_y = torch.arange(n_way, device=self.device).repeat_interleave(k_shot)
        self._query_y = torch.arange(n_way, device=self.device).repeat_interleave(n_query)
        self._fixed: dict[tuple[int, int], EpisodeSet] = {}

    # -- public API --------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes episodes are drawn from."""
        return len(self._class_ids)

    def sample(self) -> Episode:
        """One training episode."""
        idx, classes = self._draw(1, self.generator)
        sx, sy, qx, qy, cl = self._build(idx, classes, self.generator if self.augment is not None else None)
        return Episode(sx[0], sy[0], qx[0], qy[0], cl[0])

    def sample_batch(self, batch_size: int, reuse: EpisodeBatch | None = None) -> EpisodeBatch:
        """``batch_size`` training episodes stacked along a leading task dimension.

        ``reuse``: an earlier batch of this sampler that is no longer needed; its image
        memory is overwritten when the shapes match (a training loop passes the last
        batch: on the CPU this saves a fresh allocation, and its page faults, per step).
        """
        idx, classes = self._draw(batch_size, self.generator)
        return EpisodeBatch(*self._build(idx, classes, self.generator if self.augment is not None else None, reuse))

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def fixed(self, num_episodes: int = 600, seed: int | None = None) -> EpisodeSet:
        """A fixed evaluation set: the same ``num_episodes`` episodes at every call.

        The episodes depend only on the dataset, N, K, Q and ``seed`` (default: the
        sampler's seed), never on how many training episodes were drawn before.
        """
        seed = self.seed if seed is None else seed
        key = (num_episodes, seed)
        if key not in self._fixed:
            gen = generator(seed, "fixed")
            idx, classes = self._draw(num_episodes, gen)
            name = f"{self.dataset.name} {self.n_way}-way {self.k_shot}-shot x{num_episodes} (seed {seed})"
            get = lambda s, reuse: EpisodeBatch(*self._build(idx[s], classes[s], None, reuse))  # noqa: E731
            self._fixed[key] = EpisodeSet(num_episodes, get, name)
        return self._fixed[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """RNG state, so a resumed run draws exactly the episodes it would have drawn."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.dataset.name!r}, {self.n_way}-way {self.k_shot}-shot {self.n_query}-query, "
            f"classes={self.num_classes}, seed={self.seed}, device={self.device})"
        )

    # -- internals ---------------------------------------------------------------
    def _draw(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices ``[B, N, K+Q]`` and class ids ``[B, N]``, drawn on the CPU generator."""
        n, m = self.n_way, self.k_shot + self.n_query
        pick = torch.rand(batch_size, self.num_classes, generator=gen).topk(n, dim=1).indices  # [B, N]
        keys = torch.rand(batch_size, n, self._table.shape[1], generator=gen)
        if not self._uniform:
            keys = keys.masked_fill(~self._valid[pick], -1.0)  # padding never wins
        pos = keys.topk(m, dim=2).indices  # [B, N, K+Q], distinct within a class
        idx = self._table[pick.unsqueeze(2), pos]
        return idx, self._class_ids[pick]

    def _device_images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self.dataset.images.to(self.device)
        return self._images

    def _build(
        self,
        idx: torch.Tensor,
        classes: torch.Tensor,
        aug_gen: torch.Generator | None,
        reuse: EpisodeBatch | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Support/query images and labels with a leading task dimension, from image indices ``[B, N, K+Q]``."""
        b, n = idx.shape[:2]
        nk, nq = n * self.k_shot, n * self.n_query
        # All supports, then all queries: both halves come out as contiguous views, no copy.
        order = torch.cat([idx[:, :, : self.k_shot].reshape(-1), idx[:, :, self.k_shot :].reshape(-1)])
        x = self._gather(order.to(self.device, non_blocking=True), _reusable(reuse))
        if aug_gen is not None and self.augment is not None:
            x = self.augment(x, aug_gen)
        shape = x.shape[1:]
        return (
            x[: b * nk].view(b, nk, *shape),
            self._support_y.expand(b, -1),
            x[b * nk :].view(b, nq, *shape),
            self._query_y.expand(b, -1),
            classes.to(self.device, non_blocking=True),
        )

    def _gather(self, order: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Normalised float images ``x[i] = images[order[i]] * scale + shift``, written into ``out`` if it fits."""
        images = self._device_images()
        shape = (len(order), *images.shape[1:])
        if out is None or out.shape != shape or out.device != images.device:
            out = torch.empty(shape, dtype=torch.float32, device=images.device)
        # On the CPU, widen and normalise a few MB at a time so the two in-place passes
        # run in cache; on a GPU one pass over everything is best.
        per_image = images[0].numel() * 4
        step = max(1, _CHUNK_BYTES // per_image) if images.device.type == "cpu" else len(order)
        for lo in range(0, len(order), step):
            self._normalizer.into_(out[lo : lo + step], images.index_select(0, order[lo : lo + step]))
        return out


_CHUNK_BYTES = 16 << 20


def _reusable(batch: EpisodeBatch | None) -> torch.Tensor | None:
    """The one float buffer behind ``batch``'s support and query images, if it is laid out as :meth:`_build` makes it."""
    if batch is None:
        return None
    base = batch.support_x._base
    if base is None or base.dtype != torch.float32 or not base.is_contiguous():
        return None
    query_base = batch.query_x._base
    if batch.support_x.data_ptr() != base.data_ptr() or query_base is None or query_base.data_ptr() != base.data_ptr():
        return None
    return base
