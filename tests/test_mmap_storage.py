"""Memory-mapped datasets: chosen by size, written once atomically, and sampled bit-identically to memory."""

from __future__ import annotations

import pickle
import signal
from dataclasses import fields

import numpy as np
import pytest
import torch

import metafew.data.base as base
import metafew.data.episodes as episodes
from metafew.backbones import create as create_backbone
from metafew.checkpoint import load_state
from metafew.data import EpisodeBatch, EpisodeSampler, FewShotDataset, FlipCrop, load_dataset
from metafew.data.base import mapped_cache_path, memory_budget, parse_size
from metafew.engine import evaluate, train
from metafew.errors import DatasetError
from metafew.learners import create as create_learner


@pytest.fixture(autouse=True)
def always_prefetch(monkeypatch):
    """A test draws batches back to back, which the sampler takes for a sampling-only loop and
    gathers inline; make it prefetch every batch, as in training (one test turns this off)."""
    monkeypatch.setattr(episodes, "_LOOP_GAP_S", -1.0)


@pytest.fixture(scope="module")
def omniglot_pair(data_root):
    """Omniglot's vinyals test subset twice: read into memory, and memory-mapped."""
    memory = load_dataset("omniglot", "test", root=data_root, storage="memory")
    mapped = load_dataset("omniglot", "test", root=data_root, storage="mmap")
    assert torch.equal(memory.images, mapped.images) and mapped.is_mapped and not memory.is_mapped
    return memory, mapped


def toy(n_classes: int = 6, per_class: int = 8, **kw) -> tuple[FewShotDataset, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n_classes * per_class, 1, 12, 12), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    kw.setdefault("cache_key", "k0")
    names = [f"c{i}" for i in range(n_classes)]
    return FewShotDataset("toy/set", labels, names, lambda: images, channels=1, image_size=(12, 12), **kw), images


def same(a: EpisodeBatch, b: EpisodeBatch) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def tiny_protonet():
    torch.manual_seed(0)
    return create_learner("protonet", create_backbone("conv4", in_channels=1, image_size=28, hidden=16))


# -- choosing the storage ------------------------------------------------------------------


def test_sizes_and_the_budget(monkeypatch):
    assert parse_size("4GiB") == parse_size("4G") == parse_size("4 gb") == 4 << 30
    assert parse_size("1.5M") == 3 << 19 and parse_size("0") == 0 and parse_size("4096") == 4096
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "300MB")
    assert memory_budget() == 300 << 20
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "lots")
    with pytest.raises(DatasetError, match=r"METAFEW_MEMORY_BUDGET.*'lots'"):
        memory_budget()
    monkeypatch.delenv("METAFEW_MEMORY_BUDGET")
    assert memory_budget() > 0  # a quarter of RAM
    with pytest.raises(DatasetError, match="storage must be one of auto, memory, mmap"):
        load_dataset("omniglot", "test", storage="disk")


def test_auto_maps_a_dataset_over_the_budget(monkeypatch, data_root):
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "1GiB")
    small = load_dataset("omniglot", "test", root=data_root)
    assert small.nbytes == 33840 * 28 * 28 and not small.is_mapped
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "10MB")  # the test subset decodes to 26.5 MB
    big = load_dataset("omniglot", "test", root=data_root)
    assert not big.is_loaded and big.storage == "auto"  # decided when the images are first read
    assert torch.equal(big.images, small.images) and big.is_mapped and "mapped" in repr(big)
    assert big.mapped_path is not None and big.mapped_path.parent.name == "mapped" and big.mapped_path.is_file()


# -- the same episodes, losses, resume and evaluation ------------------------------------------


