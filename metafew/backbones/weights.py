"""Pretrained backbones that ship inside metafew, by name (declared next to their model).

A shipped entry is a small metafew backbone file in ``metafew/backbones/weights/`` with
its record (architecture, image format, normalisation, pretraining classes), plus the
exact command that reproduces it and one evaluation figure that a test re-measures::

    metafew.create_backbone("conv4", weights="caltech101")     # the entry "caltech101-conv4"
    metafew adapt --backbone caltech101-conv4 ...                # a name wherever a backbone file goes

>>> from metafew.backbones import list_weights
>>> all(name.endswith(("-conv4", "-resnet12")) for name in list_weights())
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import Registry

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ShippedWeights:
    """One shipped backbone: ``name`` is ``<weights>-<arch>`` (e.g. ``omniglot-conv4``).

    ``check`` is an evaluation the test suite repeats on the shipped file: ProtoNet
    without meta-training on ``episodes`` fixed episodes (``dataset``, ``subset``,
    ``n_way``, ``k_shot``, ``n_query``, ``seed``, optional ``options`` for the dataset)
    whose mean ``accuracy`` (a fraction) was recorded when the file was made.
    """

    name: str
    arch: str
    weights: str
    file: str
    description: str
    command: str
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    @property
    def available(self) -> bool:
        return self.path.is_file()


WEIGHTS: Registry[ShippedWeights] = Registry("pretrained backbone", group="metafew.weights")


def register_weights(entry: ShippedWeights) -> ShippedWeights:
    """Add a shipped backbone (next to its model's factory); duplicates are refused."""
    WEIGHTS.register(entry.name, entry)
    return entry


def list_weights() -> list[str]:
    """Names of the pretrained backbones that came with metafew (usable as ``--backbone NAME``)."""
    return [name for name, entry in WEIGHTS.items() if entry.available]


def shipped_path(name: str) -> Path | None:
    """The file of a shipped backbone called ``name``, or None when ``name`` is not one."""
    key = str(name).lower()
    if key in WEIGHTS and WEIGHTS.get(key).available:
        return WEIGHTS.get(key).path
    return None


def evaluate_check(entry: ShippedWeights, *, data_root: str | Path | None = None, device: str = "cpu") -> float:
    """Re-measure ``entry.check``: ProtoNet on the shipped backbone, mean accuracy over the fixed episodes."""
    from ..data import EpisodeSampler, load_dataset
    from ..engine.evaluate import evaluate
    from ..learners import create as create_learner
    from .registry import create

    c = entry.check
    data = load_dataset(c["dataset"], c["subset"], root=data_root, **c.get("options", {}))
    backbone = create(entry.arch, weights=entry.weights).to(device)
    sampler = EpisodeSampler(data, c["n_way"], c["k_shot"], c.get("n_query", 15), seed=c.get("seed", 0), device=device)
    result = evaluate(create_learner("protonet", backbone), sampler.fixed(c["episodes"]), progress=False)
    return result.accuracy_mean
