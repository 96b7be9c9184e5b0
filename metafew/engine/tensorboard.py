"""TensorBoard logging of the rows a run already writes to its JSON-lines log.

``metafew train --tensorboard`` and ``metafew pretrain --tensorboard`` (the
``tensorboard`` field of :class:`~metafew.config.RunConfig` and
:class:`~metafew.config.PretrainConfig`, the ``tensorboard=`` argument of
:func:`metafew.train` and :func:`metafew.pretrain`) write every numeric value of each
log row as a scalar with the standard :class:`torch.utils.tensorboard.SummaryWriter`, at
the row's step (meta-training) or epoch (pretraining): the same numbers as the JSON-lines
log, nothing recomputed. Validation accuracy is also written as the bounds of its 95%
confidence interval, drawn as one band in TensorBoard's "custom scalars" tab.

Only rank 0 of a ``torchrun`` run writes. The event file is flushed and closed when the
run ends, fails or is interrupted (Ctrl-C). Each session passes the first step it will
log as ``purge_step``: TensorBoard then hides the folder's events from that step on that
an earlier session wrote (a crashed session's past its last checkpoint, or those of a
run since replaced), as rows past the checkpoint are dropped from the JSON-lines log. A
fresh run also removes the event files from its own default folder.

The ``tensorboard`` package is optional: ``pip install -e ".[tensorboard]"`` from a metafew
clone (metafew is not on PyPI yet), or ``pip install tensorboard``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

from .. import distributed
from ..errors import ConfigError, MissingDependencyError
from ..outputs import check_writable, writing

#: The name of the default TensorBoard folder inside a run folder (``metafew train``).
FOLDER = "tensorboard"
#: How the files SummaryWriter writes are named (``events.out.tfevents.<time>.<host>...``).
EVENT_PREFIX = "events.out.tfevents."
INSTALL_HINT = 'pip install -e ".[tensorboard]" from a metafew clone (or pip install tensorboard)'

# Log keys -> TensorBoard tags; a key not listed is written under its own name.
_TAGS = {
    "loss": "train/loss",
    "acc": "train/accuracy",
    "lr": "train/lr",
    "val_loss": "val/loss",
    "val_acc": "val/accuracy",
    "val_acc_ci95": "val/accuracy_ci95",
    "val_fewshot_acc": "val/fewshot_accuracy",
    "val_fewshot_ci95": "val/fewshot_accuracy_ci95",
}
# (mean, ci95) pairs also written as the band [mean - ci95, mean + ci95]
_BANDS = {"val_acc": "val_acc_ci95", "val_fewshot_acc": "val_fewshot_ci95"}


def require_tensorboard() -> None:
    """Raise a one-line MissingDependencyError unless ``torch.utils.tensorboard`` can be used.

    Called before any data is read, so a run asked to log to TensorBoard never trains
    for an hour and then fails.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorBoard logging needs the tensorboard package ({e}); {INSTALL_HINT}"
        ) from None


def tensorboard_folder(
    tensorboard: bool | str | os.PathLike[str] | None, default: Path | None, what: str = "out_dir"
) -> Path | None:
    """The folder ``tensorboard`` asks for: None (off), ``True`` (``default``) or a path.

    ``default`` is the run's own folder for the event files (None when the run writes
    nothing, in which case ``True`` is refused: it needs a folder to go to).
    """
    if tensorboard is None or tensorboard is False:
        return None
    if tensorboard is True:
        if default is None:
            raise ConfigError(
                f"tensorboard=True writes into the run's folder: pass {what}, or a folder as tensorboard="
            )
        return default
    if isinstance(tensorboard, (str, os.PathLike)) and str(tensorboard):
        return Path(tensorboard).expanduser()
    raise ConfigError(f"tensorboard must be true, false or a folder, got {tensorboard!r}")


