"""Feature extractors shared by every learner, created by name."""

from . import conv4  # noqa: F401  (registers "conv4")
from .registry import available, create, register

__all__ = ["available", "create", "register"]
