"""The honest estimate: repeated support draws, each scored on images it did not see.

With a few dozen labelled images, one train/test split says little: the result
depends on which images happened to be the support set. :func:`estimate` repeats the
whole adaptation ``draws`` times, each time with a different seeded draw of the
support images, and scores each adapted classifier on the images of the pool that
are *not* in that draw's support (or, when given, on a separate labelled test set,
e.g. the official MedMNIST test split). It reports, across draws:

* accuracy and balanced accuracy: mean, 95% confidence interval of the mean, and the
  2.5-97.5th percentile range of single draws (how much one support draw, such as the
  final model's, can vary), and a test-set bootstrap interval (1,000 resamples of the
  scored images, :func:`.metrics.bootstrap_draws_interval`): the draw interval covers
  the support draws only, with one backbone and the user's images as the only test
  set; the bootstrap adds that test set's own sampling error;
* macro one-vs-rest AUC: the same;
* per-class recall and the confusion matrix, both pooled (summed) over draws;
* two baselines that need no backbone (:mod:`.baselines`), scored on the same support
  draws and held-out images: their accuracy, balanced accuracy and macro AUC (from
  their log-probabilities, computed as the model's are) and the paired differences
  model-minus-baseline over the draws (``report.baselines``), so the report says when
  the backbone is not helping.

Support sizes per class (``shots=K``): each draw takes ``min(K, n - 1)`` of a class's
``n`` images, so at least one is left to score; the final model takes ``min(K, n)``.
A class with a single image is used as support but cannot be scored: its recall is
reported as unknown and the accuracy covers the other classes. ``shots="all"``: the
final model uses every image; each estimate draw holds out 20% of each class (at
least one image) and adapts on the rest (repeated random sub-sampling validation).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DatasetError
from ..learners import Classifier, Learner
from ..learners.bn import BNPolicy
from ..seeding import derive_seed, generator, seeded
from .baselines import BASELINES, FUNCTIONS, log_probabilities
from .metrics import BOOTSTRAP_RESAMPLES, Metrics, bootstrap_draws_interval, compute_metrics, mean_ci95, plot_confusion
from .outputs import REPORT_FORMAT, check_output, write_text
from .preprocess import Preprocessing

Shots = int | str  # an int K, or "all"
BNStats = Literal["support", "backbone"]
QueryBN = Literal["support", "batch"]
HOLDOUT_FRACTION = 0.2
MAX_CALIBRATION = 50_000  # held-out predictions kept to fit the temperature


class AdaptationWarning(UserWarning):
    """Something about the user's data that limits the model or its estimate."""


# -- support plans -------------------------------------------------------------------


def support_sizes(
    counts: Sequence[int], shots: Shots, classes: Sequence[str]
) -> tuple[list[int], list[int], list[str]]:
    """Per-class support sizes for the estimate draws and for the final model, and notes on them."""
    if shots != "all" and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
        raise DatasetError(f"shots must be a positive integer or 'all', got {shots!r}")
    if len(counts) < 2:
        raise DatasetError(f"adaptation needs at least 2 classes, got {len(counts)}")
    notes: list[str] = []
    draw_k: list[int] = []
    final_k: list[int] = []
    for c, n in enumerate(int(x) for x in counts):
        name = classes[c]
        if n == 0:
            raise DatasetError(f"class {name!r} has no images")
        if isinstance(shots, str):  # "all" (checked above)
            final_k.append(n)
            draw_k.append(n if n == 1 else n - max(1, round(HOLDOUT_FRACTION * n)))
        else:
            final_k.append(min(shots, n))
            draw_k.append(n if n == 1 else min(shots, n - 1))
            if 1 < n < shots:
                notes.append(f"class {name!r} has only {n} images, fewer than shots={shots}: the model uses all {n}")
            if 1 < n <= shots:
                notes.append(
                    f"class {name!r}: the estimate adapts on {n - 1} of its {n} images per draw, scoring the one left out"
                )
        if n == 1:
            notes.append(
                f"class {name!r} has a single image: it is used as support but cannot be evaluated "
                "(no image left to score); its recall is unknown and the estimate covers the other classes"
            )
    return draw_k, final_k, notes