def clear_events(folder: Path) -> None:
    """Remove the event files of an earlier run from ``folder`` (a fresh run in the same run folder)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(EVENT_PREFIX) and p.is_file() and not p.is_symlink():
            with writing(p):
                p.unlink()


class TensorBoardLog:
    """Writes log rows as TensorBoard scalars (one :class:`~torch.utils.tensorboard.SummaryWriter`).

    ``step_key`` names the row's x value (``"step"`` or ``"epoch"``); ``steps_per_row``
    (pretraining: the optimizer steps of an epoch) turns a row's ``seconds`` into
    ``time/seconds_per_step``. With ``cumulative_seconds`` (meta-training), ``seconds``
    is the run's elapsed time and the time per step is taken between consecutive rows.
    """

    def __init__(
        self,
        folder: Path,
        *,
        step_key: str,
        purge_step: int | None = None,
        steps_per_row: int | None = None,
        cumulative_seconds: bool = False,
    ) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        check_writable(folder)
        with writing(folder):
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step, flush_secs=30)
            self.writer.add_custom_scalars(
                {
                    "validation (95% CI)": {
                        "accuracy": ["Margin", ["val/accuracy", "val/accuracy_low", "val/accuracy_high"]],
                        "few-shot accuracy": [
                            "Margin",
                            ["val/fewshot_accuracy", "val/fewshot_accuracy_low", "val/fewshot_accuracy_high"],
                        ],
                    }
                }
            )
        self.folder = folder
        self.step_key = step_key
        self.steps_per_row = steps_per_row
        self.cumulative = cumulative_seconds
        self._last: tuple[int, float] | None = None  # (step, seconds) of the previous row

    def write(self, row: dict[str, Any]) -> None:
        """Every finite numeric value of ``row`` as a scalar at ``row[step_key]`` (event rows are skipped)."""
        step = row.get(self.step_key)
        if not isinstance(step, int) or not ("loss" in row or "val_acc" in row):
            return
        with writing(self.folder):
            for key, value in row.items():
                if key in (self.step_key, "seconds") or not _number(value):
                    continue
                tag = _TAGS.get(key, key)
                self.writer.add_scalar(tag, value, step)
                ci = row.get(_BANDS.get(key, ""))
                if _number(ci):
                    self.writer.add_scalar(tag + "_low", value - ci, step)
                    self.writer.add_scalar(tag + "_high", value + ci, step)
            seconds = row.get("seconds")
            if _number(seconds):
                self._write_time(step, float(seconds))

    def _write_time(self, step: int, seconds: float) -> None:
        if self.cumulative:
            self.writer.add_scalar("time/elapsed_seconds", seconds, step)
            if self._last is not None and step > self._last[0]:
                per = (seconds - self._last[1]) / (step - self._last[0])
                self.writer.add_scalar("time/seconds_per_step", per, step)
            self._last = (step, seconds)
        else:
            self.writer.add_scalar("time/epoch_seconds", seconds, step)
            if self.steps_per_row:
                self.writer.add_scalar("time/seconds_per_step", seconds / self.steps_per_row, step)

    def resume_from(self, rows: list[dict[str, Any]]) -> None:
        """Take the last logged row of a resumed run as the previous one (for the time per step)."""
        logged = [r for r in rows if isinstance(r.get(self.step_key), int) and _number(r.get("seconds"))]
        if logged:
            self._last = (int(logged[-1][self.step_key]), float(logged[-1]["seconds"]))

    def close(self) -> None:
        """Flush the events to disk and close the file."""
        with writing(self.folder):
            self.writer.close()


@contextlib.contextmanager
def tensorboard_log(
    folder: Path | None,
    *,
    step_key: str,
    purge_step: int | None = None,
    steps_per_row: int | None = None,
    cumulative_seconds: bool = False,
) -> Iterator[TensorBoardLog | None]:
    """A :class:`TensorBoardLog` into ``folder`` for the block, on rank 0 (None elsewhere, or without a folder).

    Closed (flushed) however the block ends: finished, failed or interrupted.
    """
    if folder is None or not distributed.is_main():
        yield None
        return
    log = TensorBoardLog(
        folder,
        step_key=step_key,
        purge_step=purge_step,
        steps_per_row=steps_per_row,
        cumulative_seconds=cumulative_seconds,
    )
    try:
        yield log
    finally:
        log.close()


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
