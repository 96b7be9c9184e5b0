"""Datasets as in-memory uint8 tensors, and the episode sampler built on them."""

from .augment import FlipCrop
from .base import FewShotDataset
from .caltech101 import Caltech101
from .download import download_and_extract
from .episodes import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet
from .image_folder import ImageFolder
from .lake import lake_runs
from .medmnist import MedMNIST
from .omniglot import Omniglot
from .registry import DatasetSpec, available_datasets, dataset_info, download_dataset, load_dataset

__all__ = [
    "FewShotDataset",
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSet",
    "FlipCrop",
    "Omniglot",
    "lake_runs",
    "MedMNIST",
    "Caltech101",
    "ImageFolder",
    "DatasetSpec",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "download_dataset",
    "download_and_extract",
]
