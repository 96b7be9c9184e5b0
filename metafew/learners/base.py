"""The small shared base of every learner, and the helpers they have in common.

A learner owns a ``backbone`` (an ``nn.Module`` that may be shared, as the very same
object, by several learners) and maybe a head. The engine trains any learner with::

    loss, acc = learner.meta_loss(batch)   # 0-dim tensors on the batch's device
    loss.backward(); opt.step()            # opt over learner.parameters()

and evaluates it with :meth:`Learner.evaluate_batch` (per-episode query accuracies)
or, one task at a time, with ``learner.adapt(support_x, support_y)(query_x)``.

Learners never call ``.item()`` or otherwise wait on the device: tensors stay where
the batch is, and losses and accuracies come back as tensors.

BatchNorm policies (``Learner.bn_policy``):

* ``"transductive"`` (MAML, Reptile): BatchNorm always normalises with the statistics
  of the batch it is given (the task's support images while adapting, the query
  images when predicting), in meta-training and at test time, as in the original
  MAML and Reptile code. Running statistics are never read nor updated by these
  learners (see :func:`batch_stats_bn`).
* ``"frozen"`` (ProtoNet, FineTune): BatchNorm follows the module's mode during
  meta-training (train mode: batch statistics, running statistics updated), and
  uses the running statistics at adaptation and evaluation (eval mode), so test
  images never change them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.episodes import EpisodeBatch
from ..device import autocast


@runtime_checkable
class Classifier(Protocol):
    """What :meth:`Learner.adapt` returns: a function from query images to logits."""

    def __call__(self, query_x: Tensor) -> Tensor:  # [M, C, H, W] -> logits [M, N]
        ...


class Learner(nn.Module):
    """Base of all learners: owns ``self.backbone`` (a shared ``nn.Module``) and maybe a head.

    Args:
        backbone: feature extractor ``[M, C, H, W] -> [M, out_features]``; kept as is
            (never copied), so several learners can share one.
        amp: ``"bf16"`` (or ``"fp16"``) to run forward passes under autocast, else None.
    """

    bn_policy: ClassVar[str] = "frozen"
    default_optimizer: dict = {"name": "adam", "lr": 1e-3}

    def __init__(self, backbone: nn.Module, *, amp: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.amp = amp

    # -- the interface -----------------------------------------------------------
    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """(loss to backpropagate, mean query accuracy) over the batch's tasks, both 0-dim."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        """A classifier for ONE task, from its support images ``[N*K, C, H, W]`` and labels ``[N*K]``."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_batch(self, batch: EpisodeBatch) -> Tensor:
        """Query accuracy of each episode, ``[B]``: adapt to the support set, classify the queries."""
        accs = []
        for episode in batch:
            logits = self.adapt(episode.support_x, episode.support_y)(episode.query_x)
            accs.append(accuracy(logits, episode.query_y))
        return torch.stack(accs)

    # -- shared helpers ----------------------------------------------------------
    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """Mixed precision on ``device`` when the learner was built with ``amp``."""
        return autocast(device, self.amp)

    def extra_repr(self) -> str:
        return f"bn_policy={self.bn_policy!r}" + (f", amp={self.amp!r}" if self.amp else "")


# -- small functions every learner uses ------------------------------------------
def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions (over the last-but-one dim), as a float tensor."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half type (autocast output), else unchanged (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def class_means(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Mean feature of each class, ``[..., N, D]``, from ``[..., M, D]`` features and ``[..., M]`` labels.

    A one-hot matmul rather than indexing: works batched over tasks, inside
    ``torch.func.vmap``, and without a host sync.
    """
    onehot = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(features.dtype)  # [..., M, N]
    sums = onehot.transpose(-1, -2) @ features  # [..., N, D]
    counts = onehot.sum(-2).unsqueeze(-1).clamp(min=1)  # [..., N, 1]
    return sums / counts


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``||x_i - c_j||^2`` for every pair, ``[..., M, N]``, computed exactly (no matmul expansion)."""
    return (x.unsqueeze(-2) - centres.unsqueeze(-3)).pow(2).sum(-1)


def infer_n_way(support_y: Tensor, n_way: int | None) -> int:
    """``n_way`` if known, else ``max(label) + 1`` (one host sync, outside any inner loop)."""
    return n_way if n_way is not None else int(support_y.max()) + 1


@contextlib.contextmanager
def batch_stats_bn(module: nn.Module, *, explicit: bool = False) -> Iterator[None]:
    """Make every BatchNorm in ``module`` normalise with batch statistics, touching no buffer.

    Inside the context each BatchNorm behaves as if built with
    ``track_running_stats=False`` in train mode: it neither reads nor updates
    ``running_mean``/``running_var``/``num_batches_tracked``. This is the functional
    "transductive" BatchNorm of MAML and Reptile. Other layers (dropout...) keep their
    own mode, and everything is restored on exit. A BatchNorm whose ``forward`` an outer
    context patched (e.g. fixed support statistics for deployment) keeps that patch.

    ``explicit=True`` also swaps the fused kernel for the formula written out in
    tensor ops (:func:`batch_norm_explicit`), for use inside ``torch.func.vmap``: the
    batching rule of the fused BatchNorm backward gives wrong second-order gradients
    under vmap (pytorch/functorch#534; we measured a 1e-2 error in float64).
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            saved.append((m, m.training, m.track_running_stats, m.__dict__.get("forward")))
            m.training = True
            m.track_running_stats = False
            if explicit:
                m.forward = _explicit_forward(m)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m, training, track, forward in saved:
            m.training = training
            m.track_running_stats = track
            if explicit:  # put back whatever forward was there (e.g. another context's patch)
                if forward is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = forward


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


def _explicit_forward(m: _BatchNorm):  # noqa: ANN202
    def forward(x: Tensor) -> Tensor:
        # m.weight/m.bias are read at call time, so torch.func.functional_call's swapped tensors are used.
        return batch_norm_explicit(x, m.weight, m.bias, m.eps)

    return forward


def split_params(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def functional_logits(backbone: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits of ``x`` through ``backbone`` and a linear head, all taken from ``params``.

    ``params`` holds ``backbone.*`` entries (any missing one falls back to the module's
    own tensor) and ``head.weight``/``head.bias``. The backbone module is not modified.
    """
    features = functional_call(backbone, split_params(params, "backbone"), (x,))
    return F.linear(features, params["head.weight"], params["head.bias"])


def minibatch_indices(n: int, batch_size: int | None, steps: int, device: torch.device) -> Tensor | None:
    """``[steps, batch_size]`` indices sweeping random permutations of ``0..n-1`` (None: full batch).

    Each epoch visits every example once, as in Reptile's and Chen et al.'s inner loops;
    drawn on ``device`` from torch's global generator, with no host sync.
    """
    if batch_size is None or batch_size >= n:
        return None
    epochs = -(-steps * batch_size // n)
    perm = torch.cat([torch.randperm(n, device=device) for _ in range(epochs)])
    return perm[: steps * batch_size].view(steps, batch_size)
