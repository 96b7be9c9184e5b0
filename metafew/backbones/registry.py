"""Backbone registry: ``create("conv4", in_channels=1, image_size=(28, 28))``.

Every backbone is an ``nn.Module`` mapping images ``[M, C, H, W]`` to features
``[M, out_features]`` and stating ``out_features``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..registry import Registry, check_options
from .weights import WEIGHTS

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone", group="metafew.backbones")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a backbone factory ``f(in_channels, image_size, **options)``; duplicates are refused."""
    return BACKBONES.register(name)


def available() -> list[str]:
    """Names accepted by :func:`create`.

    >>> from metafew.backbones import available
    >>> "conv4" in available()
    True
    """
    return BACKBONES.names()


def create(
    name: str, in_channels: int | None = None, image_size: tuple[int, int] | int | None = None, **options: Any
) -> nn.Module:
    """Build a backbone by name; ``out_features`` is set for the given input size (default 3x84x84).

    ``weights="<name>"`` loads a backbone shipped with metafew (``<name>-<arch>``, see
    :func:`metafew.backbones.list_weights`); its image format comes with it. Other
    ``weights`` values go to the architecture (the ResNets take ``"imagenet"`` or a path).

    >>> from metafew.backbones import create
    >>> backbone = create("conv4", in_channels=1, image_size=28)
    >>> backbone.out_features
    64
    """
    factory = BACKBONES.get(name)
    name = name.lower()
    weights = options.get("weights")
    if isinstance(weights, str) and f"{weights.lower()}-{name}" in WEIGHTS:
        return _shipped(
            name, weights.lower(), in_channels, image_size, {k: v for k, v in options.items() if k != "weights"}
        )
    in_channels = 3 if in_channels is None else in_channels
    image_size = 84 if image_size is None else image_size
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_options(factory, {"in_channels": in_channels, "image_size": size, **options}, f"backbone {name!r}")
    model = factory(in_channels=in_channels, image_size=size, **options)
    model.name = name  # type: ignore[assignment]
    model.in_channels = in_channels  # type: ignore[assignment]
    model.image_size = size  # type: ignore[assignment]
    if not hasattr(model, "options"):
        model.options = dict(options)  # type: ignore[assignment]  # so checkpoints can rebuild it
    if not hasattr(model, "out_features"):
        with torch.no_grad():
            was = model.training
            model.eval()
            model.out_features = int(model(torch.zeros(1, in_channels, *size)).shape[1])  # type: ignore[assignment]
            model.train(was)
    return model


def _shipped(
    name: str, weights: str, in_channels: int | None, image_size: tuple[int, int] | int | None, options: dict[str, Any]
) -> nn.Module:
    from ..checkpoint import load_backbone

    entry = WEIGHTS.get(f"{weights}-{name}")
    if not entry.available:
        raise CheckpointError(
            f"pretrained backbone {entry.name!r} is declared but its file {entry.path} is missing; reinstall metafew"
        )
    if options:
        raise ConfigError(
            f"backbone {name!r} with weights={weights!r}: options {sorted(options)} do not apply to shipped weights"
        )
    model, _ = load_backbone(entry.path, in_channels=in_channels, image_size=image_size, arch=name)
    return model.train()


def describe(model: nn.Module, action: str = "use") -> tuple[str, int, tuple[int, int]]:
    """``(name, in_channels, image_size)`` of a backbone made by :func:`create`.

    Raises CheckpointError naming the module otherwise: without them a backbone cannot be
    saved, rebuilt or matched to images.
    """
    name = getattr(model, "name", None)
    channels = getattr(model, "in_channels", None)
    size = getattr(model, "image_size", None)
    if name is None or channels is None or size is None:
        raise CheckpointError(
            f"cannot {action} the {type(model).__name__} backbone: it was not made by metafew.backbones.create "
            "(no registry name, in_channels or image_size); build it with create() or pass a checkpoint"
        )
    return str(name), int(channels), (int(size[0]), int(size[1]))
