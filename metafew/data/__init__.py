"""Datasets as in-memory uint8 tensors, and the episode sampler built on them."""

from .augment import FlipCrop
from .base import FewShotDataset
from .episodes import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet

__all__ = ["FewShotDataset", "Episode", "EpisodeBatch", "EpisodeSampler", "EpisodeSet", "FlipCrop"]
