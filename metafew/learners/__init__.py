"""Few-shot learners on one shared backbone, created by name.

``create("protonet", backbone)``, ``create("maml", backbone, n_way=5)``,
``create("fomaml", backbone, n_way=5)`` (MAML with ``first_order=True``),
``create("reptile", backbone, n_way=5)``, ``create("finetune", backbone)``.
Every learner keeps the backbone object it is given, so one pretrained backbone
can be shared by all of them.
"""

from __future__ import annotations

from ..registry import import_submodules
from .base import Classifier, Learner
from .finetune import FineTune
from .maml import MAML
from .protonet import ProtoNet
from .registry import LEARNERS, accepts, available, create, register_learner
from .reptile import Reptile

import_submodules(__name__, __path__)  # a new learner is one file in this folder: its decorator registers it

__all__ = [
    "LEARNERS",
    "MAML",
    "Classifier",
    "FineTune",
    "Learner",
    "ProtoNet",
    "Reptile",
    "accepts",
    "available",
    "create",
    "register_learner",
]
