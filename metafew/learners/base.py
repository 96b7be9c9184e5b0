"""The small shared base of every learner, and the helpers they have in common.

A learner owns a ``backbone`` (an ``nn.Module`` that may be shared, as the very same
object, by several learners) and maybe a head. The engine trains any learner with::

    loss, acc = learner.meta_loss(batch)   # 0-dim tensors on the batch's device
    loss.backward(); opt.step()            # opt over learner.parameters()

and evaluates it with :meth:`Learner.evaluate_batch` (per-episode query accuracies)
or, one task at a time, with ``learner.adapt(support_x, support_y)(query_x)``.

Learners never call ``.item()`` or otherwise wait on the device: tensors stay where
the batch is, and losses and accuracies come back as tensors.

BatchNorm: each learner declares a policy object (``bn = Transductive()`` or
``bn = Frozen()``, see :mod:`metafew.learners.bn`) and asks it, in every forward pass,
which statistics to normalise with; ``learner.bn_policy`` is its name.

What ``adapt`` returns is a :class:`Classifier`, an ``nn.Module``: its adapted state
(prototypes, a head, adapted weights, support BatchNorm statistics) lives in buffers,
so ``classifier.state_dict()`` plus the learner's construction options rebuild it
(:meth:`Classifier.from_state_dict`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.episodes import EpisodeBatch
from ..device import autocast
from ..errors import CheckpointError
from .bn import BNPolicy, Frozen, Stats

if TYPE_CHECKING:
    from ..config import RunConfig


class Tensors(nn.Module):
    """Named tensors as buffers, nested along the dots of their names (``"backbone.0.weight"``).

    So a classifier's ``state_dict`` keeps the names of the tensors it adapted, they
    move with ``.to()``, and ``tensors["head.weight"]`` reads one back.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._names = list(tensors)
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            node: nn.Module = self
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]  # type: ignore[assignment]
            node.register_buffer(leaf, t)

    def __getitem__(self, name: str) -> Tensor:
        return self.get_buffer(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> list[str]:
        return list(self._names)

    def as_dict(self) -> dict[str, Tensor]:
        """``{name: tensor}``, the buffers themselves (not copies)."""
        return {k: self.get_buffer(k) for k in self._names}


def _entry(state: Mapping[str, Tensor], name: str) -> Tensor | dict[str, Tensor] | None:
    """``state[name]``, or the ``name.*`` entries without the prefix, or None."""
    if name in state:
        return state[name]
    sub = split_params(dict(state), name)
    return sub or None


class Classifier(nn.Module):
    """What :meth:`Learner.adapt` returns: ``classifier(query_x) -> logits``, for ONE task.

    Holds the learner (a submodule: the backbone is shared, never copied), the BatchNorm
    policy it was adapted with, and its adapted tensors as buffers; subclasses name
    those in ``saved`` (constructor arguments: a tensor or a ``{name: tensor}`` dict)
    and compute ``logits``. Support BatchNorm statistics, when the policy keeps any,
    are the buffers under ``bn_stats``.
    """

    saved: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learner: Learner, *, bn: BNPolicy | None = None, bn_stats: Stats | None = None) -> None:
        super().__init__()
        self.learner = learner
        self.bn = bn if bn is not None else learner.bn
        self.set_bn_stats(bn_stats)

    def set_bn_stats(self, stats: Stats | None) -> None:
        """Keep (or drop, with None) the BatchNorm statistics that prediction normalises with."""
        flat = (
            None
            if stats is None
            else {f"{k}.{s}": t for k, (m, v) in stats.items() for s, t in (("mean", m), ("var", v))}
        )
        self.bn_stats = None if flat is None else Tensors(flat)

    def support_stats(self) -> Stats | None:
        """The kept BatchNorm statistics as ``{layer: (mean, var)}``, or None."""
        return None if self.bn_stats is None else _stats_pairs(self.bn_stats.as_dict())

    def forward(self, query_x: Tensor) -> Tensor:
        """Float32 logits ``[M, N]`` of query images ``[M, C, H, W]``, BatchNorm as the policy says."""
        with self.bn.while_predicting(self.learner.backbone, self.support_stats()):
            return self.logits(query_x)

    def logits(self, query_x: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls, learner: Learner, state: Mapping[str, Tensor], *, bn: BNPolicy | None = None
    ) -> Classifier:
        """Rebuild a classifier from its ``state_dict()`` around a freshly built ``learner``."""
        args: dict[str, Any] = {name: _entry(state, name) for name in cls.saved}
        stats = _entry(state, "bn_stats")
        clf = cls(learner, **args, bn=bn)
        if isinstance(stats, dict):
            clf.set_bn_stats(_stats_pairs(stats))
        try:
            clf.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{cls.__name__}: the saved state does not fit ({str(e).splitlines()[0]})") from e
        return clf


def _stats_pairs(flat: Mapping[str, Tensor]) -> Stats:
    """``{"layer.mean": m, "layer.var": v}`` as ``{"layer": (m, v)}``."""
    layers = dict.fromkeys(k.rpartition(".")[0] for k in flat)
    return {k: (flat[f"{k}.mean"], flat[f"{k}.var"]) for k in layers}


def tensors_or_none(tensors: Mapping[str, Tensor] | None) -> Tensors | None:
    """``Tensors(tensors)``, or None for None."""
    return None if tensors is None else Tensors(tensors)


