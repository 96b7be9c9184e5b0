"""BatchNorm policies: one object per learner that owns every BatchNorm rule.

A learner declares its policy (``bn = Transductive()``, ``bn = Frozen()``) and asks it,
in every forward pass it makes, which statistics BatchNorm normalises with:

* :meth:`BNPolicy.while_training`: meta-training (``Learner.meta_loss``);
* :meth:`BNPolicy.while_adapting`: fitting a classifier to a task's support set;
* :meth:`BNPolicy.while_predicting`: the adapted classifier on query images.

Policies:

* :class:`Transductive` (MAML, Reptile, as in the original code): BatchNorm always uses
  the statistics of the batch it is given (the support images while adapting, the
  query batch when predicting); running statistics are never read nor updated. With
  ``support_statistics=True`` a deployed classifier instead normalises queries with
  the statistics its support set had under the adapted weights, recorded once after
  adapting, so each image is classified on its own.
* :class:`Frozen` (ProtoNet, FineTune): the module's own mode in meta-training (train
  mode: batch statistics, running statistics updated), eval mode (running statistics)
  when adapting and predicting, so test images never change them. With
  ``reestimate=True`` the running statistics are replaced, for this classifier only,
  by those of its support images (AdaBN, Li et al. 2016): a backbone pretrained on
  other images fits the new ones better. The backbone's own buffers are not touched.

Support statistics are ``{BatchNorm name in the backbone: (mean, var)}``; the
classifier keeps them as buffers and hands them back to ``while_predicting``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..device import eval_mode
from ..errors import CheckpointError

Stats = dict[str, tuple[Tensor, Tensor]]


def batchnorms(module: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``module`` by its name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm)}


@dataclasses.dataclass(frozen=True)
class BNPolicy:
    """What BatchNorm does in each phase; subclasses override the phases they change."""

    name: ClassVar[str] = "custom"

    def while_training(self, module: nn.Module, *, explicit: bool = False) -> contextlib.AbstractContextManager[None]:
        """BatchNorm during meta-training (``explicit``: tensor-op BatchNorm, for ``torch.func.vmap``)."""
        return contextlib.nullcontext()

    def while_adapting(self, module: nn.Module, stats: Stats | None = None) -> contextlib.AbstractContextManager[None]:
        """BatchNorm while fitting a classifier to the support set (``stats``: from :meth:`adapting_statistics`)."""
        return eval_mode(module)

    def while_predicting(
        self, module: nn.Module, stats: Stats | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """BatchNorm of an adapted classifier on query images (``stats``: its recorded support statistics)."""
        return self.while_adapting(module, stats)

    def adapting_statistics(self, backbone: nn.Module, support_x: Tensor) -> Stats | None:
        """Statistics to adapt with, taken from the support images before adapting (None: the policy's default)."""
        return None

    def predicting_statistics(self, classifier: Callable[[Tensor], Tensor], backbone: nn.Module,
                              support_x: Tensor, adapting: Stats | None) -> Stats | None:  # fmt: skip
        """Statistics the adapted classifier keeps for prediction (None: the policy's default)."""
        return adapting

    @property
    def batch_independent(self) -> bool:
        """Whether one image's prediction never depends on other images, so tasks may share a forward pass."""
        return False

    def deployed(self, *, bn_stats: str = "support", query_bn: str = "support") -> BNPolicy:
        """This policy as :func:`metafew.adapt` configures it (``bn_stats``/``query_bn`` as documented there)."""
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON description (saved with adapted models)."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Frozen(BNPolicy):
    """Running statistics when adapting and predicting; ``reestimate``: those of the support set (AdaBN)."""

    name: ClassVar[str] = "frozen"
    reestimate: bool = False

    def while_adapting(self, module: nn.Module, stats: Stats | None = None) -> contextlib.AbstractContextManager[None]:
        if stats is None:
            return eval_mode(module)
        return _eval_with_statistics(module, stats)

    @property
    def batch_independent(self) -> bool:
        return not self.reestimate

    def adapting_statistics(self, backbone: nn.Module, support_x: Tensor) -> Stats | None:
        return running_statistics(backbone, support_x) if self.reestimate else None

    def deployed(self, *, bn_stats: str = "support", query_bn: str = "support") -> BNPolicy:
        return dataclasses.replace(self, reestimate=bn_stats == "support")


@dataclasses.dataclass(frozen=True)
class Transductive(BNPolicy):
    """Batch statistics everywhere; ``support_statistics``: a classifier predicts with its support set's."""

    name: ClassVar[str] = "transductive"
    support_statistics: bool = False

    def while_training(self, module: nn.Module, *, explicit: bool = False) -> contextlib.AbstractContextManager[None]:
        return batch_stats_bn(module, explicit=explicit)

    def while_adapting(self, module: nn.Module, stats: Stats | None = None) -> contextlib.AbstractContextManager[None]:
        return batch_stats_bn(module)

    def while_predicting(
        self, module: nn.Module, stats: Stats | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return batch_stats_bn(module) if stats is None else fixed_statistics(module, stats, float32=True)

    @torch.no_grad()
    def predicting_statistics(self, classifier: Callable[[Tensor], Tensor], backbone: nn.Module,
                              support_x: Tensor, adapting: Stats | None) -> Stats | None:  # fmt: skip
        if not self.support_statistics:
            return None
        return input_statistics(backbone, lambda: classifier(support_x))

    def deployed(self, *, bn_stats: str = "support", query_bn: str = "support") -> BNPolicy:
        return dataclasses.replace(self, support_statistics=query_bn == "support")


# -- the mechanisms -------------------------------------------------------------------------------


@torch.no_grad()
def running_statistics(backbone: nn.Module, x: Tensor) -> Stats:
    """The running statistics that re-estimating on ``x`` gives (AdaBN), leaving the backbone's own.

    Each BatchNorm that tracks running statistics gets fresh ones, the backbone runs once
    on ``x`` in train mode with a cumulative average (``momentum=None``: exactly this
    batch's statistics), and its own buffers, momenta and modes are put back.
    """
    bns = {k: m for k, m in batchnorms(backbone).items() if m.track_running_stats}
    if not bns:
        return {}
    saved = [(m, *_running_buffers(m), m.momentum) for m in bns.values()]
    modes = [(module, module.training) for module in backbone.modules()]
    for m, mean, var, count, _ in saved:
        m.running_mean = torch.zeros_like(mean)
        m.running_var = torch.ones_like(var)
        m.num_batches_tracked = torch.zeros_like(count)
        m.momentum = None
    backbone.train()
    try:
        backbone(x)
        return {k: _running_buffers(m)[:2] for k, m in bns.items()}
    finally:
        for m, mean, var, count, momentum in saved:
            m.running_mean, m.running_var, m.num_batches_tracked, m.momentum = mean, var, count, momentum
        for module, training in modes:
            module.training = training


def _running_buffers(m: _BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """``(running_mean, running_var, num_batches_tracked)`` of a BatchNorm that tracks running statistics."""
    mean, var, count = m.running_mean, m.running_var, m.num_batches_tracked
    assert mean is not None and var is not None and count is not None, "track_running_stats=False"
    return mean, var, count


def input_statistics(backbone: nn.Module, run: Callable[[], Any]) -> Stats:
    """Per-BatchNorm (mean, biased variance) of its input while ``run()`` runs (in float32)."""
    stats: Stats = {}
    handles = []
    for name, m in batchnorms(backbone).items():

        def hook(module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].float()
            dims = [0, *range(2, x.ndim)]
            stats[name] = (x.mean(dims), x.var(dims, unbiased=False))

        handles.append(m.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


@contextlib.contextmanager
def _eval_with_statistics(module: nn.Module, stats: Stats) -> Iterator[None]:
    """Eval mode, with each BatchNorm named in ``stats`` normalising with those statistics."""
    with eval_mode(module), fixed_statistics(module, stats, float32=False):
        yield


@contextlib.contextmanager
def fixed_statistics(module: nn.Module, stats: Stats, *, float32: bool) -> Iterator[None]:
    """Make each BatchNorm named in ``stats`` normalise with those statistics.

    Affine weights are read at call time, so ``torch.func.functional_call``'s swapped
    (adapted) parameters are used. ``float32``: normalise in float32 and cast back (as
    the recorded statistics are); otherwise exactly an eval-mode BatchNorm's call.
    """
    modules = batchnorms(module)
    missing = set(stats) - set(modules)
    if missing:
        raise CheckpointError(f"BatchNorm statistics for unknown layers: {sorted(missing)[:3]}")
    patched = []
    for name, (mean, var) in stats.items():
        m = modules[name]

        def forward(x: Tensor, m: _BatchNorm = m, mean: Tensor = mean, var: Tensor = var) -> Tensor:
            if not float32:
                return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
            return F.batch_norm(x.float(), mean, var, m.weight, m.bias, False, 0.0, m.eps).to(x.dtype)

        patched.append((m, m.__dict__.get("forward")))
        m.forward = forward  # type: ignore[method-assign,assignment]  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m, previous in patched:
            _restore_forward(m, previous)


@contextlib.contextmanager
def batch_stats_bn(module: nn.Module, *, explicit: bool = False) -> Iterator[None]:
    """Make every BatchNorm in ``module`` normalise with batch statistics, touching no buffer.

    Inside the context each BatchNorm behaves as if built with
    ``track_running_stats=False`` in train mode: it neither reads nor updates
    ``running_mean``/``running_var``/``num_batches_tracked``. This is the functional
    "transductive" BatchNorm of MAML and Reptile. Other layers (dropout...) keep their
    own mode, and everything is restored on exit; a ``forward`` patched by an outer
    context is left in place.

    ``explicit=True`` also swaps the fused kernel for the formula written out in
    tensor ops (:func:`batch_norm_explicit`), for use inside ``torch.func.vmap``: the
    batching rule of the fused BatchNorm backward gives wrong second-order gradients
    under vmap (pytorch/functorch#534; we measured a 1e-2 error in float64).
    """
    saved = []
    for m in batchnorms(module).values():
        saved.append((m, m.training, m.track_running_stats, m.__dict__.get("forward")))
        m.training = True
        m.track_running_stats = False
        if explicit:
            m.forward = _explicit_forward(m)  # type: ignore[method-assign,assignment]  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m, training, track, forward in saved:
            m.training = training
            m.track_running_stats = track
            if explicit:
                _restore_forward(m, forward)


def _restore_forward(m: nn.Module, previous: Any) -> None:
    if previous is None:
        m.__dict__.pop("forward", None)
    else:
        m.forward = previous  # type: ignore[method-assign]


def batch_norm_explicit(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Training-mode BatchNorm over dim 1 with batch statistics, in plain differentiable tensor ops."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # statistics in float32 even under bf16 autocast, as the fused kernel does
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(dtype)


def _explicit_forward(m: _BatchNorm) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        # m.weight/m.bias are read at call time, so torch.func.functional_call's swapped tensors are used.
        return batch_norm_explicit(x, m.weight, m.bias, m.eps)

    return forward


__all__ = [
    "BNPolicy",
    "Frozen",
    "Stats",
    "Transductive",
    "batch_norm_explicit",
    "batch_stats_bn",
    "batchnorms",
    "fixed_statistics",
    "input_statistics",
    "running_statistics",
]
