"""What produced a suite's pretrained backbone, so a cached one is reused only while that holds.

A ``[pretrain]`` backbone is cached in the work dir as
``pretrain-<arch>-<dataset>-<recipe key>-<provenance key>.safetensors``: the recipe key
(:meth:`metafew.config.PretrainConfig.key`: the recipe, metafew's and torch's versions)
and the provenance key (:func:`pretrain_provenance`: the code of the modules that compute
the weights and a fingerprint of the training data). A change to any of them gives a new
file name, so the backbone is pretrained again and the rows that start from it (whose run
folders are keyed by the backbone's path) are trained again too. Next to the file,
``<name>.provenance.json`` records the details, which the runner uses to say what changed.

Files cached before provenance was recorded (``pretrain-<arch>-<dataset>-<recipe
key>.safetensors``, no provenance suffix) are still reused when their recipe key matches:
on first use their provenance is recorded as the current one (``"adopted": true``), so a
later change of code or data re-pretrains them like any other.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from ..cache_keys import _hash, code_checksum, dataset_fingerprint, library_versions
from ..config import PretrainConfig

FORMAT = 1

#: the modules every pretraining runs through (the backbone's and the dataset's own modules are added)
PRETRAIN_MODULES = (
    "metafew.engine.pretrain",
    "metafew.data.base",
    "metafew.data.decode",
    "metafew.data.normalize",
)


def pretrain_modules(recipe: PretrainConfig) -> list[str]:
    """Import names of the modules whose code decides the weights ``recipe`` gives."""
    from ..backbones.registry import BACKBONES
    from ..data.registry import _lookup

    mods = list(PRETRAIN_MODULES)
    mods.append(BACKBONES.get(recipe.backbone).__module__)
    load = _lookup(recipe.dataset)[0].load
    while isinstance(load, functools.partial):  # several names share one loader through a partial
        load = load.func
    mods.append(getattr(load, "__module__", None) or "metafew.data.registry")
    if recipe.augment:
        mods.append("metafew.data.augment")
    return sorted({m for m in mods if m.startswith("metafew.")})  # a plugin's own module is not hashed


def pretrain_provenance(recipe: PretrainConfig, data_root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What decides the weights of ``recipe`` besides the recipe itself: code, data, library versions.

    The data fingerprint lists the dataset's files with their sizes (not their times: a copy
    of the same data elsewhere keeps it), or is the md5 of its single file when known; it is
    None when the dataset is not found (pretraining then fails on its own).
    """
    return {
        "format": FORMAT,
        "recipe_key": recipe.key(),
        "versions": library_versions(),
        "code": code_checksum(pretrain_modules(recipe)),
        "data": dataset_fingerprint(recipe.dataset, data_root, mtimes=False),
    }


def provenance_key(provenance: dict[str, Any]) -> str:
    """An 8-hex key of a provenance record (the ``adopted`` flag does not count)."""
    return _hash({k: v for k, v in provenance.items() if k != "adopted"}, 8)


def sidecar(path: Path) -> Path:
    """The provenance record next to a cached backbone ``path``."""
    return path.with_name(path.stem + ".provenance.json")


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance recorded next to ``path``, or None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_provenance(path: Path, provenance: dict[str, Any]) -> None:
    """Record ``provenance`` next to ``path`` (atomically)."""
    from ..paths import atomic_write

    text = json.dumps(provenance, indent=1, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(sidecar(path), write)


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two provenance records, in words (``["metafew.engine.pretrain code", "data"]``)."""
    out: list[str] = []
    for name in sorted(set(old.get("versions", {})) | set(new.get("versions", {}))):
        a, b = old.get("versions", {}).get(name), new.get("versions", {}).get(name)
        if a != b:
            out.append(f"{name} {a} -> {b}")
    for mod in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(mod) != new.get("code", {}).get(mod):
            out.append(f"{mod} code")
    if old.get("data") != new.get("data"):
        out.append("training data")
    if not out and old.get("format") != new.get("format"):
        out.append("provenance format")
    return out
