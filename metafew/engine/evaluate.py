"""Evaluate a learner on fixed episodes: mean accuracy, 95% CI and (binary tasks) AUC.

Every learner is scored on the *same* :class:`~metafew.data.EpisodeSet`, so results
are paired episode by episode and :func:`paired_difference` can compare two learners
with a tighter interval than two independent CIs.

The 95% confidence interval is ``1.96 * std / sqrt(n)`` over the per-episode values
(``std`` with ``ddof=0``, as in the evaluation code of Finn et al. 2017).

Inside a process group of N processes (``torchrun``, :mod:`metafew.distributed`) the
episodes are sharded by batch: batch ``j`` (episodes ``j*batch_size ...``) is scored on
rank ``j % N``, exactly as one process scores it, and the per-episode values are gathered
back in their order, so every rank returns the one-process result (accuracies, mean, CI).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import distributed
from ..data.episodes import EpisodeBatch, EpisodeSet
from ..device import eval_mode
from ..errors import MetafewError
from ..progress import tqdm

if TYPE_CHECKING:
    from ..learners.base import Learner


@dataclass
class EvalResult:
    """Per-episode accuracies (fractions in ``[0, 1]``) and their summary.

    ``aucs``/``auc_mean``/``auc_ci95`` are the macro one-vs-rest ROC AUC of each episode's
    queries, or None when AUC was not computed.
    """

    accuracies: Tensor  # [episodes] float64, CPU
    accuracy_mean: float
    accuracy_ci95: float
    episodes: int
    n_way: int
    k_shot: int
    n_query: int
    seconds: float
    aucs: Tensor | None = None
    auc_mean: float | None = None
    auc_ci95: float | None = None
    name: str = field(default="episodes")

    def to_dict(self, per_episode: bool = False) -> dict[str, Any]:
        """A JSON-ready summary (per-episode values included when asked)."""
        d: dict[str, Any] = {
            "episodes": self.episodes,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "n_query": self.n_query,
            "accuracy_mean": self.accuracy_mean,
            "accuracy_ci95": self.accuracy_ci95,
            "auc_mean": self.auc_mean,
            "auc_ci95": self.auc_ci95,
            "seconds": self.seconds,
        }
        if per_episode:
            d["accuracies"] = self.accuracies.tolist()
            d["aucs"] = None if self.aucs is None else self.aucs.tolist()
        return d

    def __str__(self) -> str:
        s = f"{self.n_way}-way {self.k_shot}-shot: {100 * self.accuracy_mean:.2f} ± {100 * self.accuracy_ci95:.2f}% ({self.episodes} episodes)"
        if self.auc_mean is not None:
            s += f", AUC {self.auc_mean:.3f} ± {self.auc_ci95:.3f}"
        return s


@dataclass(frozen=True)
class PairedDifference:
    """Mean and 95% CI of the per-episode difference ``a - b`` of two paired evaluations."""

    mean: float
    ci95: float
    episodes: int

    @property
    def significant(self) -> bool:
        """True when the 95% interval excludes zero."""
        return abs(self.mean) > self.ci95

    def __str__(self) -> str:
        """E.g. ``+0.42 ± 0.18 points (600 paired episodes)``: the difference of accuracies, in points."""
        return f"{100 * self.mean:+.2f} ± {100 * self.ci95:.2f} points ({self.episodes} paired episodes)"


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` of a 1-D tensor (``std`` with ``ddof=0``)."""
    v = values.double().flatten()
    if v.numel() == 0:
        raise MetafewError("cannot summarise zero episodes")
    return float(v.mean()), 1.96 * float(v.std(correction=0)) / math.sqrt(v.numel())


