"""Baseline and Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot Classification").

The backbone is pretrained by ordinary supervised learning on the base classes
(:mod:`metafew.pretrain`); for each new task, :meth:`FineTune.adapt` trains a new
classifier on the support set:

* ``head="linear"`` (Baseline): a linear layer on the frozen features;
* ``head="cosine"`` (Baseline++): logits ``scale * cos(f(x), w_k)``.

Support features are computed once and the head is trained on them for ``steps``
optimizer steps, on the features' device with no host sync. ``full=True`` fine-tunes
the backbone too, on detached functional copies of its parameters: the shared
backbone module is never modified.

FineTune has no meta-training: :meth:`FineTune.meta_loss` raises a
:class:`~metafew.errors.MetafewError` telling to pretrain the backbone instead.

BatchNorm policy :class:`~metafew.learners.bn.Frozen`: the backbone always runs in
eval mode here (running statistics from pretraining, or the support set's with
``Frozen(reestimate=True)``), so neither support nor query images change them.

Head initialisation: the linear head starts at zero (the problem is convex in the
head, so the result does not depend on a random draw); the cosine head starts from
the normalised support class means ("weight imprinting", Qi et al. 2018), which
converges in fewer steps than Chen et al.'s random initialisation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.episodes import EpisodeBatch
from ..errors import MetafewError
from .base import (
    Classifier,
    Learner,
    Tensors,
    class_means,
    full_precision,
    infer_n_way,
    minibatch_indices,
    tensors_or_none,
)
from .bn import BNPolicy, Frozen, Stats
from .registry import register_learner

Params = dict[str, Tensor]


@register_learner("finetune")
class FineTune(Learner):
    """A new linear or cosine head trained on the support features of a pretrained backbone.

    Args:
        backbone: pretrained feature extractor (shared, never modified).
        head: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++).
        steps: optimizer steps on the support set.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate of the head (default 0.01 for SGD, 0.005 for Adam).
        batch_size: support minibatch size per step (None: the whole support set).
        weight_decay: L2 penalty on the head (Chen et al.: 1e-3).
        momentum: SGD momentum.
        scale: cosine-head temperature (default, as Chen et al.: 2 for features of
            at most 200 dimensions, else 10).
        full: also fine-tune the backbone (a functional copy of its parameters).
        backbone_lr: learning rate of the backbone when ``full`` (default ``lr / 10``).
        amp: ``"bf16"`` to run the backbone under autocast.
    """

    bn = Frozen()
    adapt_defaults: ClassVar[dict[str, Any]] = {}
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(
        self,
        backbone: nn.Module,
        *,
        head: Literal["linear", "cosine"] = "linear",
        steps: int = 100,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float = 1e-3,
        momentum: float = 0.9,
        scale: float | None = None,
        full: bool = False,
        backbone_lr: float | None = None,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        if head not in ("linear", "cosine"):
            raise MetafewError(f"FineTune: head must be 'linear' or 'cosine', got {head!r}")
        if optimizer not in ("sgd", "adam"):
            raise MetafewError(f"FineTune: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.head_kind = head
        self.steps = steps
        self.optimizer = optimizer
        self.lr = lr if lr is not None else (0.01 if optimizer == "sgd" else 0.005)
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        dim = getattr(backbone, "out_features", None)
        self.scale = scale if scale is not None else (2.0 if dim is not None and dim <= 200 else 10.0)
        self.full = full
        self.backbone_lr = backbone_lr if backbone_lr is not None else self.lr / 10

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Not meta-trained: always raises (pretrain the backbone instead)."""
        raise MetafewError(
            "FineTune has no meta-training; pretrain the backbone with metafew.pretrain, then evaluate FineTune on it"
        )

    # -- head and features -------------------------------------------------------
    def head_logits(self, head: Params, features: Tensor) -> Tensor:
        """Logits of ``[M, D]`` features under a linear or cosine head."""
        if self.head_kind == "linear":
            return F.linear(features, head["weight"], head["bias"])
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(head["weight"], dim=-1).T

    def features(self, x: Tensor, backbone_params: Params | None = None) -> Tensor:
        """Features of ``x`` through the module's own or the given (fine-tuned) parameters.

        BatchNorm is as the caller's policy context sets it (eval mode for :class:`Frozen`).
        """
        with self.autocast(x.device):
            if backbone_params is None:
                return full_precision(self.backbone(x))
            return full_precision(functional_call(self.backbone, backbone_params, (x,)))

    def _init_head(self, features: Tensor, support_y: Tensor, n_way: int) -> Params:
        """Linear: zero weight and bias. Cosine (no bias): normalised class means."""
        if self.head_kind == "linear":
            weight = features.new_zeros(n_way, features.shape[-1])
            return {"weight": weight.requires_grad_(), "bias": features.new_zeros(n_way).requires_grad_()}
        weight = F.normalize(class_means(features, support_y, n_way), dim=-1)
        return {"weight": weight.detach().requires_grad_()}

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)

    # -- the interface -----------------------------------------------------------
    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> FineTuneClassifier:
        """Train a new head (and, with ``full``, a copy of the backbone) on the support set."""
        with bn.while_adapting(self.backbone, stats):
            return self._fit(support_x, support_y, bn)

    def _fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy) -> FineTuneClassifier:
        n_way = infer_n_way(support_y, None)
        with torch.no_grad():
            support_features = self.features(support_x)
        head = self._init_head(support_features, support_y, n_way)
        groups: list[dict[str, Any]] = [{"params": list(head.values())}]
        backbone_params: Params | None = None
        if self.full:
            backbone_params = {
                k: p.detach().clone().requires_grad_() for k, p in self.backbone.named_parameters() if p.requires_grad
            }
            groups.append({"params": list(backbone_params.values()), "lr": self.backbone_lr, "weight_decay": 0.0})
        opt = self._make_optimizer(groups)
        leaves = [p for g in groups for p in g["params"]]
        order = minibatch_indices(len(support_x), self.batch_size, self.steps, support_x.device)
        with torch.enable_grad():
            for step in range(self.steps):
                pick = slice(None) if order is None else order[step]
                if self.full:
                    feats = self.features(support_x[pick], backbone_params)
                else:
                    feats = support_features[pick]
                loss = F.cross_entropy(self.head_logits(head, feats), support_y[pick])
                for p, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                    p.grad = g
                opt.step()
        detached = None if backbone_params is None else {k: v.detach() for k, v in backbone_params.items()}
        return FineTuneClassifier(self, {k: v.detach() for k, v in head.items()}, detached, bn=bn)


class FineTuneClassifier(Classifier):
    """The trained head (buffers under ``head``) and fine-tuned backbone copy (under ``backbone_params``)."""

    saved = ("head", "backbone_params")
    learner: FineTune

    def __init__(self, learner: FineTune, head: Params, backbone_params: Params | None = None, **kw: Any) -> None:
        super().__init__(learner, **kw)
        self.head = Tensors(head)
        self.backbone_params = tensors_or_none(backbone_params)

    def logits(self, query_x: Tensor) -> Tensor:
        tuned = None if self.backbone_params is None else self.backbone_params.as_dict()
        return self.learner.head_logits(self.head.as_dict(), self.learner.features(query_x, tuned))


FineTune.classifier_type = FineTuneClassifier
