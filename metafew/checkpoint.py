"""Checkpoints: one ``.safetensors`` file holding the tensors and a JSON record.

File format (version 1). A metafew checkpoint is a single safetensors file (a
directory is never used: one file is easy to copy, share and hash). Its header
metadata has one key, ``"metafew"``, whose value is a JSON object::

    {"format": "metafew", "format_version": 1, "kind": "backbone" | "state",
     "record": {...},            # what the weights are (see below)
     "structure": {...} | null}  # only for nested states, see save_state

Nothing else is needed to rebuild the model: for ``kind == "backbone"`` the record
holds the architecture name, its options, ``in_channels``, ``image_size``, the
normalisation mean/std the backbone was trained with, the dataset name and class
names it was pretrained on and the metafew version (see :class:`BackboneRecord`),
and the tensors are the backbone's ``state_dict()`` under its own names. Any
safetensors reader sees the weights; ``safe_open(path, "pt").metadata()["metafew"]``
shows the record.

Files are written atomically (a temp file in the same folder, fsync, ``os.replace``),
so an interrupted save never leaves a truncated checkpoint behind. A path without a
suffix gets ``.safetensors`` appended, on save and on load.

* :func:`save_backbone` / :func:`load_backbone`: a registry backbone plus its record,
  checked on load (architecture, channels, image size, every tensor name and shape).
* :func:`save_state` / :func:`load_state`: any module or (nested) state dict, e.g. a
  learner with its optimizer, scheduler and RNG states, plus a free-form JSON record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbones.registry import describe
from .errors import CheckpointError
from .outputs import OutputError, _safetensors_doc, check_writable, writing
from .paths import atomic_write

FORMAT = "metafew"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_META_KEY = "metafew"


@dataclass
class BackboneRecord:
    """What a backbone checkpoint holds, beside its weights."""

    arch: str
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    out_features: int | None = None
    dataset: str | None = None
    classes: list[str] | None = None
    metafew_version: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneRecord:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}  # unknown keys: newer minor additions, ignored
        kw["image_size"] = tuple(int(s) for s in kw["image_size"])
        kw["mean"] = tuple(float(m) for m in kw["mean"])
        kw["std"] = tuple(float(s) for s in kw["std"])
        kw["in_channels"] = int(kw["in_channels"])
        return cls(**kw)


# -- paths and atomic writes ------------------------------------------------------


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``.safetensors`` appended when it has no suffix."""
    p = Path(path).expanduser()
    return p if p.suffix else p.with_name(p.name + SUFFIX)


def _existing_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    from .backbones.weights import shipped_path

    shipped = shipped_path(str(path))  # a pretrained backbone that came with metafew, by name
    if shipped is not None:
        return shipped
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; a metafew checkpoint is a single {SUFFIX} file")
    alt = checkpoint_path(p)
    if alt.is_file():
        return alt
    raise CheckpointError(f"checkpoint not found: {p}")


