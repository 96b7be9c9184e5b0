"""One adapted classifier, made safe to deploy: seeded adaptation, batch-independent predictions.

:func:`fit` runs ``learner.adapt`` on a support set under a seeded RNG (fine-tuning
draws minibatches from torch's global generator) without disturbing the caller's RNG.

:class:`Predictor` wraps the classifier it returns. For learners whose BatchNorm is
``"transductive"`` (MAML, Reptile), the learner's own classifier normalises each
prediction batch with that batch's statistics, so the class of an image would depend
on which other images are predicted with it, and a single image would be normalised
with its own statistics. With ``query_bn="support"`` (the default here), BatchNorm
instead uses the statistics of the *support set* under the adapted parameters,
recorded once after adaptation: every image is classified on its own, the same way
in the estimate, in :meth:`AdaptedModel.predict` and after save/load.
``query_bn="batch"`` keeps the learner's original behaviour.

``temperature`` divides the logits before the softmax (temperature scaling, Guo et al.
2017): set from the estimate's held-out predictions so that the probabilities are
calibrated (prototype distances of a pretrained backbone are otherwise often turned
into near-certain 0/1 probabilities, even for wrong answers). It never changes the
predicted class.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError

QueryBN = Literal["support", "batch"]


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for a named random stream of a run (independent of the other streams)."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's global RNG (CPU and this CUDA device) seeded, restoring it afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fit(learner: nn.Module, support_x: Tensor, support_y: Tensor, seed: int) -> Any:
    """``learner.adapt(support_x, support_y)`` under a seeded RNG, with the learner in eval mode."""
    learner.eval()
    with seeded(seed, support_x.device):
        return learner.adapt(support_x, support_y)  # type: ignore[operator]


class Predictor:
    """Logits of an adapted classifier, one image independent of the others.

    Args:
        learner: the learner that produced ``classifier``.
        classifier: what ``learner.adapt`` returned.
        bn_stats: recorded support statistics ``{module name: (mean, var)}`` (transductive
            learners with ``query_bn="support"``), or None.
    """

    def __init__(
        self,
        learner: nn.Module,
        classifier: Any,
        bn_stats: dict[str, tuple[Tensor, Tensor]] | None,
        temperature: float = 1.0,
    ) -> None:
        self.learner = learner
        self.classifier = classifier
        self.bn_stats = bn_stats
        self.temperature = float(temperature)

    @classmethod
    def build(cls, learner: nn.Module, classifier: Any, support_x: Tensor, query_bn: QueryBN) -> Predictor:
        stats = None
        if getattr(learner, "bn_policy", "frozen") == "transductive" and query_bn == "support":
            stats = record_bn_stats(learner, classifier, support_x)
        return cls(learner, classifier, stats)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Float32 logits ``[M, N]`` of normalised images ``[M, C, H, W]``, divided by the temperature."""
        if self.bn_stats is None:
            out = self.classifier(x).float()
        else:
            with fixed_bn(self.learner, self.bn_stats):
                out = self.classifier(x).float()
        return out if self.temperature == 1.0 else out / self.temperature

    # -- saving --------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensors, record)``: the classifier's own state (all but its learner) and how to rebuild it."""
        cls = type(self.classifier)
        attrs = {k: v for k, v in vars(self.classifier).items() if v is not self.learner}
        for k, v in attrs.items():
            if not _plain(v):
                raise CheckpointError(f"cannot save a {cls.__name__}: its attribute {k!r} is a {type(v).__name__}")
        tensors: dict[str, Any] = {"classifier": attrs}
        if self.bn_stats is not None:
            tensors["bn_stats"] = {k: {"mean": m, "var": v} for k, (m, v) in self.bn_stats.items()}
        record = {
            "classifier_class": f"{cls.__module__}:{cls.__qualname__}",
            "query_bn": "support" if self.bn_stats is not None else "batch",
            "temperature": self.temperature,
        }
        return tensors, record

    @classmethod
    def from_state(cls, learner: nn.Module, tensors: dict[str, Any], record: dict[str, Any], where: str) -> Predictor:
        """Rebuild a predictor saved by :meth:`state` around ``learner``."""
        name = str(record.get("classifier_class", ""))
        module_name, _, qualname = name.partition(":")
        if not module_name.startswith("metafew.learners") or not qualname:
            raise CheckpointError(f"{where}: unknown classifier type {name!r}")
        try:
            klass = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError) as e:
            raise CheckpointError(f"{where}: classifier type {name!r} does not exist in this metafew") from e
        attrs = dict(tensors.get("classifier") or {})
        params = list(inspect.signature(klass).parameters)
        if params[:1] and set(params[1:]) == set(attrs):
            classifier = klass(learner, **attrs)
        else:  # a classifier whose constructor does not mirror its attributes
            classifier = klass.__new__(klass)
            learner_attr = next((p for p in params[:1]), "learner")
            classifier.__dict__.update({learner_attr: learner, **attrs})
        stats = tensors.get("bn_stats")
        bn = None if not stats else {k: (v["mean"], v["var"]) for k, v in stats.items()}
        return cls(learner, classifier, bn, float(record.get("temperature", 1.0)))

    def to(self, device: torch.device) -> Predictor:
        self.classifier.__dict__.update(
            {k: _move(v, device) for k, v in vars(self.classifier).items() if v is not self.learner}
        )
        if self.bn_stats is not None:
            self.bn_stats = {k: (m.to(device), v.to(device)) for k, (m, v) in self.bn_stats.items()}
        return self


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (Tensor, bool, int, float, str)):
        return True
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


