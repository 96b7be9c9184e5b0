"""Datasets as in-memory uint8 tensors, and the episode sampler built on them.

Datasets are looked up by name in :data:`DATASETS` (``load_dataset("omniglot", "train")``);
each dataset module registers its own :class:`DatasetSpec`, and :func:`register_dataset`
adds one from anywhere. Image decoding lives in :mod:`metafew.data.decode`, the uint8 to
float normalisation in :mod:`metafew.data.normalize`.
"""

from .augment import FlipCrop
from .base import FewShotDataset
from .caltech101 import Caltech101
from .download import download_and_extract
from .episodes import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet
from .image_folder import ImageFolder
from .lake import lake_runs
from .medmnist import MedMNIST
from .normalize import Normalize
from .omniglot import Omniglot
from .registry import (
    DATASETS,
    DatasetSpec,
    available_datasets,
    dataset_info,
    download_dataset,
    load_dataset,
    register_dataset,
)

from ..registry import import_submodules

import_submodules(__name__, __path__)  # a new dataset is one file in this folder: it registers its own spec

__all__ = [
    "FewShotDataset",
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSet",
    "FlipCrop",
    "Normalize",
    "Omniglot",
    "lake_runs",
    "MedMNIST",
    "Caltech101",
    "ImageFolder",
    "DATASETS",
    "DatasetSpec",
    "register_dataset",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "download_dataset",
    "download_and_extract",
]