@pytest.mark.parametrize(
    "augment, loop_gap", [(None, -1.0), (FlipCrop(), -1.0), (None, 1.0)], ids=["plain", "augmented", "inline"]
)
def test_mapped_episodes_are_bit_identical(omniglot_pair, augment, loop_gap, monkeypatch):
    monkeypatch.setattr(episodes, "_LOOP_GAP_S", loop_gap)  # 1.0: every call looks sampling-only after 3
    memory, mapped = omniglot_pair
    a = EpisodeSampler(memory, 5, 1, 5, seed=7, device="cpu", augment=augment)
    b = EpisodeSampler(mapped, 5, 1, 5, seed=7, device="cpu", augment=augment)
    assert b.is_mapped and not a.is_mapped
    last_a = last_b = None
    for size in (4, 4, 4, 3, 4):  # a change of batch size takes the prefetched batch back
        last_a, last_b = a.sample_batch(size, reuse=last_a), b.sample_batch(size, reuse=last_b)
        assert same(last_a, last_b)
    one_a, one_b = a.sample(), b.sample()  # drawn after the prefetched batch was taken back
    assert torch.equal(one_a.query_x, one_b.query_x) and torch.equal(one_a.classes, one_b.classes)
    assert torch.equal(a.state_dict()["generator"], b.state_dict()["generator"])
    assert same(a.sample_batch(4), b.sample_batch(4))
    assert all(same(x, y) for x, y in zip(a.fixed(11).batches(3), b.fixed(11).batches(3), strict=True))
    assert torch.equal(a.fixed(11)[5].support_x, b.fixed(11)[5].support_x)


def test_state_dict_is_that_of_the_batches_handed_out(omniglot_pair):
    _, mapped = omniglot_pair
    b = EpisodeSampler(mapped, 5, 1, 5, seed=2, device="cpu")
    for _ in range(3):
        b.sample_batch(2)  # the 4th is being gathered now
    state = b.state_dict()
    fresh = EpisodeSampler(mapped, 5, 1, 5, seed=2, device="cpu", prefetch=False)
    for _ in range(3):
        fresh.sample_batch(2)
    assert torch.equal(state["generator"], fresh.state_dict()["generator"])
    resumed = EpisodeSampler(mapped, 5, 1, 5, seed=99, device="cpu")
    resumed.sample_batch(2)  # something prefetched: load_state_dict drops it
    resumed.load_state_dict(state)
    fourth = resumed.sample_batch(2)
    assert same(fourth, fresh.sample_batch(2)) and same(fourth, b.sample_batch(2))
    assert same(resumed.sample_batch(2), fresh.sample_batch(2))


