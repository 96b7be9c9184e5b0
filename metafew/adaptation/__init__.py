"""Adapting a pretrained backbone to a user's few labelled images, with an honest estimate.

``model = metafew.adapt("my_images/", "backbone.safetensors", method="protonet", shots=10)``
adapts, estimates how well the result classifies unseen images (``model.report``), and
gives a model that predicts (``model.predict(paths)``), evaluates on a labelled set
(``model.evaluate("pneumoniamnist")``) and saves to one file (``model.save(path)``,
``metafew.load(path)``).

Modules, each importing only those before it: :mod:`.preprocess`, :mod:`.metrics`,
:mod:`.outputs`, :mod:`.inputs` (backbone and data), :mod:`.estimate`, :mod:`.model`
(:class:`AdaptedModel`, :func:`load`), :mod:`.align` (:func:`align_backbone`: MMD, DANN or
AdaBN alignment to unlabeled images), :mod:`.select` (``backbone="auto"``: the nested choice of
backbone and method), :mod:`.core` (:func:`adapt`).
"""

from typing import Any

from . import core
from .align import ALIGN_METHODS, align_backbone
from .core import adapt, default_options, methods
from .estimate import AdaptationReport, AdaptationWarning, Summary, estimate
from .inputs import resolve_backbone, resolve_data
from .metrics import Metrics
from .model import MODEL_FORMAT_VERSION, AdaptedModel, Prediction, load
from .outputs import OutputError, check_output
from .preprocess import Preprocessing


def __getattr__(name: str) -> Any:
    """``METHODS`` / ``DEFAULT_OPTIONS``: read from the learner registry when asked for (see :mod:`.core`)."""
    if name in ("METHODS", "DEFAULT_OPTIONS"):
        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALIGN_METHODS",
    "DEFAULT_OPTIONS",
    "METHODS",
    "MODEL_FORMAT_VERSION",
    "AdaptationReport",
    "AdaptationWarning",
    "AdaptedModel",
    "Metrics",
    "OutputError",
    "Prediction",
    "Preprocessing",
    "Summary",
    "adapt",
    "align_backbone",
    "check_output",
    "default_options",
    "estimate",
    "load",
    "methods",
    "resolve_backbone",
    "resolve_data",
]