def _move(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, dict):
        return {k: _move(x, device) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_move(x, device) for x in v)
    return v


def _bn_modules(learner: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in learner.named_modules() if isinstance(m, _BatchNorm)}


@torch.no_grad()
def record_bn_stats(learner: nn.Module, classifier: Any, support_x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-BatchNorm (mean, biased variance) of its input while the classifier runs on the support set."""
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, m in _bn_modules(learner).items():

        def hook(module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].float()
            dims = [0, *range(2, x.ndim)]
            stats[name] = (x.mean(dims), x.var(dims, unbiased=False))

        handles.append(m.register_forward_pre_hook(hook))
    try:
        classifier(support_x)
    finally:
        for h in handles:
            h.remove()
    return stats


@contextlib.contextmanager
def fixed_bn(learner: nn.Module, stats: dict[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Make each BatchNorm normalise with the recorded statistics (its affine weights still
    read at call time, so the classifier's adapted parameters are used)."""
    modules = _bn_modules(learner)
    missing = set(stats) - set(modules)
    if missing:
        raise CheckpointError(f"recorded BatchNorm statistics for unknown layers: {sorted(missing)[:3]}")
    patched = []
    for name, (mean, var) in stats.items():
        m = modules[name]

        def forward(x: Tensor, m: _BatchNorm = m, mean: Tensor = mean, var: Tensor = var) -> Tensor:
            y = F.batch_norm(x.float(), mean, var, m.weight, m.bias, False, 0.0, m.eps)
            return y.to(x.dtype)

        patched.append((m, m.__dict__.get("forward")))
        m.forward = forward  # type: ignore[method-assign]  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m, previous in patched:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous  # type: ignore[method-assign]


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``logits / T`` (a 1-D search over log T)."""
    z = logits.double()
    y = labels.long()
    if len(y) == 0 or z.shape[1] < 2:
        return 1.0

    def nll(log_t: Tensor) -> Tensor:  # [G] -> mean cross-entropy at each temperature
        return torch.stack([F.cross_entropy(z / t.exp(), y) for t in log_t])

    grid = torch.linspace(-7.0, 7.0, 141, dtype=torch.float64)  # T from 1e-3 to 1e3
    best = float(grid[nll(grid).argmin()])
    fine = torch.linspace(best - 0.1, best + 0.1, 41, dtype=torch.float64)
    return float(fine[nll(fine).argmin()].exp())
