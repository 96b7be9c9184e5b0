"""``backbone="auto"``: choose a backbone and method from the labelled images alone, nested in the estimate.

Every candidate (each backbone tried, under each method) is scored by an *inner*
stratified k-fold split of the labelled images it is allowed to see (``k = min(5,
smallest class)``; a class with one image stays in every training part): adapt to the
other folds, predict the held fold, and take the balanced accuracy of the pooled
predictions. The best inner score wins (ties: the earlier candidate).

The choice is nested in the estimate (:func:`metafew.adaptation.estimate.estimate`
with ``choose=``): each outer support draw makes its own choice from that draw's
support images only, and the chosen candidate is scored on the draw's held-out
images, which the choice never saw. So the figure is the estimate of the whole
procedure "choose, then adapt", not of the luckiest candidate. The final model is the
candidate chosen on all labelled images.

Speed: ProtoNet's inner folds need no new forward passes. Its features of a draw's
support images are computed once and every fold's prototypes are class means of
them; with ``bn_stats="backbone"`` (batch-independent BatchNorm) the features of
every labelled image are computed once for the whole estimate and reused by every
draw. (With the default ``bn_stats="support"`` the features use the BatchNorm
statistics of the draw's whole support set, as the adapted classifier does.) Other
methods adapt once per fold.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..backbones import list_weights
from ..data import FewShotDataset
from ..errors import ConfigError, DatasetError, MetafewError
from ..learners import LEARNERS, Learner
from ..learners import create as create_learner
from ..learners.base import class_means
from ..learners.bn import BNPolicy
from ..learners.protonet import ProtoNet
from ..seeding import derive_seed, generator
from .estimate import BNStats, DrawChoice, QueryBN, adapt_on, deployment_policy, predict_logits
from .inputs import resolve_backbone, resolve_data
from .preprocess import Preprocessing

INNER_FOLDS = 5
DEFAULT_METHODS = ("protonet",)  # the cheap one; add finetune etc. with method=[...]
METRIC = "balanced accuracy"

__all__ = ["DEFAULT_METHODS", "Candidate", "Selection", "candidate_backbones", "inner_folds", "inner_score"]


@dataclass
class Candidate:
    """One backbone under one method, with the labelled images decoded for it."""

    name: str  # "<backbone>/<method>"
    backbone: str  # the shipped name or file
    method: str
    learner: Learner
    prep: Preprocessing
    info: dict[str, Any]  # the backbone's description, saved with the model
    options: dict[str, Any]
    images: Tensor  # the labelled pool, decoded at this backbone's channels and size
    bn: BNPolicy
    notes: list[str] = field(default_factory=list)
    features: Tensor | None = None  # every pool image's features, when batch-independent (ProtoNet)
    inner_score: float | None = None  # on all labelled images: the final choice
    draw_scores: list[float] = field(default_factory=list)
    chosen_in_draws: int = 0
    skipped: str | None = None

    def describe(self) -> dict[str, Any]:
        """The report entry: what it is, what it scored, how often it was chosen."""
        finite = [s for s in self.draw_scores if not np.isnan(s)]
        return {
            "name": self.name,
            "backbone": self.backbone,
            "method": self.method,
            "inner_score": self.inner_score,
            "inner_score_draws": float(np.mean(finite)) if finite else None,
            "chosen_in_draws": self.chosen_in_draws,
            "note": "; ".join(([self.skipped] if self.skipped else []) + self.notes) or None,
        }


def candidate_backbones(extra: Sequence[str | os.PathLike[str]] | None = None) -> list[str]:
    """The backbones ``backbone="auto"`` tries: every shipped one, then ``extra`` (files or names), no repeats."""
    out: list[str] = []
    for b in [*list_weights(), *(str(x) for x in extra or ())]:
        if b not in out:
            out.append(b)
    if not out:
        raise ConfigError("backbone='auto' found no shipped backbone and none was listed: give candidates=[...]")
    return out


def parse_methods(method: str | Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    """The methods to try: a name, a comma-separated list or a sequence (default :data:`DEFAULT_METHODS`)."""
    if method is None:
        return list(DEFAULT_METHODS)
    names = method.split(",") if isinstance(method, str) else list(method)
    out = [n.strip().lower() for n in names if n.strip()]
    bad = [n for n in out if n not in allowed]
    if bad or not out:
        raise ConfigError(f"unknown method {(bad or [''])[0]!r}; choose among {', '.join(allowed)}")
    return list(dict.fromkeys(out))


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The learner options that ``method``'s learner accepts (so one set can go to several methods)."""
    params = inspect.signature(LEARNERS.get(method)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


class Selection:
    """The candidates of ``backbone="auto"`` and the choice among them (see the module docstring)."""

    def __init__(
        self,
        data: FewShotDataset | str | os.PathLike[str],
        backbones: Sequence[str],
        methods: Sequence[str],
        *,
        default_options: dict[str, dict[str, Any]],
        options: dict[str, Any],
        device: torch.device,
        data_root: str | os.PathLike[str] | None,
        skip_bad: bool,
        bn_stats: BNStats,
        query_bn: QueryBN,
        seed: int,
        batch_size: int = 256,
        channels_of: Any = None,
    ) -> None:
        self.device, self.seed, self.batch_size = device, seed, batch_size
        unused = set(options) - {k for m in methods for k in options_for(m, options)}
        if unused:
            raise ConfigError(
                f"learner option(s) {', '.join(sorted(unused))} fit none of the methods {', '.join(methods)}"
            )
        decoded: dict[tuple[int, tuple[int, ...]], FewShotDataset] = {}
        self.candidates: list[Candidate] = []
        self.dataset: FewShotDataset | None = None
        for b in backbones:
            module, prep, info = resolve_backbone(b, device=device, data_root=data_root)
            key = (prep.channels, tuple(prep.image_size))
            if key not in decoded:
                decoded[key] = resolve_data(data, prep, skip_bad=skip_bad, root=data_root)
            ds = decoded[key]
            if self.dataset is None:
                self.dataset = ds
            elif ds.classes != self.dataset.classes or not torch.equal(ds.labels, self.dataset.labels):
                raise DatasetError(
                    f"{ds.name}: the images decode differently for {b} (a file read once but not twice?)"
                )
            note = channels_of(prep.channels) if channels_of is not None else None
            for j, m in enumerate(methods):
                if j:  # each method adapts its own copy of the backbone
                    module = copy.deepcopy(module)
                opts = {**default_options.get(m, {}), **options_for(m, options)}
                learner = create_learner(m, module, **opts).to(device).eval()
                name = f"{Path(b).name if os.sep in b else b}/{m}"
                if any(x.name == name for x in self.candidates):  # two files of one name in different folders
                    name = f"{b}/{m}"
                c = Candidate(
                    name=name, backbone=b, method=m, learner=learner,
                    prep=prep, info=info, options=opts, images=ds.images,
                    bn=deployment_policy(learner, bn_stats, query_bn), notes=[note] if note else [],
                )  # fmt: skip
                if isinstance(learner, ProtoNet) and c.bn.batch_independent:
                    c.features = self._embed(c, ds.images, stats=None)
                self.candidates.append(c)
        assert self.dataset is not None
        self.labels = self.dataset.labels

    # -- features ------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, c: Candidate, images: Tensor, stats: Any) -> Tensor:
        learner = c.learner
        learner.eval()
        out = []
        with c.bn.while_adapting(learner.backbone, stats):
            for i in range(0, len(images), self.batch_size):
                out.append(learner.embed(c.prep(images[i : i + self.batch_size], self.device)).float())
        return torch.cat(out) if out else torch.empty(0, 0)

    # -- the choice ----------------------------------------------------------------
    def active(self) -> list[Candidate]:
        """The candidates not skipped."""
        return [c for c in self.candidates if c.skipped is None]

    def choose_all(self) -> Candidate:
        """Score every candidate on all labelled images (skipping, with a note, one that fails) and pick the best."""
        index = torch.arange(len(self.labels))
        for c in self.candidates:
            try:
                c.inner_score = inner_score(self, c, index, derive_seed(self.seed, "inner-final"))
            except (RuntimeError, MetafewError) as e:  # e.g. a backbone that cannot take these images
                c.skipped = f"skipped: it failed on these images ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        active = self.active()
        if not active:
            raise ConfigError(
                "backbone='auto': every candidate failed on these images: "
                + "; ".join(f"{c.name}: {c.skipped}" for c in self.candidates)
            )
        return best(active, [c.inner_score for c in active])

    def choose(self, draw: int, support: Tensor) -> DrawChoice:
        """The choice of outer draw ``draw``, made on its ``support`` images only (``estimate(choose=)``)."""
        active = self.active()
        scores = [inner_score(self, c, support, derive_seed(self.seed, f"inner-{draw}")) for c in active]
        for c, s in zip(active, scores):
            c.draw_scores.append(s)
        c = best(active, scores)
        c.chosen_in_draws += 1
        return DrawChoice(c.name, c.learner, c.images, c.prep, c.bn)

    def report(self, chosen: Candidate, folds: int) -> dict[str, Any]:
        """``AdaptationReport.selection``."""
        return {
            "candidates": [c.describe() for c in self.candidates],
            "chosen": chosen.name,
            "metric": METRIC,
            "inner": f"an inner stratified {folds}-fold split of each draw's support images "
            "(of all labelled images for the model)",
        }


def best(candidates: Sequence[Candidate], scores: Sequence[float | None]) -> Candidate:
    """The candidate with the highest score (NaN/None lowest; ties: the first)."""
    key = [(-np.inf if s is None or np.isnan(s) else s) for s in scores]
    return candidates[int(np.argmax(key))]


def inner_folds(labels: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, int]:
    """A fold number per image (``-1``: always trained on), stratified by class, and the number of folds.

    ``k`` is lowered to the smallest class with at least 2 images, so every class keeps an
    image in every training part; classes with a single image are never held out.
    """
    counts = torch.bincount(labels)
    splittable = counts[counts >= 2]
    k = int(min(k, int(splittable.min()))) if len(splittable) else 0
    fold = torch.full((len(labels),), -1, dtype=torch.long)
    if k < 2:
        return fold, 0
    for c in range(len(counts)):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) < 2:
            continue
        perm = idx[torch.randperm(len(idx), generator=gen)]
        fold[perm] = torch.arange(len(idx)) % k
    return fold, k


