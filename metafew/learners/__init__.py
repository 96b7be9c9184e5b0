"""Few-shot learners on one shared backbone, created by name.

``create("protonet", backbone)``, ``create("maml", backbone, n_way=5)``,
``create("fomaml", backbone, n_way=5)`` (MAML with ``first_order=True``),
``create("reptile", backbone, n_way=5)``, ``create("finetune", backbone)``.
Every learner keeps the backbone object it is given, so one pretrained backbone
can be shared by all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from ..errors import ConfigError
from .base import Classifier, Learner
from .finetune import FineTune
from .maml import MAML
from .protonet import ProtoNet
from .reptile import Reptile

_REGISTRY: dict[str, Callable[..., Learner]] = {
    "protonet": ProtoNet,
    "maml": MAML,
    "fomaml": partial(MAML, first_order=True),
    "reptile": Reptile,
    "finetune": FineTune,
}


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def create(name: str, backbone: nn.Module, **options) -> Learner:
    """Build a learner by name on ``backbone`` (kept as is, never copied).

    ``options`` are the learner's keyword arguments, e.g. ``n_way=5, inner_lr=0.4``.
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown learner {name!r}; available: {', '.join(available())}")
    if key == "fomaml" and options.pop("first_order", True) is not True:
        raise ConfigError("learner 'fomaml' is MAML with first_order=True; use 'maml' for second order")
    factory = _REGISTRY[key]
    try:
        inspect.signature(factory).bind(backbone, **options)
    except TypeError as e:  # an unknown or missing option, as a one-line user-facing error
        raise ConfigError(f"learner {name!r}: {e}") from e
    return factory(backbone, **options)


__all__ = ["Classifier", "FineTune", "Learner", "MAML", "ProtoNet", "Reptile", "available", "create"]