def paired_difference(a: EvalResult | Tensor, b: EvalResult | Tensor, metric: str = "accuracies") -> PairedDifference:
    """Difference ``a - b`` on the same episodes (``metric``: ``"accuracies"`` or ``"aucs"``)."""
    va = getattr(a, metric) if isinstance(a, EvalResult) else a
    vb = getattr(b, metric) if isinstance(b, EvalResult) else b
    if va is None or vb is None:
        raise MetafewError(f"paired_difference: {metric} missing from one of the results")
    if va.shape != vb.shape:
        raise MetafewError(f"paired_difference needs the same episodes, got {va.numel()} and {vb.numel()} values")
    mean, ci = mean_ci95(va.double() - vb.double())
    return PairedDifference(mean, ci, va.numel())


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of the last dim of ``x``, ties sharing their average rank."""
    n = x.shape[-1]
    sorted_x, order = x.sort(dim=-1)
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(sorted_x)
    # For each sorted element, the first and last position of its run of equal values.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    first = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(-1).values
    end_run = torch.ones_like(new_run)
    end_run[..., :-1] = new_run[..., 1:]
    last = torch.where(end_run, pos, torch.full_like(pos, n + 1)).flip(-1).cummin(-1).values.flip(-1)
    ranks = torch.empty_like(pos)
    return ranks.scatter_(-1, order, (first + last) / 2)


def macro_auc(scores: Tensor, labels: Tensor, n_way: int | None = None) -> Tensor:
    """Macro one-vs-rest ROC AUC from scores ``[..., M, N]`` and labels ``[..., M]`` (Mann-Whitney U by ranks).

    Classes without a positive or without a negative query are left out of the mean;
    an episode with no scorable class gets NaN.
    """
    n_way = scores.shape[-1] if n_way is None else n_way
    s = scores.double().transpose(-1, -2)  # [..., N, M]
    ranks = _average_ranks(s)
    pos = torch.nn.functional.one_hot(labels, n_way).transpose(-1, -2).double()  # [..., N, M]
    n_pos = pos.sum(-1)
    n_neg = pos.shape[-1] - n_pos
    u = (ranks * pos).sum(-1) - n_pos * (n_pos + 1) / 2
    valid = (n_pos > 0) & (n_neg > 0)
    auc = torch.where(valid, u / (n_pos * n_neg).clamp(min=1), torch.zeros_like(u))
    return auc.sum(-1) / valid.sum(-1)  # NaN where no class is valid


def evaluate(
    learner: Learner,
    episodes: EpisodeSet,
    *,
    batch_size: int = 16,
    auc: bool | None = None,
    progress: bool = True,
    shard: bool | None = None,
) -> EvalResult:
    """Score ``learner`` on every episode of ``episodes`` (the learner is put in eval mode).

    Args:
        batch_size: episodes per call of ``learner.evaluate_batch``.
        auc: also compute the macro one-vs-rest AUC of the query log-softmax scores (same ranking as probabilities, without ties where they saturate)
            (adapts one episode at a time); default: only for 2-way episodes.
        progress: show a tqdm bar (on rank 0 only, in a distributed run).
        shard: split the episodes over the processes of the process group (a collective call:
            every rank must make it); default: when there is a group of several processes.
            ``shard=False`` scores everything in this process alone (e.g. on rank 0 only).

    >>> import metafew
    >>> test = metafew.EpisodeSampler(metafew.load_dataset("omniglot", "test"), 5, 1, seed=0, device="cpu")
    >>> learner = metafew.ProtoNet(metafew.create_backbone("conv4", in_channels=1, image_size=28))
    >>> result = metafew.evaluate(learner, test.fixed(8), progress=False)
    >>> result.episodes, 0.0 <= result.accuracy_mean <= 1.0
    (8, True)
    """
    if len(episodes) == 0:
        raise MetafewError(f"{episodes.name}: no episodes to evaluate on")
    first = episodes[0]
    n_way, k_shot, n_query = first.n_way, first.k_shot, first.n_query
    auc = (n_way == 2) if auc is None else auc
    start = time.perf_counter()
    accs: list[Tensor] = []
    aucs: list[Tensor] = []
    ranks = distributed.world() if shard or shard is None else 1
    progress = progress and distributed.is_main()
    bar = tqdm(total=len(episodes), desc="evaluate", unit="ep", disable=not progress, leave=False)
    # Learners that adapt by gradient steps enable grad inside adapt()/evaluate_batch() themselves.
    device = next(iter(learner.parameters()), torch.empty(0)).device

    def score(batch: EpisodeBatch) -> None:
        batch = batch.to(device, non_blocking=True)  # no-op for episodes already there
        if auc:
            for ep in batch:
                logits = learner.adapt(ep.support_x, ep.support_y)(ep.query_x).float()
                accs.append((logits.argmax(-1) == ep.query_y).double().mean().reshape(1))
                aucs.append(
                    macro_auc(logits.double().log_softmax(-1), ep.query_y, n_way).reshape(1)
                )  # log: no ties from saturated probabilities
        else:
            accs.append(learner.evaluate_batch(batch).double().reshape(-1))

    with eval_mode(learner), torch.no_grad():
        if ranks == 1:
            for batch in episodes.batches(batch_size, reuse=True):  # each batch is done with before the next
                score(batch)
                bar.update(len(batch))
        else:
            mine = range(distributed.rank(), -(-len(episodes) // batch_size), ranks)
            for batch in _batches(episodes, batch_size, mine):
                score(batch)
                bar.update(len(batch) * ranks)
    bar.close()
    if ranks > 1:  # every rank's batches, back in episode order (batch j came from rank j % N)
        parts = distributed.gather_objects(
            ([a.cpu() for a in accs], [a.cpu() for a in aucs])  # one host sync, at the end
        )
        group = batch_size if auc else 1  # entries per batch: one per episode with AUC, else one tensor
        accs = _interleave([p[0] for p in parts], group)
        aucs = _interleave([p[1] for p in parts], group)
    acc = torch.cat(accs).cpu()  # one host sync, at the end
    mean, ci = mean_ci95(acc)
    result = EvalResult(acc, mean, ci, len(acc), n_way, k_shot, n_query, 0.0, name=episodes.name)
    if auc:
        result.aucs = torch.cat(aucs).cpu()
        scored = result.aucs[~result.aucs.isnan()]  # NaN: an episode whose queries are all of one class
        if scored.numel():
            result.auc_mean, result.auc_ci95 = mean_ci95(scored)
    result.seconds = time.perf_counter() - start
    return result


def _batches(episodes: EpisodeSet, batch_size: int, which: range) -> Iterator[EpisodeBatch]:
    """Batches number ``which`` of ``episodes.batches(batch_size)``, built alone (each may reuse the last's memory)."""
    get = getattr(episodes, "_get", None)
    last: EpisodeBatch | None = None
    for j in which:
        part = slice(j * batch_size, min((j + 1) * batch_size, len(episodes)))
        last = get(part, last) if get is not None else EpisodeBatch.stack(episodes[part])
        yield last


def _interleave(per_rank: list[list[Tensor]], group: int) -> list[Tensor]:
    """Undo the ``j % N`` deal: rank r's k-th item (of ``group`` consecutive entries) was batch ``k*N + r``."""
    chunks = [[items[i : i + group] for i in range(0, len(items), group)] for items in per_rank]
    out: list[Tensor] = []
    for k in range(max(len(c) for c in chunks)):
        for c in chunks:
            if k < len(c):
                out.extend(c[k])
    return out
