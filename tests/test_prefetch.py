"""The episode prefetch of a memory-mapped dataset runs in the background, on its own thread.

:class:`~metafew.data.EpisodeSampler` gathers the first meta-batch of a memory-mapped
dataset in the caller's thread and, from then on, each next one on the thread named
``metafew-prefetch`` while the caller trains on the current one. These tests watch every
host gather (``metafew.data.episodes._gather_host``): which thread ran it and which images
it read, and check that the batches handed out are still those of the in-memory path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch

import metafew
import metafew.data.episodes as episodes
from metafew.data import EpisodeSampler, FewShotDataset

PREFETCH_THREAD = "metafew-prefetch"
BATCH = 3


def dataset(storage: str) -> FewShotDataset:
    """10 classes of 6 random 28x28 images, in memory or memory-mapped (from the same array)."""
    images = np.random.default_rng(0).integers(0, 256, (60, 1, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 6)
    names = [f"c{i}" for i in range(10)]
    return FewShotDataset("toy/prefetch", labels, names, lambda: images, channels=1, image_size=(28, 28),
                          storage=storage, cache_key="p0")  # fmt: skip


class Gathers:
    """Stands in for ``_gather_host``: records (thread name, image indices) of every gather."""

    def __init__(self) -> None:
        self.real = episodes._gather_host
        self.calls: list[tuple[str, list[int]]] = []
        self.in_background = threading.Semaphore(0)  # released when the prefetch thread finishes one

    def __call__(self, images: torch.Tensor, order: torch.Tensor, *args: Any) -> torch.Tensor:
        out = self.real(images, order, *args)
        name = threading.current_thread().name
        self.calls.append((name, order.tolist()))
        if name.startswith(PREFETCH_THREAD):
            self.in_background.release()
        return out


@pytest.fixture()
def mapped(tmp_path, monkeypatch: pytest.MonkeyPatch) -> FewShotDataset:
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    data = dataset("mmap")
    assert data.images.shape == (60, 1, 28, 28) and data.is_mapped  # written to the map, then mapped
    return data


@pytest.fixture()
def gathers(monkeypatch: pytest.MonkeyPatch) -> Gathers:
    spy = Gathers()
    monkeypatch.setattr(episodes, "_gather_host", spy)
    return spy


def expected_orders(n: int) -> list[list[int]]:
    """The image indices of the first ``n`` meta-batches, supports then queries (drawn as the sampler draws them)."""
    ref = EpisodeSampler(dataset("memory"), 5, 1, 2, seed=3, device="cpu")
    return [ref._order(ref._draw(BATCH, ref.generator)[0]).tolist() for _ in range(n)]


def test_batches_from_the_second_on_are_gathered_on_the_prefetch_thread(mapped, gathers) -> None:
    sampler = EpisodeSampler(mapped, 5, 1, 2, seed=3, device="cpu")
    memory = EpisodeSampler(dataset("memory"), 5, 1, 2, seed=3, device="cpu")
    for i in range(4):
        batch = sampler.sample_batch(BATCH)
        same = memory.sample_batch(BATCH)
        assert all(torch.equal(getattr(batch, f.name), getattr(same, f.name)) for f in fields(batch))
        # the caller's "training step": long enough not to be taken for a sampling-only loop
        # (which gathers inline), and it ends once the thread has gathered the next batch
        assert gathers.in_background.acquire(timeout=10), f"batch {i + 2} was not gathered in the background"
        time.sleep(0.002)
    threads = [name for name, _ in gathers.calls]
    assert threads[0] == threading.main_thread().name  # the first one: nothing to hide it behind
    assert len(threads) == 5 and all(t.startswith(PREFETCH_THREAD) for t in threads[1:]), threads
    # and the thread gathered the right images: batch k's, drawn ahead exactly as the next call draws
    assert [order for _, order in gathers.calls] == expected_orders(5)


def test_training_on_a_mapped_dataset_prefetches_each_next_meta_batch(mapped, gathers) -> None:
    class SlowStep(metafew.ProtoNet):
        """A training step long enough (20 ms) for the prefetch thread to run on any machine."""

        def meta_loss(self, batch: metafew.EpisodeBatch) -> Any:
            time.sleep(0.02)
            return super().meta_loss(batch)

    torch.manual_seed(0)
    learner = SlowStep(metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8))
    sampler = EpisodeSampler(mapped, 5, 1, 2, seed=3, device="cpu")
    metafew.train(learner, sampler, steps=4, meta_batch_size=BATCH, progress=False)
    threads = [name for name, _ in gathers.calls]
    # step 1's batch in the caller's thread; steps 2-4 and the one drawn ahead after step 4 on the thread
    assert len(threads) == 5 and threads[0] == threading.main_thread().name, threads
    assert all(t.startswith(PREFETCH_THREAD) for t in threads[1:]), threads
    assert [order for _, order in gathers.calls] == expected_orders(5)


def test_without_prefetch_every_gather_is_the_callers(mapped, gathers) -> None:
    sampler = EpisodeSampler(mapped, 5, 1, 2, seed=3, device="cpu", prefetch=False)
    for _ in range(3):
        sampler.sample_batch(BATCH)
        time.sleep(0.002)
    assert [name for name, _ in gathers.calls] == [threading.main_thread().name] * 3
