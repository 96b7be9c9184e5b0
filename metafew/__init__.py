"""metafew: few-shot image classification by meta-learning."""

from .data import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet, FewShotDataset
from .errors import MetafewError
from .adaptation import AdaptedModel, adapt, load
from .learners import MAML, FineTune, ProtoNet, Reptile
from .engine.pretrain import pretrain
from .engine import evaluate, train

__version__ = "0.1.0"
__all__ = ["Episode", "EpisodeBatch", "EpisodeSampler", "EpisodeSet", "FewShotDataset", "MetafewError", "__version__", "pretrain", "train", "evaluate", "ProtoNet", "MAML", "Reptile", "FineTune", "adapt", "load", "AdaptedModel"]
