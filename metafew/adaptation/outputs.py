"""Writing results without ever clobbering the user's files.

Every file metafew writes for an adapted model (the model, its JSON report, the
confusion-matrix PNG, prediction CSV/JSON) may replace an existing file only if that
file is recognisably an earlier output of the same kind; anything else (an image, a
spreadsheet, a backbone checkpoint, a folder) is refused with a one-line error and
left untouched. Writes are atomic: a temp file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..errors import MetafewError
from ..paths import atomic_write

Kind = Literal["model", "report", "png", "predictions"]

MODEL_FORMAT = "metafew-adapted-model"
REPORT_FORMAT = "metafew-adaptation-report"
PREDICTIONS_FORMAT = "metafew-predictions"


class OutputError(MetafewError, FileExistsError):
    """An output path is taken by something metafew did not write, or is unusable."""


def is_model_file(path: Path) -> bool:
    """True when ``path`` is a safetensors file written by :meth:`AdaptedModel.save` (any format version)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("metafew")
        record = json.loads(raw or "{}").get("record") or {}
        return record.get("model_format") == MODEL_FORMAT
    except Exception:
        return False


def _is_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == REPORT_FORMAT
    except Exception:
        return False


def _is_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.format == "PNG" and str(img.info.get("Software", "")).startswith("metafew")
    except Exception:
        return False


def _is_predictions(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
        if head.lstrip().startswith("{"):
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("format") == PREDICTIONS_FORMAT
        first = next(csv.reader(io.StringIO(head)), [])
        return len(first) >= 3 and first[:2] == ["path", "class"] and all(c.startswith("p_") for c in first[2:])
    except Exception:
        return False


_CHECKS: dict[str, tuple[Callable[[Path], bool], str]] = {
    "model": (is_model_file, "a metafew model file"),
    "report": (_is_report, "a metafew adaptation report"),
    "png": (_is_png, "a metafew plot"),
    "predictions": (_is_predictions, "a metafew predictions file"),
}


def check_output(path: str | os.PathLike[str], kind: Kind, *, protect: Path | None = None) -> Path:
    """Raise OutputError unless ``path`` is free, or an earlier metafew output of this ``kind``.

    ``protect``: a folder (the user's image data) that nothing may be written into.
    """
    p = Path(path).expanduser()
    if protect is not None:
        try:
            p.resolve().relative_to(protect.resolve())
        except ValueError:
            pass
        else:
            raise OutputError(f"refusing to write {p} inside the image folder {protect}; choose a path outside it")
    if p.is_dir():
        raise OutputError(
            f"{p} is a folder; give a file name, e.g. {p / ('model.safetensors' if kind == 'model' else 'out')}"
        )
    if p.exists() or p.is_symlink():
        ok, what = _CHECKS[kind]
        if not ok(p):
            raise OutputError(
                f"refusing to overwrite {p}: it exists and is not {what} (choose another path or remove it)"
            )
    if p.parent != Path("") and not p.parent.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder {p.parent} for {p.name}: {e.strerror}") from e
    return p


def write_text(path: Path, text: str) -> Path:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, w)
