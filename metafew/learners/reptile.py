"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task, Reptile trains a copy φ of the parameters θ with a few steps of SGD
or Adam on the task's data, then moves θ towards the adapted parameters:
``θ ← θ + ε (mean_tasks φ − θ)``.

To fit the engine's ``loss.backward(); opt.step()`` loop, :meth:`Reptile.meta_loss`
returns the surrogate ``0.5 * Σ_tasks ||θ − stopgrad(φ_task)||² / num_tasks``, whose
gradient is exactly ``θ − mean φ``: an outer SGD step with learning rate ε (the
default optimizer, ``{"name": "sgd", "lr": 1.0}``: ε = 1 as in the paper's Omniglot
runs) is the Reptile update. Another outer optimizer (Adam, momentum, weight decay,
gradient clipping) applies its own rule to this direction instead.

The inner loop runs on detached copies of the parameters as plain tensors through
``torch.func.functional_call``: the backbone module is never copied or modified
by it, and no graph links φ to θ.

Task data (``train_data``): the reference code (openai/supervised-reptile) meta-trains
5-way 1-shot Omniglot on 10 images per class (``--train-shots 10``) in inner minibatches
of 10 (``--inner-batch 10``, 5 steps: one epoch), and adapts at test time on the k-shot
support set only. The default ``train_data="support+query"`` with ``inner_batch_size=10``
reproduces this: sample training episodes with ``k_shot + n_query`` = 10 images per class
(e.g. 1 + 9) and the inner loop trains on all of them. The minibatches matter: Reptile's
meta-gradient rewards parameters where a step on one minibatch of a task lowers the
loss on another; with full-batch steps on a 5-image support set that term compares a
batch with itself, and in our Omniglot runs (conv4, 100 outer steps) accuracy went
down instead of up. ``train_data="support"`` trains on the support set only (the
k-shot task data). Either way :meth:`Reptile.adapt` trains on the support set only,
and the accuracy returned by :meth:`Reptile.meta_loss` is measured at φ on the query
images (held out only with ``train_data="support"``).