class Learner(nn.Module):
    """Base of all learners: owns ``self.backbone`` (a shared ``nn.Module``) and maybe a head.

    Args:
        backbone: feature extractor ``[M, C, H, W] -> [M, out_features]``; kept as is
            (never copied), so several learners can share one.
        amp: ``"bf16"`` (or ``"fp16"``) to run forward passes under autocast, else None.
    """

    bn: BNPolicy = Frozen()
    classifier_type: ClassVar[type[Classifier]] = Classifier
    #: Options :func:`metafew.adapt` uses unless given; None: not offered by ``metafew.adapt``.
    adapt_defaults: ClassVar[dict[str, Any] | None] = None
    #: The configuration a learner loaded by :func:`metafew.load` was built from (set there only).
    run_config: RunConfig
    default_optimizer: dict[str, Any] = {"name": "adam", "lr": 1e-3}  # noqa: RUF012 - per-class default, each learner's __init__ copies it per instance

    def __init__(self, backbone: nn.Module, *, amp: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.amp = amp
        self.default_optimizer = dict(type(self).default_optimizer)  # per instance: callers may change it

    # -- the interface -----------------------------------------------------------
    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """(loss to backpropagate, mean query accuracy) over the batch's tasks, both 0-dim."""
        raise NotImplementedError

    @property
    def bn_policy(self) -> str:
        """The name of the BatchNorm policy (``"frozen"``, ``"transductive"``)."""
        return self.bn.name

    def adapt(self, support_x: Tensor, support_y: Tensor, *, bn: BNPolicy | None = None) -> Classifier:
        """A classifier for ONE task, from its support images ``[N*K, C, H, W]`` and labels ``[N*K]``.

        ``bn``: the BatchNorm policy to adapt and predict with (default ``self.bn``). It
        gives the statistics to adapt with, and those the classifier keeps for prediction.
        """
        bn = bn if bn is not None else self.bn
        stats = bn.adapting_statistics(self.backbone, support_x)
        classifier = self.fit(support_x, support_y, bn, stats)
        classifier.set_bn_stats(bn.predicting_statistics(classifier, self.backbone, support_x, stats))
        return classifier

    def fit(self, support_x: Tensor, support_y: Tensor, bn: BNPolicy, stats: Stats | None) -> Classifier:
        """The task's classifier, fitted under ``bn.while_adapting(backbone, stats)`` (each learner's method)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_batch(self, batch: EpisodeBatch) -> Tensor:
        """Query accuracy of each episode, ``[B]``: adapt to the support set, classify the queries.

        A learner with a batched :meth:`episode_logits` scores all tasks in one pass when its
        BatchNorm policy makes predictions independent of the batch; otherwise one task at a time.
        """
        if type(self).episode_logits is not Learner.episode_logits and self.bn.batch_independent:
            with self.bn.while_predicting(self.backbone):
                return accuracy(self.episode_logits(batch), batch.query_y)
        accs = []
        for episode in batch:
            logits = self.adapt(episode.support_x, episode.support_y)(episode.query_x)
            accs.append(accuracy(logits, episode.query_y))
        return torch.stack(accs)

    # -- for learners that score a whole batch of episodes in one pass (ProtoNet, MatchingNet, R2-D2...) --
    def embed(self, x: Tensor) -> Tensor:
        """Backbone features of images ``[M, C, H, W]`` (under autocast when built with ``amp``), in float32."""
        with self.autocast(x.device):
            return full_precision(self.backbone(x))

    def episode_features(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor, int]:
        """Support ``[B, S, D]`` and query ``[B, Q, D]`` features of a batch, embedded in one pass, and N."""
        b, s = batch.support_x.shape[:2]
        images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        features = self.embed(images)
        return features[: b * s].unflatten(0, (b, s)), features[b * s :].unflatten(0, (b, -1)), batch.classes.shape[-1]

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """Query logits ``[B, Q, N]`` of every episode of ``batch`` (the batched learners define it)."""
        raise NotImplementedError

    def episodic_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the queries under :meth:`episode_logits` and their accuracy (episodic training)."""
        with self.bn.while_training(self.backbone):
            logits = self.episode_logits(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        return loss, accuracy(logits, batch.query_y).mean()

    # -- shared helpers ----------------------------------------------------------
    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """Mixed precision on ``device`` when the learner was built with ``amp``."""
        return autocast(device, self.amp)

    def extra_repr(self) -> str:
        return f"bn={self.bn!r}" + (f", amp={self.amp!r}" if self.amp else "")


# -- small functions every learner uses ------------------------------------------
def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions (over the last-but-one dim), as a float tensor."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def tensor_sum(terms: Iterable[Tensor]) -> Tensor:
    """``sum(terms)`` of at least one tensor, typed as a tensor (no ``0 +`` start value)."""
    return functools.reduce(operator.add, terms)


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


def prototype_head(features: Tensor, labels: Tensor, n_way: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Proto-MAML's linear head (Triantafillou et al. 2020): ``W = 2s c``, ``b = -s |c|^2`` from class means ``c``.

    Its logits ``s (2 c.f - |c|^2) = -s |f - c|^2 + s |f|^2`` rank classes exactly as a
    prototypical network does; ``scale`` s < 1 softens them so that the support loss
    (and the gradient through it) is not saturated at 0.
    """
    centres = class_means(features, labels, n_way)
    return 2 * scale * centres, -scale * centres.pow(2).sum(-1)


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``||x_i - c_j||^2`` for every pair, ``[..., M, N]``, computed exactly (no matmul expansion)."""
    return (x.unsqueeze(-2) - centres.unsqueeze(-3)).pow(2).sum(-1)


def infer_n_way(support_y: Tensor, n_way: int | None) -> int:
    """``n_way`` if known, else ``max(label) + 1`` (one host sync, outside any inner loop)."""
    return n_way if n_way is not None else int(support_y.max()) + 1


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
