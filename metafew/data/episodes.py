"""N-way K-shot episodes, sampled by index on the target device.

:class:`EpisodeSampler` keeps the dataset's uint8 images on the target device and
draws each episode as an index tensor: no per-image decoding, PIL or Python loop
per image. All randomness comes from a CPU ``torch.Generator`` seeded by the user,
so the same seed gives the same episodes on any device and in any process.

A memory-mapped dataset (:attr:`FewShotDataset.is_mapped`) stays on the host: each
meta-batch is gathered from the map into a (pinned, for CUDA) staging buffer and
copied to the device with ``non_blocking=True``, and :meth:`EpisodeSampler.sample_batch`
gathers the next meta-batch in a background thread while the caller trains on this
one. The prefetch is speculative and exact: it draws the batch the next call would
draw, :meth:`EpisodeSampler.state_dict` gives the state after the batches handed
out (not the prefetched one), and anything else that uses the generator first
rewinds it, so the episodes, and a resumed run, are bit-identical to the in-memory path.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Literal, NamedTuple, TypeVar

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
        prefetch: for a memory-mapped dataset, gather the next meta-batch in a
            background thread during the caller's step (default True); a caller that
            asks for batches back to back, with no step to hide the gather behind, gets
            them gathered inline. Ignored for a dataset in memory (gathered on the device).
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
        prefetch: bool = True,
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

        self._generator = generator(seed, "train")
        self.prefetch = prefetch
        self._images: torch.Tensor | None = None
        self._mapped = False  # images stay on the host (a memory map); set when they are first read
        self._pending: _Prefetch | None = None
        self._returned_at = -1.0  # perf_counter when sample_batch last returned
        self._busy_gaps = 0  # calls in a row that came back within _LOOP_GAP_S: a loop of nothing but sampling
        self._inline = 0  # meta-batches still to gather inline (no prefetch) before trying it again
        self._stages: dict[str, _Stage] = {}
        self._fixed_pending: dict[tuple[int, int], _FixedPrefetch] = {}
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

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of the training stream (reading it first takes back any prefetched draw)."""
        self._rewind()
        return self._generator

    @generator.setter
    def generator(self, gen: torch.Generator) -> None:
        self._drop_pending()
        self._generator = gen

    @property
    def is_mapped(self) -> bool:
        """Whether episodes are gathered on the host from a memory-mapped dataset (known once images are read)."""
        self._device_images()
        return self._mapped

    def sample(self) -> Episode:
        """One training episode."""
        gen = self.generator  # takes back a prefetched meta-batch: this draw comes first
        idx, classes = self._draw(1, gen)
        sx, sy, qx, qy, cl = self._build(idx, classes, gen if self.augment is not None else None)
        return Episode(sx[0], sy[0], qx[0], qy[0], cl[0])

    def sample_batch(self, batch_size: int, reuse: EpisodeBatch | None = None) -> EpisodeBatch:
        """``batch_size`` training episodes stacked along a leading task dimension.

        ``reuse``: an earlier batch of this sampler that is no longer needed; its image
        memory is overwritten when the shapes match (a training loop passes the last
        batch: on the CPU this saves a fresh allocation, and its page faults, per step).

        From a memory-mapped dataset (with ``prefetch``) this hands out the batch the
        previous call gathered in the background, then starts gathering the next one.
        """
        self._device_images()
        aug = self._generator if self.augment is not None else None
        if not (self._mapped and self.prefetch) or self._sampling_only():
            self._rewind()
            idx, classes = self._draw(batch_size, self._generator)
            batch = EpisodeBatch(*self._build(idx, classes, aug, reuse))
            self._returned_at = time.perf_counter()
            return batch
        stage = self._stage("train")
        pending, self._pending = self._pending, None
        if pending is not None and pending.batch_size == batch_size and pending.pid == os.getpid():
            idx, classes, slot = pending.idx, pending.classes, pending.slot
            gathered = _result(pending.future, self._host_images(), pending.order, stage, slot)
        else:
            if pending is not None:  # another batch size: draw this one afresh, in order
                self._take_back(pending)
            idx, classes = self._draw(batch_size, self._generator)
            order = self._order(idx)
            slot = stage.take()
            gathered = _gather_host(self._host_images(), order, stage, slot)
        batch = EpisodeBatch(*self._build(idx, classes, aug, reuse, gathered=(gathered, stage, slot)))
        # Draw the next batch now, exactly as the next call would (after this one's augmentation
        # draws), and gather it in the background; state_dict() still reports the state before it.
        resume = self._generator.get_state()
        nidx, nclasses = self._draw(batch_size, self._generator)
        order = self._order(nidx)
        nslot = stage.take()
        future = _executor().submit(_gather_host, self._host_images(), order, stage, nslot)
        self._pending = _Prefetch(batch_size, resume, nidx, nclasses, order, nslot, future, os.getpid())
        self._returned_at = time.perf_counter()
        return batch

    def _sampling_only(self) -> bool:
        """Whether the caller does nothing between meta-batches (a sampling benchmark, a data dump).

        Then a prefetch has no step to hide behind and only adds a thread hand-off per batch,
        so batches are gathered inline for a while (the episodes are the same either way).
        """
        if self._inline > 0:
            self._inline -= 1
            return True
        gap = time.perf_counter() - self._returned_at
        self._busy_gaps = self._busy_gaps + 1 if gap < _LOOP_GAP_S else 0
        if self._busy_gaps >= 3:
            self._busy_gaps, self._inline = 0, 64
            return True
        return False

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

            def get(s: slice, reuse: EpisodeBatch | None) -> EpisodeBatch:
                return self._get_fixed(key, idx, classes, s, reuse)

            self._fixed[key] = EpisodeSet(num_episodes, get, name)
        return self._fixed[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """RNG state, so a resumed run draws exactly the episodes it would have drawn.

        With a meta-batch prefetched, the state before it was drawn: that of the batches handed out.
        """
        pending = self._pending
        return {"generator": pending.resume.clone() if pending is not None else self._generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s RNG state (a prefetched meta-batch is dropped)."""
        self._drop_pending()
        self._generator.set_state(state["generator"])

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
            images = self.dataset.images
            self._mapped = self.dataset.is_mapped
            self._images = images if self._mapped else images.to(self.device)  # a map is read on the host
        return self._images

    def _host_images(self) -> torch.Tensor:
        assert self._images is not None and self._mapped
        return self._images

    def _stage(self, role: str) -> _Stage:
        if role not in self._stages:
            self._stages[role] = _Stage(self.device)
        return self._stages[role]

    def _order(self, idx: torch.Tensor) -> torch.Tensor:
        """Image indices of a batch, all supports then all queries (the layout :meth:`_build` makes)."""
        return torch.cat([idx[:, :, : self.k_shot].reshape(-1), idx[:, :, self.k_shot :].reshape(-1)])

    def _take_back(self, pending: _Prefetch) -> None:
        """Wait for a prefetch (its buffer may be reused) and put the generator back to before its draw."""
        _wait(pending.future, pending.pid)
        self._generator.set_state(pending.resume)

    def _rewind(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._take_back(pending)

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            _wait(pending.future, pending.pid)

    def _get_fixed(
        self, key: tuple[int, int], idx: torch.Tensor, classes: torch.Tensor, s: slice, reuse: EpisodeBatch | None
    ) -> EpisodeBatch:
        """Episodes ``s`` of a fixed set; from a map, the next slice of the same length is gathered meanwhile."""
        self._device_images()
        if not (self._mapped and self.prefetch):
            return EpisodeBatch(*self._build(idx[s], classes[s], None, reuse))
        stage = self._stage(f"fixed-{key}")
        pending = self._fixed_pending.pop(key, None)
        if pending is not None and (pending.start, pending.stop, pending.pid) == (s.start, s.stop, os.getpid()):
            slot = pending.slot
            gathered = _result(pending.future, self._host_images(), pending.order, stage, slot)
        else:
            if pending is not None:
                _wait(pending.future, pending.pid)
            order = self._order(idx[s])
            slot = stage.take()
            gathered = _gather_host(self._host_images(), order, stage, slot)
        batch = EpisodeBatch(*self._build(idx[s], classes[s], None, reuse, gathered=(gathered, stage, slot)))
        start, stop = s.stop, min(s.stop + (s.stop - s.start), len(idx))
        if start < stop:
            order = self._order(idx[start:stop])
            nslot = stage.take()
            future = _executor().submit(_gather_host, self._host_images(), order, stage, nslot)
            self._fixed_pending[key] = _FixedPrefetch(start, stop, order, nslot, future, os.getpid())
        return batch

    def _build(
        self,
        idx: torch.Tensor,
        classes: torch.Tensor,
        aug_gen: torch.Generator | None,
        reuse: EpisodeBatch | None = None,
        gathered: tuple[torch.Tensor, _Stage, int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Support/query images and labels with a leading task dimension, from image indices ``[B, N, K+Q]``.

        ``gathered``: the batch's uint8 images already gathered on the host (from a map), with
        the staging buffer slot they are in.
        """
        b, n = idx.shape[:2]
        nk, nq = n * self.k_shot, n * self.n_query
        # All supports, then all queries: both halves come out as contiguous views, no copy.
        order = self._order(idx) if gathered is None else None
        self._device_images()
        if self._mapped:
            if gathered is None:
                assert order is not None
                stage = self._stage("sync")
                slot = stage.take()
                gathered = (_gather_host(self._host_images(), order, stage, slot), stage, slot)
            x = self._from_host(*gathered, _reusable(reuse))
        else:
            assert order is not None
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
        out = _float_buffer(out, (len(order), *images.shape[1:]), images.device)
        # On the CPU, widen and normalise a few MB at a time so the two in-place passes
        # run in cache; on a GPU one pass over everything is best.
        per_image = images[0].numel() * 4
        step = max(1, _CHUNK_BYTES // per_image) if images.device.type == "cpu" else len(order)
        for lo in range(0, len(order), step):
            self._normalizer.into_(out[lo : lo + step], images.index_select(0, order[lo : lo + step]))
        return out

    def _from_host(self, host: torch.Tensor, stage: _Stage, slot: int, out: torch.Tensor | None) -> torch.Tensor:
        """Normalised float images on the device from uint8 ones gathered on the host (same values as :meth:`_gather`)."""
        out = _float_buffer(out, tuple(host.shape), self.device)
        if self.device.type == "cpu":
            step = max(1, _CHUNK_BYTES // max(1, host[0].numel() * 4)) if len(host) else 1
            for lo in range(0, len(host), step):
                self._normalizer.into_(out[lo : lo + step], host[lo : lo + step])
            return out
        device_u8 = host.to(self.device, non_blocking=True)  # from pinned memory: asynchronous
        stage.copied(slot)  # the slot is refilled only once this copy is done
        return self._normalizer.into_(out, device_u8)


_CHUNK_BYTES = 16 << 20
_LOOP_GAP_S = 0.5e-3  # less than this between meta-batches: the caller only samples


def _float_buffer(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if out is None or tuple(out.shape) != tuple(shape) or out.device != device:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return out


# -- host gathering from a memory map, and its background thread ----------------------------


class _Prefetch(NamedTuple):
    batch_size: int
    resume: torch.Tensor  # generator state before this batch was drawn
    idx: torch.Tensor
    classes: torch.Tensor
    order: torch.Tensor
    slot: int
    future: Future[torch.Tensor]
    pid: int  # a forked child never sees its parent's prefetch finish


class _FixedPrefetch(NamedTuple):
    start: int
    stop: int
    order: torch.Tensor
    slot: int
    future: Future[torch.Tensor]
    pid: int


class _Stage:
    """Two host buffers for uint8 batches (pinned when the target is CUDA), used in turn.

    One is filled (by the prefetch thread) while the other is copied to the device; a
    CUDA event per buffer says when its last copy is done, so it is never refilled early.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self) -> int:
        """The slot the next batch goes into (the two alternate)."""
        slot, self.turn = self.turn, 1 - self.turn
        return slot

    def buffer(self, slot: int, n: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        """The first ``n`` images of slot ``slot``'s buffer, grown if needed, once its last copy is done."""
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        buf = self.buffers[slot]
        if buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != image_shape:
            buf = torch.empty((n, *image_shape), dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[slot] = buf
        return buf[:n]

    def copied(self, slot: int) -> None:
        """Mark the end of slot ``slot``'s copy to the device (on the current CUDA stream)."""
        if self.pin:
            event = self.events[slot]
            if event is None:
                event = self.events[slot] = torch.cuda.Event()
            event.record()


def _gather_host(images: torch.Tensor, order: torch.Tensor, stage: _Stage, slot: int) -> torch.Tensor:
    """``images[order]`` (a memory map: only these pages are read) into the stage's buffer ``slot``."""
    out = stage.buffer(slot, len(order), tuple(images.shape[1:]))
    return torch.index_select(images, 0, order, out=out)


_executor_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """The one background thread that gathers prefetched batches (the copy releases the GIL)."""
    global _pool
    with _executor_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metafew-prefetch")
        return _pool


def _forget_executor() -> None:  # a forked child has no copy of the thread
    global _pool, _executor_lock
    _pool, _executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def _result(
    future: Future[torch.Tensor], images: torch.Tensor, order: torch.Tensor, stage: _Stage, slot: int
) -> torch.Tensor:
    """A prefetched batch: the thread's result, or, if the thread has not started on it yet (a busy
    machine), the same gather done here and now rather than waiting for the thread to be scheduled."""
    if future.cancel():
        return _gather_host(images, order, stage, slot)
    return future.result()


def _wait(future: Future[torch.Tensor], pid: int) -> None:
    """Wait for a prefetch that is no longer wanted (its errors are the next draw's to raise)."""
    if pid != os.getpid():  # started in the parent of this forked process: it never finishes here
        return
    try:
        future.result()
    except Exception:  # the same gather is redone, and raises, if it matters
        pass


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
