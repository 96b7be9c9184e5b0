"""metafew: few-shot image classification by meta-learning."""

from .data import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet, FewShotDataset
from .errors import MetafewError

__version__ = "0.1.0"
__all__ = ["Episode", "EpisodeBatch", "EpisodeSampler", "EpisodeSet", "FewShotDataset", "MetafewError", "__version__"]
