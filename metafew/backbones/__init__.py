"""Feature extractors shared by every learner, created by name."""

from . import conv4, resnet12, resnet18  # noqa: F401  (register "conv4", "resnet12", "resnet18/34/50")
from .registry import available, create, register

__all__ = ["available", "create", "register"]
