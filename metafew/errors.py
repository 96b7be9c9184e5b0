"""Errors metafew raises on bad input.

Every error is a :class:`MetafewError` whose message is one self-contained line
naming the thing at fault, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class MetafewError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class DatasetNotFoundError(MetafewError, FileNotFoundError):
    """A dataset is not under the data root and could not be downloaded."""


class DatasetError(MetafewError, ValueError):
    """A dataset is present but unusable (empty folder, corrupt file, bad checksum...)."""


class EpisodeError(MetafewError, ValueError):
    """An episode cannot be built (N larger than the number of classes, too few images...)."""


class CheckpointError(MetafewError, ValueError):
    """A checkpoint or model file does not match what it is loaded into."""


class InputShapeError(MetafewError, ValueError):
    """Images fed to a backbone do not have the channels or size it was built for."""


class MissingDependencyError(MetafewError, ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


class ConfigError(MetafewError, ValueError):
    """A TOML config or CLI option is invalid."""


class TrainingDiverged(MetafewError, ArithmeticError):
    """The loss or the weights of a run became NaN or infinite."""
