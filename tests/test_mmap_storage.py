"""Memory-mapped datasets: chosen by size, written once atomically, and sampled bit-identically to memory."""

from __future__ import annotations

import pickle
import signal
import tracemalloc
from dataclasses import fields

import numpy as np
import pytest
import torch

import metafew.data.base as base
import metafew.data.decode as decode
import metafew.data.episodes as episodes
from metafew.backbones import create as create_backbone
from metafew.checkpoint import load_state
from metafew.data import EpisodeBatch, EpisodeSampler, FewShotDataset, FlipCrop, load_dataset
from metafew.data.base import cached_array, mapped_cache_path, memory_budget, parse_size
from metafew.data.decode import ChunkedArray, decode_files, take
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


# -- streamed decodes: a mapped dataset never exists whole in memory ------------------------------


def streamed(n: int, row: tuple[int, ...] = (3, 32, 32), block: int = 16, fail_after: int | None = None):
    """A ChunkedArray of ``n`` random images made ``block`` rows at a time (seeded per block), and the
    same images as one array; ``fail_after``: Ctrl-C after that many blocks, as a killed decode."""

    def make(lo: int) -> np.ndarray:
        k = min(block, n - lo)
        return np.random.default_rng(lo).integers(0, 256, (k, *row), dtype=np.uint8)

    def blocks():
        for j, lo in enumerate(range(0, n, block)):
            if fail_after is not None and j == fail_after:
                raise KeyboardInterrupt
            yield make(lo)

    whole = np.concatenate([make(lo) for lo in range(0, n, block)])
    return ChunkedArray((n, *row), blocks), whole


def peak_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the peak of the memory Python and numpy allocated while it ran (tracemalloc)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def streamed_dataset(chunked: ChunkedArray, **kw) -> FewShotDataset:
    n, c, h, w = chunked.shape
    labels = np.arange(n) % 10
    return FewShotDataset("toy/streamed", labels, [f"c{i}" for i in range(10)], lambda: chunked, channels=c,
                          image_size=(h, w), **kw)  # fmt: skip


def test_a_streamed_decode_is_written_to_the_map_a_block_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    chunked, whole = streamed(2000)  # 6 MB decoded, 48 KB a block
    ds = streamed_dataset(chunked, storage="mmap", cache_key="s0")
    images, peak = peak_bytes(lambda: ds.images)
    assert ds.is_mapped and torch.equal(images, torch.from_numpy(whole))
    assert peak < whole.nbytes // 20, f"{peak:,} bytes allocated to map a {whole.nbytes:,}-byte dataset"
    # the same decode read into memory allocates the whole array: the measurement sees numpy's arrays
    _, peak_memory = peak_bytes(lambda: streamed_dataset(streamed(2000)[0], storage="memory").images)
    assert peak_memory >= whole.nbytes


def test_auto_decides_from_the_declared_size_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    chunked, whole = streamed(400)  # 1.2 MB
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "1MB")
    read_whole = []
    real = ChunkedArray.materialize
    monkeypatch.setattr(ChunkedArray, "materialize", lambda self: read_whole.append(1) or real(self))
    big = streamed_dataset(chunked, cache_key="s1")
    assert big.nbytes == whole.nbytes and not big.is_loaded  # known from the labels and the declared shape
    assert torch.equal(big.images, torch.from_numpy(whole)) and big.is_mapped and read_whole == []
    monkeypatch.setenv("METAFEW_MEMORY_BUDGET", "2MB")
    small = streamed_dataset(streamed(400)[0], cache_key="s1")
    assert torch.equal(small.images, big.images) and not small.is_mapped and read_whole == [1]


def test_a_killed_streamed_decode_leaves_no_file_that_is_trusted_later(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):  # after 5 of 13 blocks
        streamed_dataset(streamed(200, fail_after=5)[0], storage="mmap", cache_key="s2").images  # noqa: B018
    with pytest.raises(KeyboardInterrupt):  # the same through the decoded cache
        cached_array("toy-decode", "k", lambda: streamed(200, fail_after=5)[0])
    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert all(f.endswith(".lock") for f in files), files  # no half map, no temp file
    chunked, whole = streamed(200)
    assert np.array_equal(cached_array("toy-decode", "k", lambda: chunked), whole)
    again = streamed_dataset(streamed(200)[0], storage="mmap", cache_key="s2")
    assert torch.equal(again.images, torch.from_numpy(whole))


def test_blocks_that_do_not_add_up_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    short = ChunkedArray((10, 1, 4, 4), lambda: iter([np.zeros((6, 1, 4, 4), np.uint8)]))
    with pytest.raises(ValueError, match="gave 6 rows, not 10"):
        short.materialize()
    bad = FewShotDataset("toy/bad", np.zeros(10, int), ["a"], lambda: short, channels=1, image_size=(5, 5),
                         storage="mmap")  # fmt: skip
    with pytest.raises(DatasetError, match=r"images are \(1, 4, 4\), not the declared \(1, 5, 5\)"):
        bad.images  # noqa: B018
    assert not list((tmp_path / "mapped").glob("*.npy"))


def test_take_gathers_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(decode, "CHUNK_BYTES", 3 * 16)  # three 1x4x4 rows a block
    src = np.arange(20 * 16, dtype=np.uint8).reshape(20, 1, 4, 4)
    index = np.array([19, 0, 7, 7, 3, 12, 5])
    seen = []
    chunked = take(src, index, lambda b, rows: seen.append(rows) or b[:, :, ::-1])
    assert np.array_equal(chunked.materialize(), src[index][:, :, ::-1])
    assert seen == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_caltech101_decodes_into_its_map_in_bounded_memory(data_root, tmp_path, monkeypatch):
    """The real decode path (JPEG files through the decode pool into the decoded cache, then the
    subset gathered into its map) with tiny chunks: the peak memory is a few chunks plus the file
    listing, never the decoded subset (14 MB) nor all of Caltech-101 (112 MB); and the map equals
    the one-array decode (:func:`decode_files`) bit for bit."""
    monkeypatch.setenv("METAFEW_DECODE_WORKERS", "1")
    monkeypatch.setenv("METAFEW_CACHE", str(tmp_path))
    monkeypatch.setattr(decode, "FILE_CHUNK", 8)
    monkeypatch.setattr(decode, "CHUNK_BYTES", 8 * 3 * 64 * 64)
    mapped = load_dataset("caltech101", "test", root=data_root, image_size=64, storage="mmap")
    images, peak = peak_bytes(lambda: mapped.images)
    assert mapped.is_mapped and mapped.mapped_path is not None and len(mapped) > 1000
    assert peak < mapped.nbytes // 2, f"{peak:,} bytes allocated to map {mapped.nbytes:,} bytes of images"
    folder = data_root / "caltech101" / "101_ObjectCategories"
    paths = [str(p) for c in mapped.classes for p in sorted((folder / c).glob("*.jpg"))]
    whole, failed = decode_files(paths, (64, 64), 3)
    assert not failed and np.array_equal(whole, images.numpy())
