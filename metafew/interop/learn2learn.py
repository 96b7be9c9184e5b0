"""learn2learn interop: run metafew's learners and evaluation on l2l tasks, and l2l on metafew's datasets.

For users coming from `learn2learn <https://github.com/learnables/learn2learn>`_ (0.2.0)::

    import learn2learn as l2l
    from metafew.interop.learn2learn import episodes_from_taskset, to_meta_dataset, to_taskset

    # l2l -> metafew: an l2l benchmark's test tasks as a fixed, seeded metafew EpisodeSet
    tasksets = l2l.vision.benchmarks.get_tasksets("mini-imagenet", test_ways=5, test_samples=16, root="~/data")
    test = episodes_from_taskset(tasksets.test, 600, k_shot=1)          # 1 support + 15 queries per class
    result = metafew.evaluate(learner, test)                            # mean accuracy and 95% CI

    # metafew -> l2l: a metafew dataset as an l2l MetaDataset (or straight to a TaskDataset)
    meta = to_meta_dataset(metafew.load_dataset("omniglot", "test"))
    tasks = to_taskset(metafew.load_dataset("omniglot", "test"), n_way=5, k_shot=1, n_query=15, num_tasks=600)

An l2l task (what ``TaskDataset.sample()`` / ``taskset[i]`` return after ``LoadData``) is
a pair ``(images [M, C, H, W], labels [M])`` holding ``k_shot + n_query`` images of each
of its N classes, in any order. :func:`episode_from_task` splits it the metafew way: per
class (in order of label value) the first ``k_shot`` images it holds are the support, the
next ``n_query`` the queries; episode labels are ``0..N-1`` in order of label value, and
``Episode.classes`` keeps the task's own label values. Images are used as l2l's data
transforms made them (float, normalised as they chose); uint8 images are scaled to ``[0, 1]``.

learn2learn is imported only when one of these functions is called; without it they
raise :class:`~metafew.errors.MissingDependencyError` saying how to install it.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from ..data.base import FewShotDataset
from ..data.episodes import Episode, EpisodeBatch, EpisodeSet
from ..errors import EpisodeError, MissingDependencyError

__all__ = [
    "INSTALL_HINT",
    "batches_from_taskset",
    "episode_from_task",
    "episodes_from_taskset",
    "require_learn2learn",
    "to_meta_dataset",
    "to_taskset",
]

INSTALL_HINT = (
    "install learn2learn 0.2.0 with benchmarks/learn2learn/install.sh from a metafew source checkout "
    "(its PyPI sdist does not build on Python >= 3.11 as it is), or `pip install learn2learn==0.2.0` on Python <= 3.10"
)


def require_learn2learn() -> ModuleType:
    """Import and return ``learn2learn``, or raise a one-line MissingDependencyError saying how to install it.

    Its import prints gym deprecation notices; they are kept out of the caller's output.
    """
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import learn2learn
            import learn2learn.data
    except ImportError as e:
        raise MissingDependencyError(f"metafew.interop.learn2learn needs learn2learn ({e}); {INSTALL_HINT}") from e
    return learn2learn


# -- l2l -> metafew --------------------------------------------------------------------------------------------
def _as_images(x: Any) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:  # [M, H, W]: grayscale without a channel dimension
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise EpisodeError(f"an l2l task's images must be [M, C, H, W], got shape {list(x.shape)}")
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def episode_from_task(task: Sequence[Any], k_shot: int, n_query: int | None = None) -> Episode:
    """A metafew :class:`~metafew.data.Episode` from one l2l task ``(images, labels)``.

    ``n_query`` defaults to what each class holds beyond its ``k_shot`` support images
    (l2l's ``KShots(k_shot + n_query)``). Raises EpisodeError when a class has too few
    images, or when the classes hold different numbers of images and ``n_query`` is not given.
    """
    if not isinstance(task, (list, tuple)) or len(task) < 2:
        raise EpisodeError(f"an l2l task is (images, labels), got {type(task).__name__}")
    x = _as_images(task[0])
    y = torch.as_tensor(task[1]).long().reshape(-1)
    if len(y) != len(x):
        raise EpisodeError(f"an l2l task has {len(x)} images but {len(y)} labels")
    if k_shot < 1:
        raise EpisodeError(f"k_shot must be a positive integer, got {k_shot!r}")
    classes, episode_y, counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
    if n_query is None:
        if int(counts.min()) != int(counts.max()):
            raise EpisodeError(
                f"an l2l task's classes hold {int(counts.min())} to {int(counts.max())} images: pass n_query"
            )
        n_query = int(counts.min()) - k_shot
    need = k_shot + n_query
    if n_query < 0 or int(counts.min()) < need:
        raise EpisodeError(
            f"an l2l task's class {int(classes[counts.argmin()])} has {int(counts.min())} images, "
            f"a {k_shot}-shot {n_query}-query episode needs {need} (sample the task with KShots(k={need}))"
        )
    order = torch.argsort(episode_y, stable=True)  # class-major, each class in the task's order
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(need)
    support = order[(starts[:, None] + within[None, :k_shot]).reshape(-1)]
    query = order[(starts[:, None] + within[None, k_shot:need]).reshape(-1)]
    return Episode(x[support], episode_y[support], x[query], episode_y[query], classes)


def episodes_from_taskset(
    taskset: Any,
    num_episodes: int | None = None,
    *,
    k_shot: int,
    n_query: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> EpisodeSet:
    """A fixed :class:`~metafew.data.EpisodeSet` of ``num_episodes`` tasks of an l2l ``TaskDataset``/``Taskset``.

    The tasks (classes, images, rotations: l2l's task descriptions) are drawn once, with
    Python's ``random`` seeded by ``seed`` (the caller's ``random`` state is restored
    afterwards), so the same arguments give the same episodes, for every learner, as
    metafew's own fixed sets do. A taskset with a finite ``num_tasks`` gives its own tasks
    ``0..num_tasks-1`` (``num_episodes`` defaults to ``num_tasks``): task ``i`` is the one
    ``taskset[i]`` gives l2l. Images are loaded when a batch of episodes is read.
    """
    require_learn2learn()
    finite = int(getattr(taskset, "num_tasks", -1)) != -1
    if num_episodes is None:
        if not finite:
            raise EpisodeError("an l2l taskset with num_tasks=-1 samples without end: pass num_episodes")
        num_episodes = len(taskset)
    if num_episodes < 1:
        raise EpisodeError(f"num_episodes must be a positive integer, got {num_episodes!r}")
    if finite and num_episodes > len(taskset):
        raise EpisodeError(f"the l2l taskset has {len(taskset)} tasks, fewer than num_episodes={num_episodes}")
    state = random.getstate()
    try:
        random.seed(seed)
        if finite:
            known = taskset.sampled_descriptions
            for i in range(num_episodes):
                if i not in known:
                    known[i] = taskset.sample_task_description()
            descriptions = [known[i] for i in range(num_episodes)]
        else:
            descriptions = [taskset.sample_task_description() for _ in range(num_episodes)]
    finally:
        random.setstate(state)

    def get(s: slice, reuse: EpisodeBatch | None) -> EpisodeBatch:
        return EpisodeBatch.stack([episode_from_task(taskset.get_task(d), k_shot, n_query) for d in descriptions[s]])

    label = name or f"l2l {type(getattr(taskset, 'dataset', taskset)).__name__} x{num_episodes} (seed {seed})"
    return EpisodeSet(num_episodes, get, label)


def batches_from_taskset(
    taskset: Any, *, k_shot: int, n_query: int | None = None, batch_size: int = 1
) -> Iterator[EpisodeBatch]:
    """Endless meta-batches of ``batch_size`` l2l tasks (``taskset.sample()``: l2l's own randomness), for a training loop.

    >>> for step, batch in zip(range(steps), batches_from_taskset(tasksets.train, k_shot=1)):  # doctest: +SKIP
    ...     loss, acc = learner.meta_loss(batch.to(device)); loss.backward(); opt.step(); opt.zero_grad()
    """
    require_learn2learn()
    if batch_size < 1:
        raise EpisodeError(f"batch_size must be a positive integer, got {batch_size!r}")
    while True:
        yield EpisodeBatch.stack([episode_from_task(taskset.sample(), k_shot, n_query) for _ in range(batch_size)])


# -- metafew -> l2l --------------------------------------------------------------------------------------------
def to_meta_dataset(dataset: FewShotDataset) -> Any:
    """An l2l ``MetaDataset`` over a metafew dataset: items are (normalised float ``[C, H, W]``, class index).

    The label bookkeeping comes from ``dataset.labels``, so no image is read to build it.
    """
    l2l = require_learn2learn()
    labels = dataset.labels
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=dataset.num_classes).tolist()
    labels_to_indices: dict[int, list[int]] = {}
    start = 0
    for c, n in enumerate(counts):
        if n:
            labels_to_indices[c] = order[start : start + n].tolist()
        start += n
    return l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices)


def to_taskset(dataset: FewShotDataset | Any, n_way: int, k_shot: int, n_query: int, *, num_tasks: int = -1) -> Any:
    """An l2l ``Taskset`` (``TaskDataset``) of N-way tasks with ``k_shot + n_query`` images per class (l2l's usual transforms).

    ``[NWays(n_way), KShots(k_shot + n_query), LoadData, RemapLabels, ConsecutiveLabels]``
    over :func:`to_meta_dataset` (``dataset`` may already be an l2l ``MetaDataset``).
    """
    l2l = require_learn2learn()
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    meta = to_meta_dataset(dataset) if isinstance(dataset, FewShotDataset) else dataset
    transforms = [
        NWays(meta, n=n_way),
        KShots(meta, k=k_shot + n_query),
        LoadData(meta),
        RemapLabels(meta),
        ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)
