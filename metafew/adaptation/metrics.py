"""Classification metrics of an adapted model: accuracy, macro AUC, recall, confusion, intervals.

Plain torch/numpy, no scikit-learn: AUC is the Mann-Whitney statistic (ties count
one half), the same number ``sklearn.metrics.roc_auc_score`` gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.evaluate import macro_auc as _engine_macro_auc
from ..engine.evaluate import mean_ci95 as _engine_mean_ci95


def macro_auc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int) -> float | None:
    """Macro one-vs-rest ROC AUC (binary: the usual AUC), None when no class has both positives and negatives.

    Pass log-probabilities or logits rather than probabilities: a softmax saturated to
    exactly 0 or 1 turns distinct scores into ties and lowers the AUC.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    if len(y) == 0:
        return None
    value = float(_engine_macro_auc(s, y, num_classes))
    return None if math.isnan(value) else value


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def recall_per_class(confusion: np.ndarray) -> list[float | None]:
    """Recall (sensitivity) of each true class; None for a class never seen."""
    totals = confusion.sum(1)
    return [float(confusion[c, c] / totals[c]) if totals[c] else None for c in range(len(totals))]


def mean_ci95(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (as :func:`metafew.engine.evaluate.mean_ci95`), NaN if empty."""
    v = torch.tensor([x for x in values if x is not None and not math.isnan(x)], dtype=torch.float64)
    if v.numel() == 0:
        return float("nan"), float("nan")
    return _engine_mean_ci95(v)


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return float("nan"), float("nan")
    z = 1.96
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_auc_interval(
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    resamples: int = 500,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile 95% bootstrap interval of the macro AUC (resampling images), or None."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    values = []
    for start in range(0, resamples, 100):  # 100 resamples per vectorised call
        idx = torch.randint(0, len(y), (min(100, resamples - start), len(y)), generator=gen)
        values.append(_engine_macro_auc(s[idx], y[idx], num_classes))
    v = torch.cat(values)
    v = v[~v.isnan()]
    if v.numel() < resamples // 2:
        return None
    lo, hi = np.percentile(v.numpy(), [2.5, 97.5])
    return float(lo), float(hi)


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_interval(
    correct: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of per-image scores (e.g. 1/0 correct), or None if empty.

    The images are resampled with replacement ``resamples`` times: the interval is the
    sampling error of this one test set (how much the figure would move on another
    test set of the same size from the same population), not the model's variation.
    """
    v = torch.as_tensor(np.asarray(correct, dtype=np.float64))
    if v.numel() == 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    means = torch.cat(
        [
            v[torch.randint(0, len(v), (min(200, resamples - s), len(v)), generator=gen)].mean(1)
            for s in range(0, resamples, 200)
        ]
    )
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means.numpy(), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_draws_interval(
    draws: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_images: int,
    num_classes: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Test-set bootstrap intervals of the accuracy and balanced accuracy averaged over support draws.

    ``draws``: per draw, ``(image indices, true labels, 1/0 correct)`` of the images it
    scored, indices into a test set of ``num_images`` images (the labelled pool, or a
    separate test set). Each replicate resamples the ``num_images`` images with
    replacement (an image drawn twice counts twice in every draw that scored it) and
    recomputes the mean over draws; the interval is the 2.5-97.5th percentile of the
    replicates. It adds what the draw interval leaves out: the sampling error of the
    one set of images everything was scored on.
    """
    out: dict[str, tuple[float, float] | None] = {"accuracy": None, "balanced_accuracy": None}
    draws = [d for d in draws if len(d[0])]
    if not draws or num_images == 0:
        return out
    # only the images some draw scored enter the sums: index them 0..U-1 (U: a dummy for all others)
    used = np.unique(np.concatenate([np.asarray(d[0], dtype=np.int64) for d in draws]))
    u = len(used)
    position = torch.full((num_images,), u, dtype=torch.long)
    position[torch.as_tensor(used)] = torch.arange(u)
    # per draw and class, which images it scored ([U, D*K] 0/1) and which of them it got right
    scored = torch.zeros(len(draws), num_classes, u, dtype=torch.float32)
    right = torch.zeros_like(scored)
    for d, (idx, y, c) in enumerate(draws):
        i = position[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
        k = torch.as_tensor(np.asarray(y), dtype=torch.long)
        scored[d, k, i] = 1.0
        right[d, k, i] = torch.as_tensor(np.asarray(c, dtype=np.float32))
    scored_flat, right_flat = scored.flatten(0, 1).T.contiguous(), right.flatten(0, 1).T.contiguous()
    del scored, right
    gen = torch.Generator().manual_seed(seed)
    acc_rep: list[torch.Tensor] = []
    bal_rep: list[torch.Tensor] = []
    chunk = max(1, min(resamples, 20_000_000 // max(num_images, 1)))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        picks = torch.randint(0, num_images, (r, num_images), generator=gen)
        weights = torch.zeros(r, u + 1, dtype=torch.float32)
        weights.scatter_add_(1, position[picks], torch.ones(r, num_images, dtype=torch.float32))  # times drawn
        weights = weights[:, :u]
        n = (weights @ scored_flat).double().view(r, len(draws), num_classes)  # weighted count per draw, class
        hits = (weights @ right_flat).double().view(r, len(draws), num_classes)
        total = n.sum(2)
        acc = torch.where(total > 0, hits.sum(2) / total.clamp(min=1e-12), torch.nan)  # [r, D]
        present = n > 0  # a class whose scored images were all left out of a replicate is not averaged
        recall = torch.where(present, hits / n.clamp(min=1e-12), 0.0)
        bal = torch.where(present.any(2), recall.sum(2) / present.sum(2).clamp(min=1), torch.nan)
        acc_rep.append(acc.nanmean(1))
        bal_rep.append(bal.nanmean(1))
    tail = (1 - level) / 2 * 100
    for key, rep in (("accuracy", torch.cat(acc_rep)), ("balanced_accuracy", torch.cat(bal_rep))):
        rep = rep[~rep.isnan()]
        if rep.numel() >= resamples // 2:
            lo, hi = np.percentile(rep.numpy(), [tail, 100 - tail])
            out[key] = (float(lo), float(hi))
    return out


@dataclass
class Metrics:
    """How one classifier did on one labelled set of images."""

    classes: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float | None
    auc: float | None
    recall: dict[str, float | None]
    confusion: list[list[int]]
    accuracy_ci95: tuple[float, float] | None = None  # Wilson interval over the n images
    auc_ci95: tuple[float, float] | None = None  # bootstrap interval over the n images
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few readable lines."""
        lines = [f"{self.n} images, {len(self.classes)} classes"]
        acc = f"accuracy {self.accuracy:.3f}"
        if self.accuracy_ci95:
            acc += f" (95% CI {self.accuracy_ci95[0]:.3f}-{self.accuracy_ci95[1]:.3f})"
        if self.balanced_accuracy is not None:
            acc += f", balanced accuracy {self.balanced_accuracy:.3f}"
        lines.append(acc)
        if self.auc is not None:
            auc = f"AUC {self.auc:.3f}"
            if self.auc_ci95:
                auc += f" (95% CI {self.auc_ci95[0]:.3f}-{self.auc_ci95[1]:.3f})"
            lines.append(auc)
        lines.append("recall: " + ", ".join(f"{c} {_fmt(r)}" for c, r in self.recall.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def compute_metrics(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    intervals: bool = False,
    seed: int = 0,
) -> Metrics:
    """Metrics of log-probabilities ``[M, N]`` (or logits) against true labels ``[M]``.

    ``intervals``: add a Wilson interval for the accuracy and a bootstrap interval for
    the AUC, over the ``M`` images (for one fixed model on one test set).
    """
    s = log_probs.detach().cpu().double()
    y = labels.detach().cpu().long()
    n_cls = len(classes)
    pred = s.argmax(1).numpy() if len(s) else np.zeros(0, np.int64)
    yn = y.numpy()
    conf = confusion_matrix(pred, yn, n_cls)
    rec = recall_per_class(conf)
    seen = [r for r in rec if r is not None]
    correct = int((pred == yn).sum())
    m = Metrics(
        classes=list(classes),
        n=len(yn),
        accuracy=correct / len(yn) if len(yn) else float("nan"),
        balanced_accuracy=float(np.mean(seen)) if seen else None,
        auc=macro_auc(s, y, n_cls),
        recall=dict(zip(classes, rec)),
        confusion=conf.tolist(),
    )
    if intervals and len(yn):
        m.accuracy_ci95 = wilson_interval(correct, len(yn))
        m.auc_ci95 = bootstrap_auc_interval(s, y, n_cls, seed=seed)
    return m


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str, title: str = "", fmt: str | None = None
) -> None:
    """Save a confusion matrix (rows: true class, columns: predicted; counts and row %) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .. import __version__

    c = np.asarray(confusion, dtype=np.float64)
    rows = c.sum(1, keepdims=True)
    frac = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    n = len(classes)
    size = max(3.5, 0.9 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(c[i, j])}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if frac[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), labels=list(classes), rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight", metadata={"Software": f"metafew {__version__}"})
    plt.close(fig)
