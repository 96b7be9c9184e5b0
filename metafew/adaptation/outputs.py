"""Writing results without ever clobbering the user's files (see :mod:`metafew.outputs`).

Every file metafew writes for an adapted model (the model, its JSON report, the
confusion-matrix PNG, prediction CSV/JSON) may replace an existing file only if that
file is recognisably an earlier output of the same kind; anything else (an image, a
spreadsheet, a backbone checkpoint, a folder) is refused with a one-line error and
left untouched. Writes are atomic: a temp file in the same folder, then ``os.replace``.
The mechanism is :func:`metafew.outputs.guard_output`; the CLI also asks for ``--overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ..outputs import (
    MODEL_FORMAT,
    PREDICTIONS_FORMAT,
    REPORT_FORMAT,
    OutputError,
    guard_output,
    is_model_file,
    write_text,
)

Kind = Literal["model", "report", "png", "predictions"]

__all__ = [
    "MODEL_FORMAT",
    "PREDICTIONS_FORMAT",
    "REPORT_FORMAT",
    "Kind",
    "OutputError",
    "check_output",
    "is_model_file",
    "write_text",
]


def check_output(
    path: str | os.PathLike[str], kind: Kind, *, protect: Path | None = None, overwrite: bool = True
) -> Path:
    """Raise OutputError unless ``path`` is free, or an earlier metafew output of this ``kind``.

    ``protect``: a folder (the user's image data) that nothing may be written into.
    ``overwrite=False`` also refuses an earlier metafew output (the CLI without ``--overwrite``).
    """
    return guard_output(path, kind, overwrite=overwrite, protect=protect)
