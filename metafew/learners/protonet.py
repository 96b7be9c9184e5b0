"""Prototypical Networks (Snell et al. 2017, "Prototypical Networks for Few-shot Learning").

Each class is represented by the mean embedding of its support images (its
prototype); a query is classified by a softmax over minus its squared Euclidean
distance to the prototypes, ``logits = -||f(q) - c_k||^2``. With ``distance="cosine"``
the logits are ``scale * cos(f(q), c_k)`` instead, with a learnable (default) or fixed
scale, as in cosine-classifier variants (Chen et al. 2019, Gidaris & Komodakis 2018).

BatchNorm policy :class:`~metafew.learners.bn.Frozen`: during meta-training the
backbone runs in whatever mode the engine set (train mode: batch statistics of the
episode, running statistics updated); adapting and predicting run it in eval mode,
so predictions use the running statistics and test images never change them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episodes import EpisodeBatch
from ..errors import MetafewError
from .base import Classifier, Learner, class_means, infer_n_way, squared_distances
from .bn import BNPolicy, Frozen, Stats
from .registry import register_learner


@register_learner("protonet")
class ProtoNet(Learner):
    """Prototypical network on a shared backbone.

    Args:
        backbone: feature extractor (shared, never copied).
        distance: ``"euclidean"`` (squared, the paper's choice) or ``"cosine"``.
        scale: temperature of cosine logits (ignored for Euclidean distance).
        learn_scale: meta-learn the cosine scale (a parameter of the learner) or keep it fixed.
        amp: ``"bf16"`` to embed under autocast.
    """

    bn = Frozen()
    adapt_defaults: ClassVar[dict[str, Any]] = {}
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(
        self,
        backbone: nn.Module,
        *,
        distance: Literal["euclidean", "cosine"] = "euclidean",
        scale: float = 10.0,
        learn_scale: bool = True,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        if distance not in ("euclidean", "cosine"):
            raise MetafewError(f"ProtoNet: distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.distance = distance
        if distance == "cosine" and learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    # -- the method ----------------------------------------------------------------
    def logits(self, query_features: Tensor, prototypes: Tensor) -> Tensor:
        """Logits ``[..., M, N]`` of query features ``[..., M, D]`` against prototypes ``[..., N, D]``."""
        if self.distance == "euclidean":
            return -squared_distances(query_features, prototypes)
        q = F.normalize(query_features, dim=-1)
        c = F.normalize(prototypes, dim=-1)
        return self.scale * (q @ c.transpose(-1, -2))

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """Query logits ``[B, M, N]`` of every task, embedding all images of the batch in one call."""
        support, query, n_way = self.episode_features(batch)
        return self.logits(query, class_means(support, batch.support_y, n_way))

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the queries over the batch's tasks (episodic training, Snell et al.)."""
        return self.episodic_loss(batch)

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> ProtoClassifier:
        """Prototypes of the support set, wrapped as a classifier."""
        n_way = infer_n_way(support_y, None)
        with bn.while_adapting(self.backbone, stats):
            prototypes = class_means(self.embed(support_x), support_y, n_way)
        return ProtoClassifier(self, prototypes, bn=bn)


class ProtoClassifier(Classifier):
    """Classifies query images by their distance to the prototypes (a buffer ``[N, D]``)."""

    saved = ("prototypes",)
    learner: ProtoNet
    prototypes: Tensor

    def __init__(self, learner: ProtoNet, prototypes: Tensor, **kw: Any) -> None:
        super().__init__(learner, **kw)
        self.register_buffer("prototypes", prototypes)

    def logits(self, query_x: Tensor) -> Tensor:
        return self.learner.logits(self.learner.embed(query_x), self.prototypes)


ProtoNet.classifier_type = ProtoClassifier
