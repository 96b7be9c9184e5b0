"""Learning curves: a run's ``log.jsonl`` rows as a PNG (loss, training and validation accuracy by step)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..paths import atomic_write


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_learning_curve(history: Sequence[dict[str, Any]] | str | Path, path: str | Path, title: str = "") -> Path:
    """Plot training loss (left) and training / validation accuracy (right) against the step.

    ``history``: the rows :func:`metafew.train` logs (or the path of its ``log.jsonl``).
    The PNG is written atomically, so a reader never sees half a file.
    """
    every = read_log(history) if isinstance(history, (str, Path)) else list(history)
    rows = [r for r in every if "loss" in r]  # training rows; event rows (a changed resume) are not plotted
    val = [(r["step"], 100 * r["val_acc"]) for r in every if r.get("val_acc") is not None]  # with the start's
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    try:
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], color="C0")
        ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
        ax_acc.plot(steps, [100 * r["acc"] for r in rows], color="C0", label="training episodes")
        if val:
            ax_acc.plot(*zip(*val), "o-", color="C3", label="validation episodes")
        ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
        ax_acc.legend(loc="lower right", fontsize="small")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        from .. import __version__

        meta = {"Software": f"metafew {__version__}"}
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata=meta))
    finally:
        plt.close(fig)