def draw_support(labels: Tensor, sizes: Sequence[int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded draw: (support indices, held-out indices), ``sizes[c]`` support images of class c."""
    support, held = [], []
    for c, k in enumerate(sizes):
        idx = (labels == c).nonzero().squeeze(1)
        perm = idx[torch.randperm(len(idx), generator=gen)]
        support.append(perm[:k])
        held.append(perm[k:])
    return torch.cat(support), torch.cat(held)


# -- running classifiers over many images ----------------------------------------------


@torch.no_grad()
def predict_logits(
    logits: Callable[[Tensor], Tensor], images: Tensor, prep: Preprocessing, device: torch.device, batch_size: int = 256
) -> Tensor:
    """``logits(x)`` (float32, on the CPU) of uint8/float images ``[M, C, H, W]``, preprocessed in chunks on the device."""
    out = [logits(prep(images[i : i + batch_size], device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def deployment_policy(learner: Learner, bn_stats: BNStats = "support", query_bn: QueryBN = "support") -> BNPolicy:
    """The learner's BatchNorm policy as :func:`metafew.adapt` uses it (see its ``bn_stats``/``query_bn``)."""
    return learner.bn.deployed(bn_stats=bn_stats, query_bn=query_bn)


def adapt_on(
    learner: Learner, images: Tensor, labels: Tensor, index: Tensor, prep: Preprocessing,
    device: torch.device, seed: int, bn: BNPolicy,
) -> Classifier:  # fmt: skip
    """``learner.adapt`` (in eval mode, under a seeded RNG that leaves the caller's alone) to the
    support images ``images[index]``, BatchNorm as ``bn`` says (e.g. statistics of the support set)."""
    x = prep(images[index], device)
    y = labels[index].to(device)
    learner.eval()
    with seeded(seed, x.device):
        return learner.adapt(x, y, bn=bn)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``logits / T`` (temperature scaling, Guo et al. 2017).

    A 1-D search over log T; it never changes the predicted class. Prototype distances of
    a pretrained backbone otherwise often become near-certain 0/1 probabilities.
    """
    z = logits.double()
    y = labels.long()
    if len(y) == 0 or z.shape[1] < 2:
        return 1.0

    def nll(log_t: Tensor) -> Tensor:  # [G] -> mean cross-entropy at each temperature
        return torch.stack([F.cross_entropy(z / t.exp(), y) for t in log_t])

    grid = torch.linspace(-7.0, 7.0, 141, dtype=torch.float64)  # T from 1e-3 to 1e3
    best = float(grid[nll(grid).argmin()])
    fine = torch.linspace(best - 0.1, best + 0.1, 41, dtype=torch.float64)
    return float(fine[nll(fine).argmin()].exp())


@dataclass
class DrawChoice:
    """What one estimate draw adapts and scores, chosen from its support images (see ``estimate(choose=)``)."""

    name: str
    learner: Learner
    images: Tensor  # the labelled pool decoded for this backbone, in the pool's order
    prep: Preprocessing
    bn: BNPolicy


# -- the report ----------------------------------------------------------------------


@dataclass
class Summary:
    """A metric across draws: mean, 95% CI half-width of the mean, and 2.5/97.5th percentiles of single draws.

    ``test_bootstrap``: the percentile 95% interval of the mean over 1,000 bootstrap
    resamples of the scored images (the test set's own sampling error), when computed.
    """

    mean: float
    ci95: float
    low: float
    high: float
    test_bootstrap: tuple[float, float] | None = None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Summary | None:
        v = [x for x in values if x is not None and not np.isnan(x)]
        if not v:
            return None
        mean, ci = mean_ci95(v)
        lo, hi = np.percentile(v, [2.5, 97.5])
        return cls(mean, ci, float(lo), float(hi))

    def __str__(self) -> str:
        text = f"{self.mean:.3f} ± {self.ci95:.3f}"
        if self.test_bootstrap is not None:
            lo, hi = self.test_bootstrap
            text += f" (test-set bootstrap {lo:.3f}-{hi:.3f}; 2.5-97.5% of single draws {self.low:.3f}-{self.high:.3f})"
        else:
            text += f" (2.5-97.5% of single draws {self.low:.3f}-{self.high:.3f})"
        return text


@dataclass
class AdaptationReport:
    """The estimate of how well an adapted model classifies images it has not seen."""

    method: str
    shots: Shots
    draws: int
    seed: int
    classes: list[str]
    images_per_class: dict[str, int]
    support_per_class: dict[str, int]  # final model
    draw_support_per_class: dict[str, int]  # each estimate draw
    scored_per_draw: float  # mean number of images scored per draw
    evaluated_on: str  # "held-out images of <data>" or the test set's name
    accuracy: Summary | None
    balanced_accuracy: Summary | None
    auc: Summary | None
    recall: dict[str, float | None]
    confusion: list[list[int]]
    per_draw: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    temperature: float | None = None  # fitted on the held-out predictions (None: not fitted)
    alignment: dict[str, Any] | None = None  # the backbone's alignment to unlabeled images (None: not aligned)
    # name -> {"description", "accuracy", "balanced_accuracy", "auc" (Summary dicts), "difference" (model minus
    # baseline, paired over draws: {metric: {"mean", "ci95", "draws"}}), "per_draw"}; None: not scored (older
    # reports; those before the baselines' AUC have no "auc")
    baselines: dict[str, dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)  # about the data and the backbone (e.g. channel mismatch)
    # backbone="auto": {"candidates": [{"name", "backbone", "method", "inner_score", "chosen_in_draws",
    # "inner_score_draws", "note"}], "chosen": name, "inner": how the inner score is measured, "metric"}
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": REPORT_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaptationReport:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("accuracy", "balanced_accuracy", "auc"):
            d[k] = Summary(**d[k]) if d.get(k) else None
            if d[k] is not None and d[k].test_bootstrap is not None:
                d[k].test_bootstrap = tuple(d[k].test_bootstrap)
        return cls(**d)

    def summary(self) -> str:
        """The estimate in a few readable lines."""
        shots = "all images" if self.shots == "all" else f"{self.shots} images per class"
        lines = [f"{self.method}, support {shots}: {self.draws} support draws, scored on {self.evaluated_on}"]
        if self.accuracy is None:
            lines.append(
                "no estimate: "
                + ("no draws were asked for" if self.draws == 0 else "no class has an image left to score")
            )
        else:
            lines.append(f"accuracy           {self.accuracy}")
            if self.balanced_accuracy is not None:
                lines.append(f"balanced accuracy  {self.balanced_accuracy}")
            lines.append(f"AUC                {self.auc if self.auc is not None else 'n/a'}")
            lines.append("recall             " + ", ".join(f"{c} {_f(r)}" for c, r in self.recall.items()))
            lines.extend(coverage_lines(self))
        if self.selection:
            lines.extend(selection_lines(self.selection, self.draws))
        if self.accuracy is not None and self.baselines:
            lines.extend(baseline_lines(self.baselines, advice=baseline_advice(self)))
        if self.temperature is not None:
            lines.append(
                f"probabilities calibrated on the held-out predictions of the draws (softmax temperature {self.temperature:.3g})"
            )
        if self.alignment:
            lines.append(alignment_line(self.alignment))
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (refusing to overwrite a file that is not a metafew report)."""
        p = check_output(path, "report")
        return write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")

    def save_confusion(self, path: str | Path) -> Path:
        """Write the pooled confusion matrix as a PNG (refusing to overwrite a file metafew did not write)."""
        p = check_output(path, "png")
        title = f"{self.method}, {self.shots}-shot, summed over {self.draws} draws"
        from ..paths import atomic_write

        return atomic_write(p, lambda tmp: plot_confusion(self.confusion, self.classes, tmp, title, fmt="png"))


def coverage_lines(report: AdaptationReport) -> list[str]:
    """What the figures above cover and what they do not, in words a user reads."""
    boot = report.accuracy is not None and report.accuracy.test_bootstrap is not None
    test = "these images" if report.evaluated_on.startswith("held-out") else report.evaluated_on
    lines = [
        f"± is the 95% CI of the mean over the {report.draws} support draws only (each draw scored "
        f"{report.scored_per_draw:.0f} images): it covers which images were the support, with "
        + ("these candidate backbones" if report.selection else "this one backbone")
        + f" (not the variation between pretraining runs of a backbone) and {test} as the only test set "
        "(not a fresh test set's sampling error)."
    ]
    if boot:
        lines.append(
            "test-set bootstrap: 95% percentile interval over 1,000 resamples of the scored images, "
            "the sampling error of this one test set; expect a new population to differ by more."
        )
    else:
        lines.append("with few images, expect a new population to differ by more.")
    return lines


def selection_lines(sel: dict[str, Any], draws: int) -> list[str]:
    """Summary lines on ``backbone="auto"``: what was tried, what each scored, and what was chosen."""
    lines = [
        f"backbone chosen automatically among {len(sel.get('candidates', []))} candidates by "
        f"{sel.get('metric', 'balanced accuracy')} of {sel.get('inner', 'an inner split')}:"
    ]
    for c in sel.get("candidates", []):
        score = c.get("inner_score")
        text = f"  {c['name']}: inner score {_f(score)} on all labelled images"
        if draws:
            text += (
                f", {_f(c.get('inner_score_draws'))} mean over draws, chosen in {c.get('chosen_in_draws', 0)}/{draws}"
            )
        if c["name"] == sel.get("chosen"):
            text += "  <- chosen for the model"
        if c.get("note"):
            text += f" ({c['note']})"
        lines.append(text)
    if draws:
        lines.append(
            "the estimate is nested: each draw chose on its own support images only and was scored on images "
            "the choice never saw, so the choice does not flatter it"
        )
    return lines


BASELINE_METRICS = ("accuracy", "balanced_accuracy", "auc")


def baseline_metric(b: dict[str, Any]) -> str:
    """The accuracy a baseline is compared on: balanced accuracy when known, else accuracy."""
    d = b.get("difference") or {}
    return "balanced_accuracy" if d.get("balanced_accuracy") else "accuracy"


def compared_metrics(b: dict[str, Any]) -> list[str]:
    """What the model must beat baseline ``b`` on: its (balanced) accuracy, and the macro AUC when both have one."""
    d = b.get("difference") or {}
    return [baseline_metric(b)] + (["auc"] if d.get("auc") else [])


def _interval(d: dict[str, Any]) -> bool:
    """Whether a paired difference has an interval (two draws or more; older reports: a finite ci95)."""
    ci = d.get("ci95")
    return ci is not None and not np.isnan(float(ci)) and int(d.get("draws", 2)) >= 2


def beats(b: dict[str, Any], metric: str | None = None) -> bool:
    """Whether the model's paired difference to baseline ``b`` has its 95% CI above 0.

    On ``metric``, or (None) on every metric of :func:`compared_metrics`; False without
    an interval (a single draw).
    """
    diffs = b.get("difference") or {}
    for m in [metric] if metric else compared_metrics(b):
        d = diffs.get(m)
        if not d or not _interval(d) or float(d["mean"]) - float(d["ci95"]) <= 0:
            return False
    return True


def _label(metric: str) -> str:
    return "AUC" if metric == "auc" else metric.replace("_", " ")


def baseline_advice(report: AdaptationReport) -> str:
    """What to try when the model does not beat a baseline, for this report's backbone, method and shots."""
    sel = report.selection
    methods = {c.get("method") for c in sel.get("candidates", [])} if sel else {report.method}
    tips = []
    if sel:
        tips.append("a backbone pretrained on images closer to yours (--candidate FILE; every shipped one was tried)")
    else:
        tips.append("another backbone (or --backbone auto to try every shipped one)")
    if "finetune" not in methods:  # under auto: add it to the methods tried
        tips.append("--method " + (",".join([*sorted(m for m in methods if m), "finetune"]) if sel else "finetune"))
    tips.append("more labelled images" if report.shots == "all" else "more shots")
    return ", ".join(tips[:-1]) + " or " + tips[-1]


def baseline_lines(
    baselines: dict[str, dict[str, Any]], advice: str = "another backbone, --method finetune or more shots"
) -> list[str]:
    """Summary lines on the baselines: their scores, the model's paired differences, and whether it beats them.

    ``advice``: what to try when it does not (:func:`baseline_advice` tailors it to the report).
    """
    lines = ["baselines without a backbone, on the same draws and held-out images:"]
    single = False
    for name, b in baselines.items():
        metrics = compared_metrics(b)
        diffs = b.get("difference") or {}
        scores = [
            f"{_label(m)} {Summary(**b[m]) if b.get(m) else 'n/a'}"
            for m in (baseline_metric(b), "auc")
            if m != "auc" or b.get(m)
        ]
        lines.append(f"  {name} ({b.get('description', '')}): " + "; ".join(scores))
        shown = []
        for metric in metrics:
            d = diffs.get(metric)
            if not d:
                continue
            if _interval(d):
                shown.append(f"{_label(metric)} {d['mean']:+.3f} ± {d['ci95']:.3f}")
            else:
                shown.append(f"{_label(metric)} {d['mean']:+.3f} (no interval)")
                single = True
        lines.append("    model minus baseline, paired over draws: " + (", ".join(shown) or "no paired difference"))
    if single:
        lines.append(
            "one support draw gives no interval, so it cannot tell whether the model beats the baselines: "
            "use more draws (--draws or eval_draws, e.g. 20 or 100)"
        )
        return lines
    for name, b in baselines.items():
        if beats(b):
            continue
        lost = [_label(m) for m in compared_metrics(b) if not beats(b, m)]
        on = " and ".join(lost) if lost else _label(baseline_metric(b))
        lines.append(f"the model does not beat {name} on these images ({on}); try {advice}")
    return lines


def summarise_baseline(
    name: str, model_draws: Sequence[dict[str, Any]], draws: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The report entry of one baseline: its per-draw scores, their summaries and the paired differences.

    ``difference[metric]``: the mean and 95% CI half-width of the per-draw differences
    model minus baseline (paired: the same support draw and scored images), over the
    ``draws`` draws where both have the metric.
    """
    out: dict[str, Any] = {"description": BASELINES[name], "difference": {}, "per_draw": list(draws)}
    for metric in BASELINE_METRICS:
        s = Summary.of([d.get(metric) for d in draws])
        out[metric] = asdict(s) if s is not None else None
        diffs = [
            m[metric] - d[metric]
            for m, d in zip(model_draws, draws)
            if m.get(metric) is not None
            and d.get(metric) is not None
            and not np.isnan(m[metric])
            and not np.isnan(d[metric])
        ]
        if diffs:
            mean, ci = mean_ci95(diffs)
            out["difference"][metric] = {"mean": mean, "ci95": ci if len(diffs) > 1 else None, "draws": len(diffs)}
    return out


def alignment_line(a: dict[str, Any]) -> str:
    """One readable line on how the backbone was aligned (:func:`metafew.adaptation.align.align_backbone`)."""
    how = str(a.get("method"))
    if a.get("method") != "bn":
        how += f", {a.get('steps')} steps, source: {a.get('source_images')} images of {a.get('source', 'the source')}"
    else:
        how += ": BatchNorm statistics of the unlabeled images"
    pool = a.get("pool") or {}
    used, overlap = pool.get("used", a.get("target_images")), pool.get("labelled_overlap", 0)
    if pool.get("transductive"):
        mode = f"transductive: the pool may include images the estimate scores ({overlap} labelled images in it)"
    else:
        mode = f"inductive: {overlap} labelled images left out of the pool, so no scored image took part"
    return f"backbone aligned to {used} unlabeled images by {how} ({mode})"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# -- the estimate --------------------------------------------------------------------


def estimate(
    learner: Learner,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    prep: Preprocessing,
    *,
    method: str,
    shots: Shots,
    draws: int,
    seed: int = 0,
    device: torch.device,
    query_bn: QueryBN = "support",
    test: tuple[Tensor, Tensor, str] | None = None,
    max_eval: int | None = 2000,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    warn: bool = True,
    calibrate: bool = True,
    bn_stats: BNStats = "support",
    baselines: bool = True,
    choose: Callable[[int, Tensor], DrawChoice] | None = None,
    calibrate_on: str | None = None,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
) -> AdaptationReport:
    """Score ``draws`` seeded support draws of ``images``/``labels`` (the labelled pool).

    Args:
        learner: the learner to adapt (on its backbone's device; left unchanged).
        images: uint8 ``[N, C, H, W]`` pool; labels ``[N]``; classes: names.
        prep: the backbone's preprocessing.
        test: ``(images, labels, name)`` of a separate labelled test set to score every
            draw on (its labels in the same class order); default: the draw's held-out images.
        max_eval: score at most this many held-out images per draw (a seeded random
            subset), which keeps large pools fast; None: all.
        progress: called as ``progress(done, total)`` after every draw.
        bn_stats, query_bn: BatchNorm statistics, as :func:`metafew.adapt` documents them;
            the learner's policy object applies them (:meth:`BNPolicy.deployed`).
        calibrate: fit a softmax temperature to the held-out predictions of all draws
            (``report.temperature``; not with ``test``, which must stay unseen).
        baselines: also score the pixel baselines of :mod:`.baselines` on every draw
            (``report.baselines``).
        choose: ``choose(draw, support_indices)`` picks, from the support images alone,
            what each draw adapts and scores (a backbone and learner with their decoded
            images: :class:`DrawChoice`) instead of ``learner``/``images``/``prep``; the
            held-out images are never handed to it (``backbone="auto"``'s nested estimate).
        calibrate_on: with ``choose``, fit the temperature only on the draws that chose
            this name (the final model's choice; no temperature if none did).
        bootstrap: resamples of the scored images for the test-set bootstrap interval
            of the accuracies (0: none).
    """
    start = time.perf_counter()
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    draw_k, final_k, notes = support_sizes(counts, shots, classes)
    if test is not None:  # support from the pool, scoring on the test set: the pool keeps every image
        draw_k = final_k
        notes = [n for n in notes if "the estimate adapts on" not in n and "cannot be evaluated" not in n]
    if warn:
        for n in notes:
            warnings.warn(n, AdaptationWarning, stacklevel=3)
    scorable = [c for c in range(len(classes)) if counts[c] > draw_k[c]] if test is None else list(range(len(classes)))
    total_conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    held_logits: list[Tensor] = []
    held_labels: list[Tensor] = []
    kept = 0
    per_draw: list[dict[str, Any]] = []
    scored = 0
    if len(scorable) == 0 and draws > 0 and test is None:
        notes.append("no class has more images than its support, so nothing can be scored")
        draws_run = 0
    else:
        draws_run = draws
    bn = deployment_policy(learner, bn_stats, query_bn)
    base_draws: dict[str, list[dict[str, Any]]] = {name: [] for name in FUNCTIONS} if baselines else {}
    outcomes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per draw: scored indices, labels, correct
    for i in range(draws_run):
        gen = generator(seed, f"draw-{i}")
        support, held = draw_support(labels, draw_k, gen)
        d_learner, d_images, d_prep, d_bn, chosen = learner, images, prep, bn, None
        if choose is not None:
            c = choose(i, support)
            d_learner, d_images, d_prep, d_bn, chosen = c.learner, c.images, c.prep, c.bn, c.name
        seed_i = derive_seed(seed, f"adapt-{i}")
        classifier = adapt_on(d_learner, d_images, labels, support, d_prep, device, seed_i, d_bn)
        if test is None:
            if max_eval is not None and len(held) > max_eval:
                held = held[torch.randperm(len(held), generator=gen)[:max_eval]]
            x_eval, y_eval, scored_idx = d_images[held], labels[held], held
        else:
            x_eval, y_eval, scored_idx = test[0], test[1], torch.arange(len(test[1]))
        logits = predict_logits(classifier, x_eval, d_prep, device, batch_size)
        m = compute_metrics(logits.log_softmax(-1), y_eval, classes)
        outcomes.append((scored_idx.numpy(), y_eval.numpy(), (logits.argmax(-1) == y_eval).numpy()))
        if test is None and kept < MAX_CALIBRATION and (calibrate_on is None or chosen in (None, calibrate_on)):
            held_logits.append(logits[: MAX_CALIBRATION - kept])
            held_labels.append(y_eval[: MAX_CALIBRATION - kept])
            kept += len(held_logits[-1])
        total_conf += np.asarray(m.confusion)
        scored += m.n
        per_draw.append({"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "auc": m.auc, "scored": m.n})
        if chosen is not None:
            per_draw[-1]["chosen"] = chosen
        if base_draws:
            xs, ys = images[support].to(device), labels[support]
            xq = (images[scored_idx] if test is None else x_eval).to(device)
            for name in FUNCTIONS:
                bm = compute_metrics(log_probabilities(name, xs, ys, xq, len(classes)), y_eval, classes)
                base_draws[name].append(
                    {"accuracy": bm.accuracy, "balanced_accuracy": bm.balanced_accuracy, "auc": bm.auc}
                )
        if progress is not None:
            progress(i + 1, draws_run)
        del classifier
    totals = total_conf.sum(1)
    recall = {classes[c]: (float(total_conf[c, c] / totals[c]) if totals[c] else None) for c in range(len(classes))}
    temperature = None
    if held_logits and calibrate:
        temperature = fit_temperature(torch.cat(held_logits), torch.cat(held_labels))
    if test is None:
        evaluated_on = "held-out images of the labelled pool (not in that draw's support)"
    else:
        evaluated_on = f"{test[2]} ({len(test[1])} images)"
    accuracy = Summary.of([d["accuracy"] for d in per_draw])
    balanced = Summary.of([d["balanced_accuracy"] for d in per_draw])
    if bootstrap and outcomes:
        boot = bootstrap_draws_interval(
            outcomes, len(labels) if test is None else len(test[1]), len(classes), resamples=bootstrap, seed=seed
        )
        for s, key in ((accuracy, "accuracy"), (balanced, "balanced_accuracy")):
            if s is not None:
                s.test_bootstrap = boot[key]
    return AdaptationReport(
        method=method,
        shots=shots,
        draws=draws_run,
        seed=seed,
        classes=list(classes),
        images_per_class={classes[c]: counts[c] for c in range(len(classes))},
        support_per_class={classes[c]: final_k[c] for c in range(len(classes))},
        draw_support_per_class={classes[c]: draw_k[c] for c in range(len(classes))},
        scored_per_draw=scored / max(draws_run, 1),
        evaluated_on=evaluated_on,
        accuracy=accuracy,
        balanced_accuracy=balanced,
        auc=Summary.of([d["auc"] for d in per_draw]),
        recall=recall,
        confusion=total_conf.tolist(),
        per_draw=per_draw,
        notes=notes,
        seconds=time.perf_counter() - start,
        temperature=temperature,
        baselines={n: summarise_baseline(n, per_draw, d) for n, d in base_draws.items()} if per_draw else None,
    )


__all__ = [
    "AdaptationReport",
    "AdaptationWarning",
    "DrawChoice",
    "Metrics",
    "Summary",
    "draw_support",
    "estimate",
    "support_sizes",
]
