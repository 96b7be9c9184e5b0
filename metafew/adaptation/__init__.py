"""Adapting a pretrained backbone to a user's few labelled images, with an honest estimate.

``model = metafew.adapt("my_images/", "backbone.safetensors", method="protonet", shots=10)``
adapts, estimates how well the result classifies unseen images (``model.report``), and
gives a model that predicts (``model.predict(paths)``), evaluates on a labelled set
(``model.evaluate("pneumoniamnist")``) and saves to one file (``model.save(path)``,
``metafew.load(path)``).
"""

from .core import DEFAULT_OPTIONS, METHODS, adapt, resolve_backbone, resolve_data
from .estimate import AdaptationReport, AdaptationWarning, Summary, estimate
from .metrics import Metrics
from .model import MODEL_FORMAT_VERSION, AdaptedModel, Prediction, load
from .outputs import OutputError, check_output
from .preprocess import Preprocessing

__all__ = [
    "AdaptationReport",
    "AdaptationWarning",
    "AdaptedModel",
    "DEFAULT_OPTIONS",
    "METHODS",
    "MODEL_FORMAT_VERSION",
    "Metrics",
    "OutputError",
    "Prediction",
    "Preprocessing",
    "Summary",
    "adapt",
    "check_output",
    "estimate",
    "load",
    "resolve_backbone",
    "resolve_data",
]
