"""Matching Networks (Vinyals et al. 2016, "Matching Networks for One Shot Learning").

A query is classified by attention over the labelled support set: the attention on
support item ``i`` is a softmax over the cosine similarities ``cos(f(q), g(x_i))``, and
the probability of class ``c`` is the attention summed over the items of class ``c``,

    P(c | q, S) = sum_{i: y_i = c} softmax_i(cos(f(q), g(x_i))).

The logits are ``log P(c | q, S)``, so cross-entropy on them is the negative
log-likelihood of the paper and ``softmax(logits)`` gives back ``P``. They are computed
as a masked ``logsumexp`` (stable, and ``-inf`` for a class without support items).

``fce=True`` adds the paper's full-context embeddings (its appendix): ``g`` is a
bidirectional LSTM over the support embeddings with a skip connection,
``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``, and ``f`` an LSTM that reads the support set
``fce_steps`` times with attention: ``h_k = LSTM(f'(q), [h_{k-1}, r_{k-1}], c_{k-1}) + f'(q)``,
``r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i)``, ``f(q, S) = h_K``. Feeding ``r_{k-1}``
beside ``f'(q)`` as the cell's input is the same function as concatenating it to the
hidden state (an LSTM's gates are linear in both). Without FCE, ``f = g = f'``, the backbone.

BatchNorm policy :class:`~metafew.learners.bn.Frozen`, as for ProtoNet.
Published Omniglot accuracies (Vinyals et al. 2016, Table 1, Conv-4, no fine-tuning):
98.1 / 98.9 (5-way 1/5-shot), 93.8 / 98.5 (20-way 1/5-shot).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import EpisodeBatch
from ..errors import MetafewError
from .base import Classifier, Learner, infer_n_way
from .bn import BNPolicy, Frozen, Stats
from .registry import register_learner


def one_hot(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``[..., M, N]`` one-hot labels (a comparison with ``arange``: no host sync)."""
    return (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(dtype)


def matching_logits(query: Tensor, support: Tensor, support_onehot: Tensor) -> Tensor:
    """``log sum_{i in c} softmax_i(cos(q, s_i))``, ``[..., M, N]``, from ``[..., M, D]``, ``[..., S, D]``, ``[..., S, N]``."""
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2)  # [..., M, S]
    log_attention = cosine.log_softmax(-1)
    # log of the attention summed per class: logsumexp over the support items of each class
    mask = support_onehot.log().unsqueeze(-3)  # [..., 1, S, N]: 0 for the item's class, -inf elsewhere
    return torch.logsumexp(log_attention.unsqueeze(-1) + mask, dim=-2)


class FullContextEmbeddings(nn.Module):
    """The two LSTMs of the paper's appendix: ``g`` over the support set, ``f`` reading it ``steps`` times."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)  # input [f'(q), r_{k-1}], hidden h_{k-1}

    def support(self, g: Tensor) -> Tensor:
        """``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)`` for support embeddings ``[B, S, D]``."""
        out, _ = self.support_lstm(g)
        forward, backward = out.chunk(2, dim=-1)
        return forward + backward + g

    def query(self, f: Tensor, g: Tensor) -> Tensor:
        """``f(q, S)`` for query embeddings ``[B, M, D]`` against processed support ``g`` ``[B, S, D]``."""
        b, m, d = f.shape
        x = f.reshape(b * m, d)
        h = torch.zeros_like(x)
        c = torch.zeros_like(x)
        r = torch.zeros_like(x)
        for _ in range(self.steps):
            h_hat, c = self.query_cell(torch.cat([x, r], dim=-1), (h, c))
            h = h_hat + x
            attention = (h.view(b, m, d) @ g.transpose(-1, -2)).softmax(-1)  # [B, M, S]
            r = (attention @ g).reshape(b * m, d)
        return h.view(b, m, d)


@register_learner("matchingnet")
class MatchingNet(Learner):
    """Matching network on a shared backbone: cosine attention over the support set.

    Args:
        backbone: feature extractor (shared, never copied); ``fce=True`` needs its ``out_features``.
        fce: full-context embeddings (the paper's bidirectional and attention LSTMs).
        fce_steps: reads of the support set by the query LSTM ``f`` (the paper's ``K``).
        amp: ``"bf16"`` to embed under autocast (the LSTMs and the attention stay in float32).
    """

    bn = Frozen()
    adapt_defaults: ClassVar[dict[str, Any]] = {}
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(self, backbone: nn.Module, *, fce: bool = False, fce_steps: int = 5, amp: str | None = None) -> None:
        super().__init__(backbone, amp=amp)
        self.fce: FullContextEmbeddings | None = None
        if fce:
            dim = getattr(backbone, "out_features", None)
            if not isinstance(dim, int):
                raise MetafewError("MatchingNet: fce=True needs a backbone stating its out_features")
            if fce_steps < 1:
                raise MetafewError(f"MatchingNet: fce_steps must be >= 1, got {fce_steps!r}")
            self.fce = FullContextEmbeddings(dim, fce_steps)

    # -- the method ----------------------------------------------------------------
    def support_embeddings(self, support: Tensor) -> Tensor:
        """``g(x_i, S)`` of backbone features ``[..., S, D]`` (the features themselves without FCE)."""
        if self.fce is None:
            return support
        return self.fce.support(support.unsqueeze(0) if support.dim() == 2 else support).view_as(support)

    def logits(self, query: Tensor, support: Tensor, support_onehot: Tensor) -> Tensor:
        """Log class probabilities ``[..., M, N]`` of query features against processed support embeddings."""
        if self.fce is not None:
            batched = query.dim() == 2
            q, s = (query.unsqueeze(0), support.unsqueeze(0)) if batched else (query, support)
            query = self.fce.query(q, s).view_as(query)
        return matching_logits(query, support, support_onehot)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """Query logits ``[B, M, N]`` of every task, embedding all images of the batch in one call."""
        support, query, n_way = self.episode_features(batch)
        support = self.support_embeddings(support)
        return self.logits(query, support, one_hot(batch.support_y, n_way, support.dtype))

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Negative log-likelihood of the query labels over the batch's tasks (episodic training)."""
        return self.episodic_loss(batch)

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> MatchingClassifier:
        """The (FCE-processed) support embeddings and one-hot labels, wrapped as a classifier."""
        n_way = infer_n_way(support_y, None)
        with bn.while_adapting(self.backbone, stats):
            support = self.support_embeddings(self.embed(support_x))
        return MatchingClassifier(self, support, one_hot(support_y, n_way, support.dtype), bn=bn)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", fce_steps={self.fce.steps}" if self.fce is not None else "")


class MatchingClassifier(Classifier):
    """Attention over the kept support embeddings ``[S, D]`` and their one-hot labels ``[S, N]``."""

    saved = ("support", "support_onehot")
    learner: MatchingNet
    support: Tensor
    support_onehot: Tensor

    def __init__(self, learner: MatchingNet, support: Tensor, support_onehot: Tensor, **kw: Any) -> None:
        super().__init__(learner, **kw)
        self.register_buffer("support", support)
        self.register_buffer("support_onehot", support_onehot)

    def logits(self, query_x: Tensor) -> Tensor:
        return self.learner.logits(self.learner.embed(query_x), self.support, self.support_onehot)


MatchingNet.classifier_type = MatchingClassifier