def folds_for(counts: Sequence[int]) -> int:
    """How many inner folds a support set with these per-class counts gets (0: it cannot be split)."""
    splittable = [int(n) for n in counts if n >= 2]
    k = min(INNER_FOLDS, *splittable) if splittable else 0
    return k if k >= 2 else 0


def inner_score(selection: Selection, c: Candidate, index: Tensor, seed: int) -> float:
    """Balanced accuracy of candidate ``c`` by an inner k-fold split of the labelled images ``index`` only.

    NaN when the images cannot be split (every class a single image).
    """
    labels = selection.labels[index]
    fold, k = inner_folds(labels, INNER_FOLDS, generator(seed, "folds"))
    if k == 0:
        return float("nan")
    pred = torch.full((len(index),), -1, dtype=torch.long)
    if isinstance(c.learner, ProtoNet):
        if c.features is not None:
            feats = c.features[index]
        else:  # BatchNorm statistics of these images, as the adapted classifier would use
            x = c.prep(c.images[index], selection.device)
            feats = selection._embed(c, c.images[index], c.bn.adapting_statistics(c.learner.backbone, x))
        n_way = int(labels.max()) + 1
        y = labels.to(feats.device)
        with torch.no_grad():
            for f in range(k):
                train, held = fold != f, fold == f
                protos = class_means(feats[train.to(feats.device)], y[train.to(feats.device)], n_way)
                logits = c.learner.logits(feats[held.to(feats.device)], protos)
                pred[held] = logits.argmax(-1).cpu()
    else:
        for f in range(k):
            train, held = index[fold != f], index[fold == f]
            clf = adapt_on(
                c.learner,
                c.images,
                selection.labels,
                train,
                c.prep,
                selection.device,
                derive_seed(seed, f"fold-{f}"),
                c.bn,
            )
            logits = predict_logits(clf, c.images[held], c.prep, selection.device, selection.batch_size)
            pred[fold == f] = logits.argmax(-1)
            del clf
    scored = fold >= 0
    recalls = [
        float((pred[scored & (labels == cl)] == cl).float().mean())
        for cl in range(int(labels.max()) + 1)
        if bool((scored & (labels == cl)).any())
    ]
    return float(np.mean(recalls)) if recalls else float("nan")