BatchNorm policy :class:`~metafew.learners.bn.Transductive` (the paper's default): BatchNorm uses batch
statistics everywhere (the inner minibatch while training, the whole query batch
when predicting), and running statistics are never read nor updated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.episodes import EpisodeBatch
from ..errors import ConfigError, MetafewError
from .base import (
    Learner,
    accuracy,
    full_precision,
    functional_logits,
    infer_n_way,
    minibatch_indices,
    prototype_head,
    split_params,
    tensor_sum,
)
from .bn import BNPolicy, Stats, Transductive
from .maml import MAMLClassifier
from .registry import register_learner

Params = dict[str, Tensor]


@register_learner("reptile")
class Reptile(Learner):
    """Reptile on a shared backbone with a meta-learned linear head.

    Args:
        backbone: feature extractor with ``out_features`` (shared, never copied).
        n_way: classes per task (size of the head).
        inner_optimizer: ``"adam"`` (the paper's choice, with ``inner_betas=(0, 0.999)``) or ``"sgd"``.
        inner_lr, inner_steps: inner-loop step size and number of steps in meta-training
            (paper, Omniglot: 1e-3 and 5).
        inner_batch_size: inner minibatch size, drawn from shuffled epochs of the task data
            (paper: 10; None: the whole task data every step).
        test_inner_lr, test_inner_steps: inner loop of :meth:`adapt` (default
            ``inner_lr``; 50 steps as in the paper's Omniglot evaluation).
        inner_betas: Adam's betas in the inner loop.
        train_data: inner-loop data in meta-training, ``"support+query"`` (the reference
            code's ``--train-shots``) or ``"support"`` (see the module docstring).
        head_init: ``"learned"`` (the paper: a meta-learned linear head, size ``n_way``) or
            ``"prototypes"`` (as Proto-MAML: each task's head starts at its class means,
            ``W = 2s c``, ``b = -s |c|^2``, of the inner-loop data; only the backbone is
            meta-learned, and any number of ways works). From a pretrained backbone the
            learned head starts random and its first inner steps wreck the features.
        head_scale: s of the prototype head (< 1 softens saturated logits).
        amp: ``"bf16"`` to run forward passes under autocast.
    """

    bn = Transductive()
    default_optimizer: dict[str, Any] = {"name": "sgd", "lr": 1.0}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(
        self,
        backbone: nn.Module,
        n_way: int | None = None,
        *,
        inner_optimizer: Literal["adam", "sgd"] = "adam",
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_batch_size: int | None = 10,
        test_inner_lr: float | None = None,
        test_inner_steps: int = 50,
        inner_betas: tuple[float, float] = (0.0, 0.999),
        train_data: Literal["support", "support+query"] = "support+query",
        head_init: Literal["learned", "prototypes"] = "learned",
        head_scale: float = 1.0,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        if inner_optimizer not in ("adam", "sgd"):
            raise MetafewError(f"Reptile: inner_optimizer must be 'adam' or 'sgd', got {inner_optimizer!r}")
        if train_data not in ("support", "support+query"):
            raise MetafewError(f"Reptile: train_data must be 'support' or 'support+query', got {train_data!r}")
        if head_init not in ("learned", "prototypes"):
            raise MetafewError(f"Reptile: head_init must be 'learned' or 'prototypes', got {head_init!r}")
        if not (head_scale > 0 and math.isfinite(head_scale)):
            raise MetafewError(f"Reptile: head_scale must be a finite number > 0, got {head_scale!r}")
        if head_init == "learned" and n_way is None:
            raise ConfigError("Reptile: head_init='learned' needs n_way (or use head_init='prototypes')")
        if not hasattr(backbone, "out_features"):
            raise MetafewError("Reptile: the backbone must state its feature size as `out_features`")
        self.n_way = n_way
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.inner_batch_size = inner_batch_size
        self.test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        self.test_inner_steps = test_inner_steps
        beta1, beta2 = inner_betas
        self.inner_betas = (beta1, beta2)
        self.train_data = train_data
        self.head_init = head_init
        self.head_scale = head_scale
        learned = head_init == "learned"
        self.head = nn.Linear(int(backbone.out_features), n_way) if learned and n_way else None  # type: ignore[arg-type]

    def meta_params(self) -> Params:
        """θ: the trainable backbone and head parameters by name (``backbone.*``, ``head.*``)."""
        return {k: p for k, p in self.named_parameters() if p.requires_grad and k.startswith(("backbone.", "head."))}

    def inner_train(
        self,
        x: Tensor,
        y: Tensor,
        steps: int,
        lr: float,
        bn: contextlib.AbstractContextManager[None] | None = None,
        n_way: int | None = None,
    ) -> Params:
        """φ: ``steps`` inner-optimizer steps from θ on ``(x, y)``, on detached copies of θ.

        ``bn``: the BatchNorm context to train in (default: the policy's meta-training one);
        ``n_way``: the task's ways, for a prototype head (default: from the labels, one host sync).
        """
        bn = bn if bn is not None else self.bn.while_training(self.backbone)
        theta = {k: v.detach().clone() for k, v in self.meta_params().items()}
        order = minibatch_indices(len(x), self.inner_batch_size, steps, x.device)
        with torch.enable_grad(), bn, self.autocast(x.device):
            if self.head is None:  # a prototype head from this task's data
                with torch.no_grad():
                    features = functional_call(self.backbone, split_params(theta, "backbone"), (x,))
                weight, bias = prototype_head(full_precision(features), y, infer_n_way(y, n_way), self.head_scale)
                theta.update({"head.weight": weight, "head.bias": bias})
            phi = {k: v.requires_grad_() for k, v in theta.items()}
            leaves = list(phi.values())
            if self.inner_optimizer == "adam":
                opt: torch.optim.Optimizer = torch.optim.Adam(leaves, lr=lr, betas=self.inner_betas)
            else:
                opt = torch.optim.SGD(leaves, lr=lr)
            for step in range(steps):
                xb, yb = (x, y) if order is None else (x[order[step]], y[order[step]])
                loss = F.cross_entropy(full_precision(functional_logits(self.backbone, phi, xb)), yb)
                for p, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                    p.grad = g
                opt.step()
        return {k: v.detach() for k, v in phi.items()}

    def predict(self, phi: Params, x: Tensor) -> Tensor:
        """Logits of ``x`` under adapted parameters, BatchNorm as in meta-training."""
        with self.bn.while_training(self.backbone), self.autocast(x.device):
            return full_precision(functional_logits(self.backbone, phi, x))

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Surrogate ``0.5 Σ_t ||θ − φ_t||² / B`` (gradient ``θ − mean φ``), and query accuracy at φ."""
        if self.head is not None and batch.classes.shape[-1] != self.n_way:
            raise MetafewError(f"Reptile was built for {self.n_way}-way tasks, got {batch.classes.shape[-1]}-way")
        theta = self.meta_params()
        distances, accs = [], []
        for task in batch:
            x, y = task.support_x, task.support_y
            if self.train_data == "support+query":
                x, y = torch.cat([x, task.query_x]), torch.cat([y, task.query_y])
            phi = self.inner_train(x, y, self.inner_steps, self.inner_lr, n_way=batch.classes.shape[-1])
            with torch.no_grad():
                accs.append(accuracy(self.predict(phi, task.query_x), task.query_y))
            distances.append(
                tensor_sum((theta[k] - phi[k]).pow(2).sum() for k in theta)
            )  # head.* of a prototype head is not in θ
        loss = 0.5 * torch.stack(distances).sum() / len(batch)
        return loss, torch.stack(accs).mean()

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> ReptileClassifier:
        """``test_inner_steps`` of the inner optimizer on the support set (gradients on even under no_grad)."""
        phi = self.inner_train(
            support_x, support_y, self.test_inner_steps, self.test_inner_lr, bn.while_adapting(self.backbone, stats)
        )
        return ReptileClassifier(self, phi, bn=bn)


class ReptileClassifier(MAMLClassifier):
    """A task's adapted parameters φ (buffers under ``params``); predicts as MAML's classifier does."""


Reptile.classifier_type = ReptileClassifier
