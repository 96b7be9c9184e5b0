"""learn2learn interop: l2l tasks as metafew episodes, metafew datasets as l2l MetaDatasets.

Needs learn2learn 0.2.0, built as ``benchmarks/learn2learn/install.sh`` does; CI installs
only ``.[dev]``, so there these tests are skipped (the missing-dependency error is tested
without it).
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

import metafew
from metafew.data.base import FewShotDataset
from metafew.errors import EpisodeError, MissingDependencyError
from metafew.interop import learn2learn as interop


def _has_l2l() -> bool:
    try:
        interop.require_learn2learn()
    except MissingDependencyError:
        return False
    return True


HAS_L2L = _has_l2l()
needs_l2l = pytest.mark.skipif(
    not HAS_L2L,
    reason="learn2learn is not installed: run benchmarks/learn2learn/install.sh (learn2learn 0.2.0 into .venv)",
)


def test_missing_learn2learn_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # what an absent package looks like to import
    with pytest.raises(MissingDependencyError) as err:
        interop.to_meta_dataset(_toy())
    msg = str(err.value)
    assert "\n" not in msg and "benchmarks/learn2learn/install.sh" in msg and isinstance(err.value, ImportError)


def _toy(classes: int = 6, per_class: int = 7) -> FewShotDataset:
    """Images whose every pixel is their own index: which image went where can be read back."""
    n = classes * per_class
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 20, 20).contiguous()
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(classes).repeat_interleave(per_class)[shuffle]
    names = [f"c{i}" for i in range(classes)]
    return FewShotDataset("toy", labels, names, images, channels=1, image_size=(20, 20), mean=[0.0], std=[1.0])


# -- one task ---------------------------------------------------------------------------------------------------
def test_episode_from_task_splits_each_class_support_first() -> None:
    y = torch.tensor([7, 3, 7, 3, 7, 3, 9, 9, 9])
    x = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 1, 4, 4)
    ep = interop.episode_from_task((x, y), k_shot=1)
    assert (ep.n_way, ep.k_shot, ep.n_query) == (3, 1, 2)
    assert ep.classes.tolist() == [3, 7, 9]  # the task's own label values
    assert ep.support_y.tolist() == [0, 1, 2] and ep.query_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.support_x[:, 0, 0, 0].tolist() == [1, 0, 6]  # first image of each class, in task order
    assert ep.query_x[:, 0, 0, 0].tolist() == [3, 5, 2, 4, 7, 8]
    with pytest.raises(EpisodeError, match="a 2-shot 2-query episode needs 4"):
        interop.episode_from_task((x, y), k_shot=2, n_query=2)
    with pytest.raises(EpisodeError, match="pass n_query"):
        interop.episode_from_task((x[:8], y[:8]), k_shot=1)
    gray = interop.episode_from_task((torch.zeros(4, 5, 5, dtype=torch.uint8), [0, 0, 1, 1]), k_shot=1)
    assert gray.support_x.shape == (2, 1, 5, 5) and gray.support_x.dtype == torch.float32


# -- both ways on a synthetic dataset -----------------------------------------------------------------------------
@needs_l2l
def test_metafew_dataset_to_l2l_and_back() -> None:
    data = _toy()
    meta = interop.to_meta_dataset(data)
    assert sorted(meta.labels) == list(range(6)) and len(meta) == len(data)
    assert all(int(data.labels[i]) == c for c, idx in meta.labels_to_indices.items() for i in idx)
    image, label = meta[5]
    assert label == int(data.labels[5]) and torch.equal(image, data[5][0])

    tasks = interop.to_taskset(data, n_way=3, k_shot=2, n_query=3, num_tasks=10)
    episodes = interop.episodes_from_taskset(tasks, k_shot=2)
    assert len(episodes) == 10
    for ep in episodes:
        assert (ep.n_way, ep.k_shot, ep.n_query) == (3, 2, 3)
        assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2] and ep.support_x.shape == (6, 1, 20, 20)
        # every image of an episode class is an image of one dataset class, 5 distinct ones per class
        index = torch.cat([ep.support_x, ep.query_x])[:, 0, 0, 0].mul(255).round().long()
        labels = torch.cat([ep.support_y, ep.query_y])
        for j in range(3):
            mine = index[labels == j]
            assert len(set(mine.tolist())) == 5 and len(set(data.labels[mine].tolist())) == 1
    # task i is l2l's own task i, and the set is the same at every read
    first = episodes[0]
    assert torch.equal(first.query_x, episodes[0].query_x)
    assert torch.equal(interop.episode_from_task(tasks[0], 2).support_x, first.support_x)


@needs_l2l
def test_fixed_episodes_are_seeded_and_leave_random_alone() -> None:
    tasks = interop.to_taskset(_toy(), n_way=2, k_shot=1, n_query=2)  # num_tasks=-1: endless
    random.seed(123)
    before = random.random()
    random.seed(123)
    a = interop.episodes_from_taskset(tasks, 4, k_shot=1, seed=5)
    assert random.random() == before  # the caller's random stream is untouched
    b = interop.episodes_from_taskset(tasks, 4, k_shot=1, seed=5)
    c = interop.episodes_from_taskset(tasks, 4, k_shot=1, seed=6)
    assert all(torch.equal(x.support_x, y.support_x) for x, y in zip(a, b))
    assert not all(torch.equal(x.support_x, y.support_x) for x, y in zip(a, c))
    with pytest.raises(EpisodeError, match="pass num_episodes"):
        interop.episodes_from_taskset(tasks, k_shot=1)
    batch = next(interop.batches_from_taskset(tasks, k_shot=1, batch_size=3))
    assert batch.support_x.shape == (3, 2, 1, 20, 20) and batch.query_y.shape == (3, 4)


@needs_l2l
def test_a_taskset_built_with_l2l_itself_as_get_tasksets_builds_omniglot() -> None:
    """The transforms of l2l.vision.benchmarks' Omniglot (fused N-ways K-shots, class rotations) on a torch dataset."""
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, FusedNWaysKShots, LoadData, RemapLabels
    from learn2learn.vision.transforms import RandomClassRotation

    x = torch.rand(40, 1, 12, 12)
    y = torch.arange(8).repeat_interleave(5)
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    transforms = [
        FusedNWaysKShots(meta, n=4, k=3),
        LoadData(meta),
        RemapLabels(meta),
        ConsecutiveLabels(meta),
        RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0]),
    ]
    tasks = l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=20)
    episodes = interop.episodes_from_taskset(tasks, k_shot=1)  # 1 support + 2 queries per class
    ep = episodes[7]
    assert (len(episodes), ep.n_way, ep.k_shot, ep.n_query) == (20, 4, 1, 2)
    assert ep.support_x.shape == (4, 1, 12, 12) and ep.classes.tolist() == [0, 1, 2, 3]
    learner = metafew.ProtoNet(metafew.create_backbone("conv4", in_channels=1, image_size=12, hidden=8, depth=2))
    assert metafew.evaluate(learner, episodes, progress=False).episodes == 20


# -- Omniglot's test classes ------------------------------------------------------------------------------------
@needs_l2l
def test_protonet_on_l2l_tasks_of_omniglot_test(omniglot_test) -> None:
    """metafew Omniglot -> l2l TaskDataset (l2l's own transforms) -> metafew episodes -> evaluate."""
    tasks = interop.to_taskset(omniglot_test, n_way=5, k_shot=1, n_query=5, num_tasks=8)
    episodes = interop.episodes_from_taskset(tasks, k_shot=1)
    ep = episodes[3]
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (25, 1, 28, 28)
    assert ep.query_y.tolist() == [j for j in range(5) for _ in range(5)]

    torch.manual_seed(0)
    learner = metafew.ProtoNet(metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=16))
    result = metafew.evaluate(learner, episodes, batch_size=4, progress=False)
    assert result.episodes == 8 and (result.n_way, result.k_shot, result.n_query) == (5, 1, 5)
    assert 0.0 <= result.accuracy_mean <= 1.0
    loss, acc = learner.meta_loss(next(episodes.batches(2)))  # training works on them too
    assert loss.requires_grad and 0.0 <= float(acc) <= 1.0