def _version() -> str:
    from . import __version__  # late import: metafew/__init__ imports the engine, which imports this module

    return __version__


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _write(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Write tensors + metadata to ``path`` atomically."""
    from safetensors.torch import save_file

    try:
        meta = json.dumps(doc, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {path}: record is not JSON serialisable ({e})") from e
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(
            f"refusing to save {path}: tensor {bad!r} holds NaN or infinite values (the weights diverged; "
            "lower the learning rate or clip the gradients)"
        )
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name, e.g. {path / ('model' + SUFFIX)}")
    if path.exists() or path.is_symlink():
        old = _safetensors_doc(path)
        if path.is_symlink() or old is None:
            raise OutputError(
                f"refusing to overwrite {path}: it exists and is not a metafew checkpoint (choose another path or remove it)"
            )
        if old.get("kind") != doc.get("kind"):
            raise OutputError(
                f"refusing to overwrite {path}: it is a metafew {old.get('kind')} checkpoint, not a {doc.get('kind')} one"
            )
    seen: set[tuple[int, int]] = set()
    clean: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:  # safetensors refuses shared storage: copy tied tensors
            t = t.clone()
        seen.add(key)
        clean[k] = t
    check_writable(path.parent if str(path.parent) else Path("."), for_=path)

    def write(tmp: str) -> None:
        try:
            save_file(clean, tmp, metadata={_META_KEY: meta})
        except OSError:
            raise
        except Exception as e:  # safetensors reports a full disk as SafetensorError
            text = str(e)
            code = 28 if "No space" in text or "os error 28" in text else 5
            raise OSError(code, text.splitlines()[0] if text else type(e).__name__) from e

    with writing(path):
        return atomic_write(path, write, fsync=True)


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None (one host sync)."""
    names = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return None
    flags = torch.stack([torch.isfinite(tensors[k]).all().to("cpu") for k in names])
    if bool(flags.all()):
        return None
    return names[int((~flags).nonzero()[0, 0])]


def _read(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, tensors: bool = True
) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """Read a metafew checkpoint: (resolved path, metadata document, tensors). Checks format and version.

    ``tensors=False`` reads the header only (the tensors come back empty).
    """
    from safetensors import safe_open

    p = _existing_path(path)
    try:
        with safe_open(str(p), framework="pt", device=str(torch.device(device))) as f:
            meta = f.metadata() or {}
            raw = meta.get(_META_KEY)
            if raw is None:
                raise CheckpointError(f"{p} is not a metafew checkpoint (a safetensors file without a metafew record)")
            body = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except CheckpointError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{p} is not a metafew checkpoint (not a readable safetensors file: {msg})") from e
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not a metafew checkpoint (its metafew record is not JSON)") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a metafew checkpoint")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            hint = "a newer metafew wrote it; upgrade metafew"
        elif isinstance(version, int) and not isinstance(version, bool):
            hint = "an older metafew wrote it; re-save it with that version"
        else:
            hint = "not a version number: the file is damaged or was not written by metafew"
        raise CheckpointError(
            f"{p} has checkpoint format version {version!r}, this metafew reads version {FORMAT_VERSION} ({hint})"
        )
    bad = first_non_finite(body)
    if bad is not None:
        raise CheckpointError(
            f"{p}: tensor {bad!r} holds NaN or infinite values (the run that wrote it diverged); "
            "retrain with a lower learning rate"
        )
    return p, doc, body


def read_header(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(path, metadata document)`` of a metafew checkpoint, without reading its tensors."""
    p, doc, _ = _read(path, tensors=False)
    return p, doc


# -- backbones --------------------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / ``DataParallel`` wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def save_backbone(
    backbone: nn.Module,
    path: str | os.PathLike[str],
    *,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    dataset: str | None = None,
    classes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Save a backbone made by :func:`metafew.backbones.create` with its record; returns the file written.

    ``mean``/``std`` are the normalisation the backbone was trained with (inputs must
    be normalised the same way at test time). ``options`` overrides the architecture
    options recorded by the backbone itself (``backbone.options``), for backbones that
    do not record them.
    """
    model = _unwrap(backbone)
    arch, in_channels, image_size = describe(model, "save")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise CheckpointError(
            f"cannot save {arch}: {len(mean)} mean / {len(std)} std values for a {in_channels}-channel backbone"
        )
    record = BackboneRecord(
        arch=str(arch),
        in_channels=int(in_channels),
        image_size=(int(image_size[0]), int(image_size[1])),
        mean=mean,
        std=std,
        options=dict(options if options is not None else getattr(model, "options", None) or {}),
        out_features=getattr(model, "out_features", None),
        dataset=dataset,
        classes=list(classes) if classes is not None else None,
        metafew_version=_version(),
        extra=dict(extra or {}),
    )
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "backbone",
        "record": record.to_dict(),
        "structure": None,
    }
    return _write(checkpoint_path(path), dict(model.state_dict()), doc)


def read_backbone_record(path: str | os.PathLike[str]) -> BackboneRecord:
    """The record of a backbone checkpoint, without building the model or reading its weights."""
    p, doc = read_header(path)
    return _backbone_record(p, doc)


