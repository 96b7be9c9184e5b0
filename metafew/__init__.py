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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (see __getattr__)
    from . import distributed
    from .adaptation import AdaptedModel, adapt
    from .backbones import available as list_backbones
    from .backbones import create as create_backbone
    from .config import RunConfig, build, load_run, train_run
    from .data import Episode, EpisodeBatch, EpisodeSampler, EpisodeSet, FewShotDataset, load_dataset
    from .engine.evaluate import evaluate
    from .engine.pretrain import pretrain
    from .engine.train import train
    from .errors import MetafewError
    from .learners import MAML, FineTune, ProtoNet, Reptile
    from .learners import available as list_learners
    from .learners import create as create_learner
    from .loading import load

# name -> (module, attribute): imported when first used, so that `import metafew` (and the
# `metafew` command's start-up, which a Ctrl-C may interrupt) costs nothing until then.
_LAZY: dict[str, tuple[str, str]] = {
    "AdaptedModel": (".adaptation", "AdaptedModel"),
    "adapt": (".adaptation", "adapt"),
    "list_backbones": (".backbones", "available"),
    "create_backbone": (".backbones", "create"),
    "RunConfig": (".config", "RunConfig"),
    "build": (".config", "build"),
    "load_run": (".config", "load_run"),
    "train_run": (".config", "train_run"),
    "Episode": (".data", "Episode"),
    "EpisodeBatch": (".data", "EpisodeBatch"),
    "EpisodeSampler": (".data", "EpisodeSampler"),
    "EpisodeSet": (".data", "EpisodeSet"),
    "FewShotDataset": (".data", "FewShotDataset"),
    "load_dataset": (".data", "load_dataset"),
    "evaluate": (".engine", "evaluate"),
    "train": (".engine", "train"),
    "pretrain": (".engine.pretrain", "pretrain"),
    "MetafewError": (".errors", "MetafewError"),
    "MAML": (".learners", "MAML"),
    "FineTune": (".learners", "FineTune"),
    "ProtoNet": (".learners", "ProtoNet"),
    "Reptile": (".learners", "Reptile"),
    "list_learners": (".learners", "available"),
    "create_learner": (".learners", "create"),
    "load": (".loading", "load"),
}
_SUBPACKAGES = (
    "adaptation", "backbones", "bench", "cache_keys", "checkpoint", "cli", "config", "data", "device",
    "distributed", "engine", "errors", "interop", "learners", "loading", "outputs", "paths", "progress",
    "registry", "seeding",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    """``metafew.X``: the public API and the subpackages, imported on first use (PEP 562)."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'metafew' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})


__version__ = "0.1.0"


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (plus ``folder:PATH`` for your own ``PATH/<class>/<image>`` tree).

    >>> import metafew
    >>> "omniglot" in metafew.list_datasets()
    True
    """
    from .data import available_datasets

    return sorted(available_datasets())


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
    "distributed",
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
