"""Model-Agnostic Meta-Learning (Finn et al. 2017), first-order MAML and Proto-MAML.

MAML meta-learns an initialisation θ of backbone + linear head such that a few
gradient steps on a task's support set give parameters φ that classify its queries
well. The meta-loss is the query cross-entropy at φ, and its gradient flows back
through the inner loop (second order: Hessian-vector products). With
``first_order=True`` (FO-MAML) the inner gradients are treated as constants, so the
meta-gradient is just the query gradient at φ.

The inner loop is purely functional: parameters are a ``{name: tensor}`` dict run
through ``torch.func.functional_call``; the backbone module is never copied and
never modified. Tasks run in a plain Python loop (``vmap_tasks=False``, the default:
2-3x faster than vmap on CPU) or all at once under ``torch.func.vmap``.

Head initialisation per task (``head_init``):

* ``"learned"`` (default when ``n_way`` is given): the head is part of θ, as in MAML.
* ``"zero"``: the head starts at zero for every task (any N works).
* ``"prototypes"``: Proto-MAML (Triantafillou et al. 2020): ``W_k = 2 c_k``,
  ``b_k = -||c_k||^2`` from the support class means ``c_k`` of the features, so the
  initial logits are those of a prototypical network; gradients flow through this
  initialisation into the backbone.

BatchNorm policy :class:`~metafew.learners.bn.Transductive` (MAML's original): BatchNorm always uses the
statistics of the batch it sees (the support set in the inner loop, the query set
when predicting), in meta-training and at test time, so query predictions of a task
depend on its query batch. Running statistics are never read nor updated, by
training or by test images (:func:`~metafew.learners.bn.batch_stats_bn`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.episodes import EpisodeBatch
from ..errors import ConfigError, MetafewError
from .base import (
    Classifier,
    Learner,
    Tensors,
    accuracy,
    full_precision,
    functional_logits,
    infer_n_way,
    prototype_head,
    split_params,
    tensor_sum,
)
from .bn import BNPolicy, Stats, Transductive
from .registry import register_learner

Params = dict[str, Tensor]
HeadInit = Literal["learned", "zero", "prototypes"]


@register_learner("maml")
class MAML(Learner):
    """MAML / FO-MAML / Proto-MAML on a shared backbone.

    Args:
        backbone: feature extractor with ``out_features`` (shared, never copied).
        n_way: classes per task; needed for ``head_init="learned"``.
        inner_lr, inner_steps: inner-loop SGD step size and steps in meta-training
            (Finn et al., Omniglot 5-way: 0.4 and 1).
        test_inner_lr, test_inner_steps: the same for :meth:`adapt` at test time
            (default: ``inner_lr``; 3 steps, Finn et al.'s Omniglot setting).
        first_order: FO-MAML, dropping the second-order term of the meta-gradient.
        head_init: ``"learned"``, ``"zero"`` or ``"prototypes"`` (default: learned if
            ``n_way`` is given, else zero).
        inner_params: ``"all"`` adapts backbone and head in the inner loop (MAML);
            ``"head"`` adapts only the head (ANIL, Raghu et al. 2020).
        vmap_tasks: run the tasks of a meta-batch under ``torch.func.vmap`` instead of a
            Python loop (``meta_loss`` only; BatchNorm then runs as explicit tensor ops).
        head_scale: Proto-MAML only: the initial logits are ``head_scale`` times the
            prototypical ones. A pretrained backbone's features are large, so its prototype
            logits saturate the cross-entropy (loss exactly 0 in float32, no meta-gradient);
            a scale below 1 keeps the loss and its gradient alive.
        amp: ``"bf16"`` to run forward passes under autocast.
    """

    bn = Transductive()
    #: for :func:`metafew.adapt`: a backbone checkpoint carries no meta-learned head, so the head
    #: starts from the support prototypes (Proto-MAML, Triantafillou et al. 2020); step sizes
    #: chosen on PneumoniaMNIST's *validation* split (benchmarks/medical.py), never on a test split.
    adapt_defaults: ClassVar[dict[str, Any]] = {
        "head_init": "prototypes",
        "test_inner_lr": 0.01,
        "test_inner_steps": 10,
    }
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(
        self,
        backbone: nn.Module,
        n_way: int | None = None,
        *,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        test_inner_lr: float | None = None,
        test_inner_steps: int = 3,
        first_order: bool = False,
        head_init: HeadInit | None = None,
        inner_params: Literal["all", "head"] = "all",
        vmap_tasks: bool = False,
        head_scale: float = 1.0,
        amp: str | None = None,
    ) -> None:
        super().__init__(backbone, amp=amp)
        head_init = head_init or ("learned" if n_way is not None else "zero")
        if head_init not in ("learned", "zero", "prototypes"):
            raise MetafewError(f"MAML: head_init must be 'learned', 'zero' or 'prototypes', got {head_init!r}")
        if head_init == "learned" and n_way is None:
            raise MetafewError("MAML: head_init='learned' needs n_way (or use head_init='zero' or 'prototypes')")
        if not head_scale > 0:
            raise MetafewError(f"MAML: head_scale must be positive, got {head_scale!r}")
        if inner_params not in ("all", "head"):
            raise MetafewError(f"MAML: inner_params must be 'all' or 'head', got {inner_params!r}")
        if not hasattr(backbone, "out_features"):
            raise MetafewError("MAML: the backbone must state its feature size as `out_features`")
        self.n_way = n_way
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        self.test_inner_steps = test_inner_steps
        self.first_order = first_order
        self.head_init = head_init
        self.inner_params = inner_params
        self.vmap_tasks = vmap_tasks
        self.head_scale = head_scale
        self.feature_dim = int(backbone.out_features)  # type: ignore[arg-type]
        self.head = nn.Linear(self.feature_dim, n_way) if head_init == "learned" and n_way is not None else None

    # -- functional model --------------------------------------------------------
    def meta_params(self) -> Params:
        """θ: the backbone's and head's parameters by name (``backbone.*``, ``head.*``), not copies."""
        return {k: p for k, p in self.named_parameters() if k.startswith(("backbone.", "head."))}

    def _adapted_names(self, params: Params) -> list[str]:
        """Names the inner loop updates: the head, plus the trainable backbone parameters for 'all'."""
        trainable = {k for k, p in self.named_parameters() if p.requires_grad}
        return [k for k in params if k.startswith("head.") or (self.inner_params == "all" and k in trainable)]

    def features(self, params: Params, x: Tensor) -> Tensor:
        """Backbone features of ``x`` with the given parameters."""
        return functional_call(self.backbone, split_params(params, "backbone"), (x,))

    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """Logits of ``x`` under parameters ``params`` (backbone + head)."""
        return functional_logits(self.backbone, params, x)

    def task_params(self, theta: Params, support_x: Tensor, support_y: Tensor, n_way: int) -> Params:
        """θ plus this task's initial head, per ``head_init``."""
        if self.head_init == "learned":
            return dict(theta)
        if self.head_init == "zero":
            ref = next(iter(theta.values()))
            weight = torch.zeros(n_way, self.feature_dim, device=support_x.device, dtype=ref.dtype)
            bias = torch.zeros(n_way, device=support_x.device, dtype=ref.dtype)
        else:  # Proto-MAML: logits 2 c.f - |c|^2 = -|f - c|^2 + |f|^2
            features = full_precision(self.features(theta, support_x))
            weight, bias = prototype_head(features, support_y, n_way, self.head_scale)
        return {**theta, "head.weight": weight, "head.bias": bias}

    # -- the inner loop ----------------------------------------------------------
    def inner_loop(self, params: Params, x: Tensor, y: Tensor, steps: int, lr: float, *, create_graph: bool) -> Params:
        """``steps`` SGD steps on the cross-entropy of ``(x, y)``, functionally (autograd version).

        ``create_graph=True`` keeps the graph of the gradients (second-order MAML);
        otherwise the gradients are constants (FO-MAML, and test-time adaptation).
        """
        names = self._adapted_names(params)
        for _ in range(steps):
            # Fresh aliases make each gradient a partial derivative: a Proto-MAML head is a
            # function of the backbone, but the inner loop treats them as separate variables.
            params = {**params, **{k: params[k].view_as(params[k]) for k in names}}
            loss = F.cross_entropy(self.forward_with(params, x), y)
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    params[k] = params[k] - lr * g
        return params

    def _inner_loop_func(self, params: Params, x: Tensor, y: Tensor, steps: int, lr: float) -> Params:
        """The same inner loop with ``torch.func.grad``, so that it can run under ``vmap``."""
        names = self._adapted_names(params)
        for _ in range(steps):
            fixed = {k: v for k, v in params.items() if k not in names}

            def loss_fn(adapted: Params, fixed: Params = fixed) -> Tensor:
                return F.cross_entropy(self.forward_with({**fixed, **adapted}, x), y)

            grads = torch.func.grad(loss_fn)({k: params[k] for k in names})
            if self.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {**params, **{k: params[k] - lr * grads[k] for k in names}}
        return params

    # -- the interface -----------------------------------------------------------
    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Mean query cross-entropy after ``inner_steps`` on each task's support set, and query accuracy."""
        n_way = batch.classes.shape[-1]
        if self.n_way is not None and n_way != self.n_way and self.head_init == "learned":
            raise MetafewError(f"MAML was built for {self.n_way}-way tasks with a learned head, got {n_way}-way")
        theta = self.meta_params()
        with self.bn.while_training(self.backbone, explicit=self.vmap_tasks), self.autocast(batch.query_x.device):
            if self.vmap_tasks:
                losses, accs = self._tasks_vmap(theta, batch, n_way)
            else:
                losses, accs = self._tasks_loop(theta, batch, n_way)
        return losses.mean(), accs.mean()

    def _task_loss(
        self, theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, n_way: int, func: bool
    ) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy of one task after the inner loop (``func``: the torch.func version)."""
        if func:
            params = self.task_params(theta, sx, sy, n_way)
            params = self._inner_loop_func(params, sx, sy, self.inner_steps, self.inner_lr)
        else:
            outer_grad = torch.is_grad_enabled()  # meta_loss may be called under no_grad (validation)
            with torch.enable_grad():
                params = self.task_params(theta, sx, sy, n_way)
                for k in self._adapted_names(params):
                    if not params[k].requires_grad:  # a zero head starts as a constant
                        params[k] = params[k].requires_grad_()
                create_graph = outer_grad and not self.first_order
                params = self.inner_loop(params, sx, sy, self.inner_steps, self.inner_lr, create_graph=create_graph)
            if not outer_grad:
                params = {k: v.detach() for k, v in params.items()}
        logits = self.forward_with(params, qx)
        return F.cross_entropy(full_precision(logits), qy), accuracy(logits, qy)

    def _tasks_loop(self, theta: Params, batch: EpisodeBatch, n_way: int) -> tuple[Tensor, Tensor]:
        """Tasks one at a time. With gradients on, each task's meta-gradient is taken as soon
        as its loss exists, so only one task's (second-order) graph is alive at a time: on
        CPU, holding all B graphs until one final backward cost more in page faults than
        the arithmetic. The returned losses carry the summed gradient through a surrogate."""
        tasks = [(t.support_x, t.support_y, t.query_x, t.query_y) for t in batch]
        if not torch.is_grad_enabled():
            task_losses, task_accs = zip(*(self._task_loss(theta, *t, n_way, False) for t in tasks))
            return torch.stack(task_losses), torch.stack(task_accs)
        names = [k for k, v in theta.items() if v.requires_grad]
        leaves = [theta[k] for k in names]
        grads: list[Tensor | None] = [None] * len(leaves)
        losses: list[Tensor] = []
        accs: list[Tensor] = []
        for t in tasks:
            loss, acc = self._task_loss(theta, *t, n_way, False)
            task_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads = [g if tg is None else (tg if g is None else g + tg) for g, tg in zip(grads, task_grads)]
            losses.append(loss.detach())
            accs.append(acc)
        # value: the task losses; gradient of their mean w.r.t. θ: the mean task gradient.
        surrogate = tensor_sum((p * g).sum() for p, g in zip(leaves, grads) if g is not None) / len(tasks)
        losses_t = torch.stack(losses)
        return losses_t + (surrogate - surrogate.detach()), torch.stack(accs)

    def _tasks_vmap(self, theta: Params, batch: EpisodeBatch, n_way: int) -> tuple[Tensor, Tensor]:
        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self._task_loss(theta, sx, sy, qx, qy, n_way, True)

        tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return torch.func.vmap(one, randomness="different")(*tasks)

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> MAMLClassifier:
        """``test_inner_steps`` SGD steps from θ on the support set; returns the adapted classifier.

        Runs with gradients enabled even when called under ``torch.no_grad()``; the
        returned parameters are detached, and θ is left untouched.
        """
        n_way = infer_n_way(support_y, self.n_way if self.head_init == "learned" else None)
        with torch.enable_grad(), bn.while_adapting(self.backbone, stats), self.autocast(support_x.device):
            theta = {k: v.detach() for k, v in self.meta_params().items()}
            params = {k: v.detach() for k, v in self.task_params(theta, support_x, support_y, n_way).items()}
            for k in self._adapted_names(params):
                params[k].requires_grad_()
            params = self.inner_loop(
                params, support_x, support_y, self.test_inner_steps, self.test_inner_lr, create_graph=False
            )
        return MAMLClassifier(self, {k: v.detach() for k, v in params.items()}, bn=bn)


class MAMLClassifier(Classifier):
    """A task's adapted parameters φ (buffers under ``params``, named as in ``meta_params``)."""

    saved = ("params",)
    learner: Any

    def __init__(self, learner: Learner, params: dict[str, Tensor], **kw: Any) -> None:
        super().__init__(learner, **kw)
        self.params = Tensors(params)

    def logits(self, query_x: Tensor) -> Tensor:
        with self.learner.autocast(query_x.device):
            return full_precision(functional_logits(self.learner.backbone, self.params.as_dict(), query_x))


MAML.classifier_type = MAMLClassifier


@register_learner("fomaml")
def FOMAML(backbone: nn.Module, **options: Any) -> MAML:
    """First-order MAML (Finn et al. 2017, FO-MAML): :class:`MAML` with ``first_order=True``."""
    if options.pop("first_order", True) is not True:
        raise ConfigError("learner 'fomaml' is MAML with first_order=True; use 'maml' for second order")
    return MAML(backbone, first_order=True, **options)