def _backbone_record(p: Path, doc: dict) -> BackboneRecord:
    if doc.get("kind") != "backbone":
        raise CheckpointError(f"{p} is a metafew {doc.get('kind')!r} checkpoint, not a backbone checkpoint")
    try:
        return BackboneRecord.from_dict(doc["record"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p} has an incomplete backbone record ({type(e).__name__}: {e})") from e


def load_backbone(
    path: str | os.PathLike[str],
    *,
    in_channels: int | None = None,
    image_size: tuple[int, int] | int | None = None,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, BackboneRecord]:
    """Rebuild a backbone saved by :func:`save_backbone` and load its weights (returned in eval mode).

    ``in_channels``, ``image_size`` and ``arch``, when given, must match the record:
    a backbone is only reused on the kind of images it was trained on. ``options``
    override the recorded builder options (e.g. ``channels_last=False``); one that changes
    the weights' shapes fails the tensor check. Every tensor name and shape is checked;
    errors are :class:`CheckpointError` with one line.
    """
    from .backbones import available, create

    p, doc, tensors = _read(path, device)
    rec = _backbone_record(p, doc)
    if arch is not None and arch != rec.arch:
        raise CheckpointError(f"{p} holds a {rec.arch} backbone, not {arch}")
    if in_channels is not None and int(in_channels) != rec.in_channels:
        raise CheckpointError(
            f"{p} holds a backbone for {rec.in_channels}-channel images, the data has {in_channels} channels"
        )
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(int(s) for s in size) != rec.image_size:
            h, w = rec.image_size
            raise CheckpointError(
                f"{p} holds a backbone trained on {h}x{w} images, the data is {size[0]}x{size[1]} (resize it to {h}x{w})"
            )
    if rec.arch not in available():
        raise CheckpointError(f"{p} holds an unknown architecture {rec.arch!r}; available: {', '.join(available())}")
    built = {**rec.options, **(options or {})}
    try:
        model = create(rec.arch, in_channels=rec.in_channels, image_size=rec.image_size, **built)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot rebuild {rec.arch} with options {built} ({e})") from e
    check_state_dict(model, tensors, str(p))
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), rec


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing{more}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r}{more}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the model needs {tuple(v.shape)}"
            )


# -- generic states (learners, training runs) ------------------------------------

_TENSOR, _NDARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = {_TENSOR, _NDARRAY, _TUPLE, _DICT}


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; tensors (and numpy arrays) go into ``tensors`` under unique keys."""

    def key() -> str:
        k, n = path or "_", 1
        while k in tensors:
            k, n = f"{path}~{n}", n + 1
        return k

    if isinstance(obj, torch.Tensor):
        k = key()
        tensors[k] = obj
        return {_TENSOR: k}
    if isinstance(obj, np.ndarray):
        k = key()
        tensors[k] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_NDARRAY: k}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not (_MARKERS & set(obj)):
            return {k: _flatten(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        return {
            _DICT: [
                [_flatten(k, f"{path}/#k{i}", tensors), _flatten(v, f"{path}/{k}" if path else str(k), tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise CheckpointError(f"cannot save {type(obj).__name__} at {path or 'top level'!r}: not a tensor or plain value")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((k, v),) = obj.items()
            if k == _TENSOR:
                return tensors[v]
            if k == _NDARRAY:
                return tensors[v].numpy()
            if k == _TUPLE:
                return tuple(_unflatten(x, tensors) for x in v)
            if k == _DICT:
                return {_hashable(_unflatten(a, tensors)): _unflatten(b, tensors) for a, b in v}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def save_state(
    state: nn.Module | Mapping[str, Any], path: str | os.PathLike[str], record: dict[str, Any] | None = None
) -> Path:
    """Save a module's ``state_dict()``, or any nested state, with a JSON ``record``; returns the file written.

    ``state`` may nest dicts (any hashable plain keys, e.g. an optimizer's integer
    parameter ids), lists and tuples of tensors, numpy arrays and plain values
    (None, bool, int, float, str): e.g. ``{"model": m.state_dict(), "optimizer":
    opt.state_dict(), "rng": gen.get_state(), "step": 1200}``. Tensors are stored
    in the safetensors body; everything else in the header. :func:`load_state`
    returns the same structure.
    """
    if isinstance(state, nn.Module):
        state = _unwrap(state).state_dict()
    tensors: dict[str, torch.Tensor] = {}
    flat = isinstance(state, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )
    if flat:
        tensors = dict(state)  # a plain state_dict: tensors under their own names, no structure needed
        structure = None
    else:
        structure = _flatten(state, "", tensors)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "state",
        "record": {**(record or {}), "metafew_version": _version()},
        "structure": structure,
    }
    return _write(checkpoint_path(path), tensors, doc)


def load_state(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Read a file written by :func:`save_state` (or :func:`save_backbone`): ``(state, record)``."""
    _, doc, tensors = _read(path, device)
    structure = doc.get("structure")
    state = tensors if structure is None else _unflatten(structure, tensors)
    return state, dict(doc.get("record") or {})
