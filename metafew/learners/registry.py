"""The learner registry: every learner file adds itself with ``@register_learner("name")``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry, check_options

LEARNERS: Registry[Callable[..., Any]] = Registry("learner", group="metafew.learners")


def register_learner(name: str) -> Callable[[Any], Any]:
    """Class decorator (or factory decorator) adding a learner under ``name``; duplicates are refused."""
    return LEARNERS.register(name)


def available() -> list[str]:
    """Names accepted by :func:`create`.

    >>> from metafew.learners import available
    >>> {"protonet", "maml", "fomaml", "reptile", "finetune"} <= set(available())
    True
    """
    return LEARNERS.names()


def accepts(name: str, option: str) -> bool:
    """Whether the learner registered as ``name`` takes the keyword ``option`` (e.g. ``n_way``)."""
    return option in inspect.signature(LEARNERS.get(name)).parameters


def create(name: str, backbone: nn.Module, **options: Any) -> Any:
    """Build a learner by name on ``backbone`` (kept as is, never copied).

    ``options`` are the learner's keyword arguments, e.g. ``n_way=5, inner_lr=0.4``; an
    unknown or missing one is a one-line ConfigError.

    >>> from metafew.backbones import create as create_backbone
    >>> from metafew.learners import create
    >>> learner = create("maml", create_backbone("conv4", in_channels=1, image_size=28), n_way=5)
    >>> type(learner).__name__, learner.first_order
    ('MAML', False)
    """
    factory = LEARNERS.get(name)
    check_options(factory, options, f"learner {name!r}", backbone)
    return factory(backbone, **options)
