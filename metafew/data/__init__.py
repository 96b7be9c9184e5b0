"""Datasets as in-memory uint8 tensors, and the episode sampler built on them.

Datasets are looked up by name in :data:`DATASETS` (``load_dataset("omniglot", "train")``);
each dataset module registers its own :class:`DatasetSpec`, and :func:`register_dataset`
adds one from anywhere. Image decoding lives in :mod:`metafew.data.decode`, the uint8 to
float normalisation in :mod:`metafew.data.normalize`.
"""

from ..registry import import_submodules
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
from .torch_dataset import from_torch_dataset

import_submodules(__name__, __path__)  # a new dataset is one file in this folder: it registers its own spec

__all__ = [
    "DATASETS",
    "Caltech101",
    "DatasetSpec",
    "Episode",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodeSet",
    "FewShotDataset",
    "FlipCrop",
    "ImageFolder",
    "MedMNIST",
    "Normalize",
    "Omniglot",
    "available_datasets",
    "dataset_info",
    "download_and_extract",
    "download_dataset",
    "from_torch_dataset",
    "lake_runs",
    "load_dataset",
    "register_dataset",
]