class InterruptAt(EpisodeSampler):
    """A sampler that sends the process a Ctrl-C while drawing its ``at``-th meta-batch."""

    def __init__(self, *args, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.calls = at, 0

    def sample_batch(self, batch_size: int, reuse=None):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().sample_batch(batch_size, reuse)


def test_protonet_trains_to_the_same_losses_and_resumes_exactly(tmp_path, omniglot_pair):
    memory, mapped = omniglot_pair

    def run(sampler, out, **kw):
        return train(tiny_protonet(), sampler, steps=5, meta_batch_size=2, out_dir=out, log_every=1,
                     checkpoint_every=2, progress=False, **kw)  # fmt: skip

    losses = lambda r: [(h["step"], h["loss"], h["acc"]) for h in r.history]  # noqa: E731
    in_memory = run(EpisodeSampler(memory, 5, 1, 3, seed=1, device="cpu"), tmp_path / "memory")
    whole = run(EpisodeSampler(mapped, 5, 1, 3, seed=1, device="cpu"), tmp_path / "mapped")
    assert losses(whole) == losses(in_memory)  # exact float equality, step by step
    with pytest.raises(KeyboardInterrupt):  # saved after step 3, with the 4th batch already prefetched
        run(InterruptAt(mapped, 5, 1, 3, seed=1, device="cpu", at=3), tmp_path / "resumed")
    resumed = run(EpisodeSampler(mapped, 5, 1, 3, seed=1, device="cpu"), tmp_path / "resumed", resume=True)
    assert losses(resumed) == losses(in_memory)
    last = [load_state(tmp_path / d / "last.safetensors")[0] for d in ("memory", "resumed")]
    assert all(torch.equal(v, last[1]["learner"][k]) for k, v in last[0]["learner"].items())
    assert torch.equal(last[0]["sampler"]["generator"], last[1]["sampler"]["generator"])


def test_evaluation_on_a_mapped_dataset_equals_memory(omniglot_pair):
    memory, mapped = omniglot_pair
    learner = tiny_protonet()
    a = evaluate(learner, EpisodeSampler(memory, 5, 1, 5, seed=0, device="cpu").fixed(20), batch_size=6, progress=False)
    b = evaluate(learner, EpisodeSampler(mapped, 5, 1, 5, seed=0, device="cpu").fixed(20), batch_size=6, progress=False)
    assert (a.accuracy_mean, a.accuracy_ci95, a.episodes) == (b.accuracy_mean, b.accuracy_ci95, b.episodes)


# -- the mapped file ------------------------------------------------------------------------


def test_mmap_writes_a_missing_cache_then_maps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    path = mapped_cache_path("toy/set", "k0")
    assert not path.exists()
    calls = []
    ds, images = toy(storage="mmap")
    loader = ds._loader
    ds._loader = lambda: calls.append(1) or loader()
    assert torch.equal(ds.images, torch.from_numpy(images)) and ds.is_mapped and ds.mapped_path == path
    assert path.is_file() and np.array_equal(np.load(path, mmap_mode="r"), images)
    again, _ = toy(storage="mmap")
    again._loader = lambda: calls.append(1) or loader()
    assert torch.equal(again.images, ds.images) and calls == [1]  # the second one only mapped the file
    assert {p.name for p in path.parent.iterdir()} == {path.name, path.with_suffix(".lock").name}
    sub = ds.subset([1, 3])  # a subset of a map is mapped too, under its own key
    expected = np.concatenate([images[8:16], images[24:32]])
    assert torch.equal(sub.images, torch.from_numpy(expected)) and sub.is_mapped and sub.mapped_path is not None


def test_a_damaged_map_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    toy(storage="mmap")[0].images  # noqa: B018 - writes the file
    path = mapped_cache_path("toy/set", "k0")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(DatasetError) as e:
        toy(storage="mmap")[0].images  # noqa: B018
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "delete it" in msg and "\n" not in msg
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(DatasetError, match="damaged"):
        toy(storage="mmap")[0].images  # noqa: B018
    path.unlink()
    assert toy(storage="mmap")[0].is_loaded is False and toy(storage="mmap")[0].images.shape == (48, 1, 12, 12)


@pytest.mark.parametrize("where", ["fill", "rename"])
def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch, where):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    real_fill = base._fill_npy

    def half_fill(path, array):  # writes half the images, then the process is interrupted
        real_fill(path, array[: len(array) // 2].repeat(2, axis=0))
        raise KeyboardInterrupt

    def no_rename(src, dst):
        raise KeyboardInterrupt

    if where == "fill":
        monkeypatch.setattr(base, "_fill_npy", half_fill)
    else:
        monkeypatch.setattr(base.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        toy(storage="mmap")[0].images  # noqa: B018
    folder = mapped_cache_path("toy/set", "k0").parent
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []  # no half file, no temp file
    monkeypatch.undo()
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    ds, images = toy(storage="mmap")
    assert torch.equal(ds.images, torch.from_numpy(images))


def test_an_unkeyed_dataset_maps_a_private_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    ds, images = toy(cache_key=None, storage="mmap")
    assert torch.equal(ds.images, torch.from_numpy(images)) and ds.is_mapped and ds.mapped_path is None
    assert list((tmp_path / "mapped").iterdir()) == []  # unlinked once mapped
    view = ds.images
    ds.storage = "memory"  # read into RAM
    assert not ds.is_mapped and torch.equal(ds.images, torch.from_numpy(images))
    assert ds.images.data_ptr() != view.data_ptr()  # a copy, not a view of the map


def test_a_pickled_mapped_dataset_maps_its_file_again(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    ds = toy(n_classes=20, per_class=50, storage="mmap")[0]
    ds.images  # noqa: B018
    blob = pickle.dumps(ds)  # e.g. to a spawned DataLoader worker
    assert len(blob) < ds.nbytes // 2
    again = pickle.loads(blob)
    assert again.is_mapped and again.mapped_path == ds.mapped_path and torch.equal(again.images, ds.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mapped_episodes_on_cuda_come_through_pinned_memory(omniglot_pair):
    memory, mapped = omniglot_pair
    a = EpisodeSampler(memory, 5, 1, 5, seed=7, device="cuda")
    b = EpisodeSampler(mapped, 5, 1, 5, seed=7, device="cuda")
    last_a = last_b = None
    for _ in range(4):
        last_a, last_b = a.sample_batch(4, reuse=last_a), b.sample_batch(4, reuse=last_b)
        assert last_b.support_x.is_cuda and same(last_a, last_b)
    assert all(buf is None or buf.is_pinned() for buf in b._stage("train").buffers)
    assert all(same(x, y) for x, y in zip(a.fixed(9).batches(4), b.fixed(9).batches(4), strict=True))
