"""EpisodeSampler on synthetic index-coded data (exact checks) and on real datasets."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from metafew.data import Caltech101, EpisodeSampler, FewShotDataset, MedMNIST
from metafew.errors import EpisodeError


def coded_dataset(counts: list[int], names: list[str] | None = None) -> FewShotDataset:
    """Image ``i`` carries its own index in two pixels, so episodes can be traced back to images."""
    n = sum(counts)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    names = names or [f"class{c:02d}" for c in range(len(counts))]
    return FewShotDataset("coded", labels, names, images, channels=1, image_size=(4, 4))


def indices(x: torch.Tensor) -> torch.Tensor:
    """Image indices of an un-normalised episode tensor ``[..., 1, 4, 4]``."""
    px = (x[..., 0, 0, :2] * 255).round().long()
    return px[..., 0] + 256 * px[..., 1]


def test_shapes_labels_and_disjoint_support_query() -> None:
    ds = coded_dataset([20 + c for c in range(12)])  # non-uniform class sizes
    sampler = EpisodeSampler(ds, n_way=5, k_shot=2, n_query=3, seed=1, device="cpu", normalize=False)
    for _ in range(20):
        ep = sampler.sample()
        assert ep.support_x.shape == (10, 1, 4, 4) and ep.query_x.shape == (15, 1, 4, 4)
        assert (ep.n_way, ep.k_shot, ep.n_query) == (5, 2, 3)
        assert torch.equal(ep.support_y, torch.arange(5).repeat_interleave(2))
        assert torch.equal(ep.query_y, torch.arange(5).repeat_interleave(3))
        assert len(set(ep.classes.tolist())) == 5 and 0 <= int(ep.classes.min()) and int(ep.classes.max()) < 12
        s, q = indices(ep.support_x), indices(ep.query_x)
        assert len(set(s.tolist()) | set(q.tolist())) == 25  # no image twice, support and query disjoint
        assert torch.equal(ds.labels[s], ep.classes[ep.support_y])  # every image belongs to its class
        assert torch.equal(ds.labels[q], ep.classes[ep.query_y])


def test_batches_and_normalisation() -> None:
    ds = coded_dataset([10] * 6)
    sampler = EpisodeSampler(ds, n_way=3, k_shot=1, n_query=2, seed=0, device="cpu")
    batch = sampler.sample_batch(4)
    assert batch.support_x.shape == (4, 3, 1, 4, 4) and batch.query_y.shape == (4, 6) and len(batch) == 4
    raw = EpisodeSampler(ds, n_way=3, k_shot=1, n_query=2, seed=0, device="cpu", normalize=False).sample_batch(4)
    assert torch.allclose(batch.support_x, (raw.support_x - 0.5) / 0.5)  # default mean/std 0.5


def test_reusing_a_spent_batch_gives_the_same_episodes_in_the_same_memory(monkeypatch) -> None:
    import metafew.data.episodes as episodes

    monkeypatch.setattr(episodes, "_CHUNK_BYTES", 200)  # force several gather chunks per batch
    ds = coded_dataset([20] * 30)
    make = lambda: EpisodeSampler(ds, 5, 2, 3, seed=5, device="cpu", normalize=False)  # noqa: E731
    fresh, reusing = make(), make()
    spent = reusing.sample_batch(6)
    assert torch.equal(spent.query_x, fresh.sample_batch(6).query_x)
    for _ in range(3):
        expected, ptr = fresh.sample_batch(6), spent.support_x.data_ptr()
        spent = reusing.sample_batch(6, reuse=spent)
        assert spent.support_x.data_ptr() == ptr  # written in place
        assert torch.equal(spent.support_x, expected.support_x) and torch.equal(spent.query_x, expected.query_x)
    other_shape = reusing.sample_batch(2, reuse=spent)  # does not fit: a new buffer, nothing overwritten
    assert other_shape.support_x.data_ptr() != spent.support_x.data_ptr()


def test_determinism() -> None:
    ds = coded_dataset([20] * 30)
    make = lambda seed: EpisodeSampler(ds, 5, 1, 5, seed=seed, device="cpu", normalize=False)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    for _ in range(5):
        ea, eb, ec = a.sample(), b.sample(), c.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        assert torch.equal(ea.classes, eb.classes)
    assert not torch.equal(indices(ea.query_x), indices(ec.query_x))
    ba, bb = make(3).sample_batch(8), make(3).sample_batch(8)
    assert torch.equal(ba.support_x, bb.support_x) and torch.equal(ba.query_x, bb.query_x)
    assert not torch.equal(ba.support_x, make(4).sample_batch(8).support_x)


def test_fixed_episodes_identical_across_calls_and_samplers() -> None:
    ds = coded_dataset([20] * 30)
    a = EpisodeSampler(ds, 5, 1, 5, seed=0, device="cpu", normalize=False)
    b = EpisodeSampler(ds, 5, 1, 5, seed=0, device="cpu", normalize=False)
    for _ in range(3):
        b.sample()  # training draws must not shift the fixed set
    fa, fa2, fb = a.fixed(600), a.fixed(600), b.fixed(600)
    assert len(fa) == 600
    ia = torch.cat([indices(e.query_x) for e in fa.batches(100)])
    ia2 = torch.cat([indices(e.query_x) for e in fa2.batches(128)])
    ib = torch.cat([indices(e.query_x) for e in fb.batches(100)])
    reused = torch.cat([indices(e.query_x) for e in fb.batches(128, reuse=True)])  # indices() copies each batch
    assert torch.equal(ia, ia2) and torch.equal(ia, ib) and torch.equal(ia, reused)
    assert torch.equal(fa[17].support_x, fb[17].support_x) and torch.equal(fa[-1].classes, fb[-1].classes)
    other = torch.cat([indices(e.query_x) for e in a.fixed(600, seed=1).batches(100)])
    assert not torch.equal(ia, other)
    assert len({tuple(e.classes.tolist()) for e in fa[:50]}) > 40  # episodes differ from each other


def test_too_few_images_names_the_class() -> None:
    ds = coded_dataset([20, 20, 3, 20, 20, 20], names=["ant", "bee", "rare_bird", "cow", "dog", "eel"])
    with pytest.raises(EpisodeError, match="rare_bird"):
        EpisodeSampler(ds, n_way=5, k_shot=5, n_query=5, device="cpu")
    with pytest.warns(UserWarning, match="rare_bird"):
        sampler = EpisodeSampler(ds, n_way=5, k_shot=5, n_query=5, device="cpu", too_few="skip")
    assert sampler.num_classes == 5
    for ep in sampler.fixed(50):
        assert 2 not in ep.classes.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EpisodeError, match="6-way"):  # only 5 classes remain after skipping
            EpisodeSampler(ds, n_way=6, k_shot=5, n_query=5, device="cpu", too_few="skip")


def test_more_ways_than_classes() -> None:
    ds = coded_dataset([20] * 10)
    with pytest.raises(EpisodeError, match="11-way"):
        EpisodeSampler(ds, n_way=11, k_shot=1, n_query=1, device="cpu")
    with pytest.raises(EpisodeError):
        EpisodeSampler(ds, n_way=0, k_shot=1, device="cpu")
    with pytest.raises(EpisodeError):
        EpisodeSampler(ds, n_way=5, k_shot=0, device="cpu")


# -- real data --------------------------------------------------------------------------


def test_omniglot_episodes_belong_to_the_split(omniglot_test) -> None:
    ds = omniglot_test
    sampler = EpisodeSampler(ds, n_way=20, k_shot=5, n_query=15, seed=0, device="cpu", normalize=False)
    images = ds.images
    for ep in sampler.fixed(3):
        assert ep.support_x.shape == (100, 1, 28, 28) and ep.query_x.shape == (300, 1, 28, 28)
        s = (ep.support_x * 255).round().to(torch.uint8)
        q = (ep.query_x * 255).round().to(torch.uint8)
        for j, c in enumerate(ep.classes.tolist()):
            pool = images.index_select(0, (ds.labels == c).nonzero().flatten()).flatten(1)  # its 20 drawings
            found = []
            for x in torch.cat([s[ep.support_y == j], q[ep.query_y == j]]).flatten(1):
                match = (pool == x).all(1).nonzero().flatten().tolist()
                assert match, f"episode image not among the images of {ds.classes[c]}"
                found.append(match[0])
            assert len(set(found)) == 20  # 5 support + 15 query, all different drawings


def test_omniglot_normalised_episode(omniglot_val) -> None:
    ep = EpisodeSampler(omniglot_val, n_way=5, k_shot=1, n_query=15, seed=0, device="cpu").sample()
    assert ep.support_x.dtype == torch.float32
    assert abs(float(ep.query_x.mean())) < 0.6 and 0.5 < float(ep.query_x.std()) < 1.6
    assert ep.query_x.min() >= -0.35  # background 0 maps to -mean/std


def test_medmnist_and_caltech_episodes(data_root: Path) -> None:
    breast = MedMNIST("breastmnist", "test", root=data_root)
    ep = EpisodeSampler(breast, n_way=2, k_shot=5, n_query=10, device="cpu").sample()
    assert ep.support_x.shape == (10, 1, 28, 28) and set(ep.classes.tolist()) == {0, 1}
    with pytest.raises(EpisodeError, match="3-way"):
        EpisodeSampler(breast, n_way=3, k_shot=1, n_query=1, device="cpu")
    caltech = Caltech101("val", root=data_root)
    ep = EpisodeSampler(caltech, n_way=5, k_shot=5, n_query=15, device="cpu").sample()
    assert ep.support_x.shape == (25, 3, 84, 84) and ep.query_x.shape == (75, 3, 84, 84)
    assert int(ep.classes.max()) < 15
