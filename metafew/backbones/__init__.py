"""Feature extractors shared by every learner, created by name; pretrained ones ship by name too."""

from ..registry import import_submodules
from . import conv4, resnet12, resnet18  # noqa: F401  (register "conv4", "resnet12", "resnet18/34/50")
from .registry import BACKBONES, available, create, register
from .weights import WEIGHTS, ShippedWeights, list_weights, register_weights, shipped_path

import_submodules(__name__, __path__)  # a new backbone is one file in this folder

__all__ = [
    "BACKBONES",
    "WEIGHTS",
    "ShippedWeights",
    "available",
    "create",
    "list_weights",
    "register",
    "register_weights",
    "shipped_path",
]
