"""metafew: few-shot image classification by meta-learning.

Everything starts from ``import metafew``::

    metafew.list_datasets(), metafew.list_backbones(), metafew.list_learners()
    data = metafew.load_dataset("omniglot", "train")
    learner = metafew.create_learner("protonet", metafew.create_backbone("conv4", in_channels=1, image_size=28))
    metafew.train(learner, metafew.EpisodeSampler(data, 5, 1), steps=500)
    model = metafew.load("run/best.safetensors")     # any file metafew writes

>>> import metafew
>>> "protonet" in metafew.list_learners() and "conv4" in metafew.list_backbones()
True
"""

from __future__ import annotations

from .adaptation import AdaptedModel, adapt
from .backbones import available as list_backbones
from .backbones import create as create_backbone
from .config import RunConfig, build, load_run, train_run
from .data import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet, FewShotDataset, load_dataset
from .data import available_datasets as _available_datasets
from .engine import evaluate, train
from .engine.pretrain import pretrain
from .errors import MetafewError
from .learners import MAML, FineTune, ProtoNet, Reptile
from .learners import available as list_learners
from .learners import create as create_learner
from .loading import load

__version__ = "0.1.0"


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (plus ``folder:PATH`` for your own ``PATH/<class>/<image>`` tree).

    >>> import metafew
    >>> "omniglot" in metafew.list_datasets()
    True
    """
    return sorted(_available_datasets())


__all__ = [
    "MAML",
    "AdaptedModel",
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSet",
    "FewShotDataset",
    "FineTune",
    "MetafewError",
    "ProtoNet",
    "Reptile",
    "RunConfig",
    "__version__",
    "adapt",
    "build",
    "create_backbone",
    "create_learner",
    "evaluate",
    "list_backbones",
    "list_datasets",
    "list_learners",
    "load",
    "load_dataset",
    "load_run",
    "pretrain",
    "train",
    "train_run",
]
