"""``metafew.load(path)``: open any file metafew writes, or say what the file is instead.

* a pretrained backbone (``metafew pretrain``, :func:`metafew.checkpoint.save_backbone`)
  -> the backbone ``nn.Module`` (eval mode);
* a trained run (``best``/``last.safetensors`` of ``metafew train`` or ``bench``) -> the
  learner, rebuilt from the :class:`~metafew.config.RunConfig` it records
  (``learner.run_config``);
* an adapted model (``metafew adapt``, :meth:`AdaptedModel.save`) -> the AdaptedModel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def load(path: str | os.PathLike[str], *, device: str | torch.device = "auto") -> Any:
    """Load a backbone, a trained learner or an adapted model from ``path``, whichever it holds.

    >>> import metafew, tempfile, os
    >>> from metafew.checkpoint import save_backbone
    >>> backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28)
    >>> path = save_backbone(backbone, os.path.join(tempfile.mkdtemp(), "conv4"), mean=[0.5], std=[0.5])
    >>> type(metafew.load(path, device="cpu")).__name__
    'Conv4'
    >>> metafew.load(os.devnull)
    Traceback (most recent call last):
    ...
    metafew.errors.CheckpointError: /dev/null is not a metafew file (an empty file)
    """
    from .backbones.weights import shipped_path
    from .checkpoint import load_backbone, read_header

    p = Path(path).expanduser()
    if not p.exists() and shipped_path(str(path)) is not None:  # a backbone that came with metafew, by name
        p = shipped_path(str(path))  # type: ignore[assignment]
    what = describe_file(p)
    if what is not None:
        raise CheckpointError(f"{p} is not a metafew file ({what})")
    _, doc = read_header(p)
    record = doc.get("record") or {}
    if record.get("model_format"):
        from .adaptation import load as load_adapted

        return load_adapted(p, device=device)
    if doc.get("kind") == "backbone":
        from .device import resolve_device

        backbone, _ = load_backbone(p, device=resolve_device(device))
        return backbone
    if record.get("config"):
        from .config import load_run

        config, learner, _ = load_run(p, device=device)
        learner.run_config = config
        return learner.eval()
    raise CheckpointError(f"{p} is a metafew checkpoint without a backbone, run configuration or model record")


def describe_file(p: Path) -> str | None:
    """What a file that is not a metafew safetensors file is (None when it may be one)."""
    if p.is_dir():
        return "a folder"
    if not p.exists():
        alt = p.with_name(p.name + ".safetensors")
        if alt.is_file():
            return None
        raise CheckpointError(f"file not found: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror}") from e
    if not head:
        return "an empty file"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:1] in (b"{", b"["):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "a text file"
        fmt = doc.get("format") if isinstance(doc, dict) else None
        return f"a JSON file{f' of format {fmt!r}' if fmt else ''}; metafew models are .safetensors files"
    if head.startswith(b"PK"):
        return "a zip archive (a torch.save file or a dataset archive?)"
    return None
