#!/usr/bin/env python
"""Few-shot adaptation to MedMNIST (PneumoniaMNIST, BreastMNIST, DermaMNIST): the suite benchmarks/suites/medical.toml.

For every dataset x backbone x method x K, ``draws`` seeded support draws of K images per
class from the official train split are adapted to (exactly as ``metafew adapt`` does)
and each is scored on the whole official test split: accuracy, balanced accuracy and macro
AUC, beside the MedMNIST v2 ResNet-18 figures and the test split's majority-class rate.

Every cell reports three intervals, each covering a different source of variation
(``meta.intervals`` in the JSON says the same):

* ``draws``: 95% CI of the mean over the support draws, with the backbone of the first
  pretraining seed and the official test split as the only test set (what earlier
  versions of this suite reported);
* ``seeds``: each backbone is pretrained once per ``--pretrain-seeds`` seed; every seed is
  scored on the *same* support draws; the per-seed means over draws get a Student-t 95%
  interval over seeds (df = seeds - 1), and ``pooled`` gives the grand mean over draws x
  seeds with a 95% normal interval from the two-way crossed variance components
  (seed + draw + residual), so both the backbone's pretraining and the support draw vary;
* ``test_bootstrap``: the percentile 95% interval of the grand mean over ``--bootstrap``
  (1,000) resamples of the test images, with every seed and draw re-scored on each
  resample: the test split's own sampling error.

Two baselines that need no backbone (:mod:`metafew.adaptation.baselines`: nearest class mean
and a logistic-regression probe, both on standardised pixels) are scored on the same draws
and test split at every dataset and K, and the best model cell at each dataset and K (by
balanced accuracy) gets its paired difference to each baseline over the draws.

Backbones are pretrained with :func:`metafew.pretrain` when their checkpoint is missing,
and cached in ``--backbone-dir`` (default ``<metafew cache>/pretrained/medical``) as
``<arch>-<dataset>-<recipe key>-<provenance key>.safetensors``, keyed as metafew's own suite
backbones are (:mod:`metafew.cache_keys`, :mod:`metafew.bench.provenance`): the recipe (the
pretraining seed included), the metafew and torch versions, the code of the modules that
compute the weights and a fingerprint of the pretraining data. A change to any of them
pretrains anew (the log says what changed), and the result cells computed from the old
backbone are scored again. ``<name>.provenance.json`` beside each file records the details.
Files cached by earlier versions (``<arch>-<dataset>-<recipe key>.safetensors``) recorded
neither torch nor the code, so they cannot be shown to match and are not reused. Results
are written after every cell to ``<out>/<name>.json``; a rerun skips the cells already
there (same settings and backbones), so an interrupted run resumes. A dataset
missing from the data root is skipped with a message saying how to download it.

    python benchmarks/medical.py                       # the whole suite (see --help for run time)
    python benchmarks/medical.py --quick               # a smoke run, minutes on a CPU
    python benchmarks/medical.py --datasets pneumoniamnist --methods protonet --shots 10 --pretrain-seeds 0 1 2
    python benchmarks/medical.py --baselines only      # the pixel baselines alone (seconds per cell)
    python benchmarks/medical.py --auto --shots 10     # the backbone and method metafew adapt --backbone auto
                                                       # chooses per draw on its support images, vs the baselines
    python benchmarks/medical.py --tune                # the MAML / fine-tuning option sweep on the VALIDATION split

Outputs in --out (default results/medical, or results/medical-quick): <name>.json,
<name>.md (tables), <name>_accuracy.png and <name>_auc.png (metric against K, one panel
per dataset and backbone, one line per method, the ResNet-18 figure dashed).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
SUITE = HERE / "suites" / "medical.toml"
# "medmnist-other": the backbone of each dataset is pretrained on this other MedMNIST set
OTHER = {
    "pneumoniamnist": "breastmnist",
    "breastmnist": "pneumoniamnist",
    "dermamnist": "bloodmnist",
    "bloodmnist": "dermamnist",
}
METRICS = ("accuracy", "balanced_accuracy", "auc")
BASELINE_ROWS = {"pixels-nearest-mean": "nearest_mean_pixels", "pixels-logistic": "logistic_pixels"}
INTERVALS = {
    "draws": "95% CI (1.96 std / sqrt(draws)) of the mean over the support draws, with the backbone of the "
    "first pretraining seed and the official test split as the only test set",
    "seeds": "each backbone pretrained once per seed and scored on the same support draws; mean over seeds of "
    "the per-seed means over draws, Student-t 95% interval over seeds (df = seeds - 1)",
    "pooled": "grand mean over draws x seeds; 95% normal interval of it with draws and seeds both random "
    "(two-way crossed variance components: var = (MS_seed + MS_draw - MS_residual) / (seeds x draws))",
    "test_bootstrap": "percentile 95% interval of the grand mean over resamples (with replacement) of the test "
    "images, every seed and draw re-scored on each resample: the sampling error of the test split",
    "difference": "best model cell minus baseline, paired on the same draws (the model's per-draw value "
    "averaged over pretraining seeds): mean and 95% CI over draws; per_seed: the same for each seed alone. "
    "The best cell is chosen on the test split itself, which flatters it slightly",
    "auto": "--auto cells: each draw's backbone and method chosen by metafew adapt --backbone auto's nested "
    "selection (inner k-fold balanced accuracy on that draw's support images only, never the test split); "
    "auto_comparison: their paired difference to each baseline over the same draws, beats = the 95% CI above 0 "
    "on both balanced accuracy and AUC",
}
Log = Callable[[str], None]


# -- configuration ----------------------------------------------------------------------


def load_suite(path: Path, quick: bool) -> dict[str, Any]:
    """The suite TOML as a dict, with its ``[quick]`` settings applied when ``quick``."""
    with open(path, "rb") as f:
        suite = tomllib.load(f)
    if quick:
        q = suite.get("quick", {})
        for key in ("shots", "draws", "backbones", "datasets", "methods", "pretrain_seeds"):
            if key in q:
                suite[key] = q[key]
        if "pretrain_epochs" in q:
            for recipe in suite["pretrain"].values():
                recipe["epochs"] = q["pretrain_epochs"]
    return suite


def recipe_for(suite: dict[str, Any], backbone: str, dataset: str, seed: int | None = None) -> dict[str, Any]:
    """The pretraining recipe of ``backbone`` for ``dataset`` ("medmnist-other" resolved), with its seed."""
    recipe = dict(suite["pretrain"][backbone])
    if recipe["dataset"] == "medmnist-other":
        recipe["dataset"] = OTHER[dataset]
    recipe.setdefault("seed", suite.get("seed", 0))
    if seed is not None:
        recipe["seed"] = int(seed)
    return recipe


def recipe_key(recipe: dict[str, Any]) -> str:
    """A short hash of the recipe: names its cached checkpoint."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def missing_medmnist(name: str, data_root: str | None) -> str | None:
    """Why MedMNIST ``name`` cannot be read from the data root (None: it is there)."""
    from metafew.data.medmnist import _candidates, find_medmnist

    if find_medmnist(name, data_root) is not None:
        return None
    looked = ", ".join(str(p) for p in _candidates(name, data_root))
    return f"{name}: not in the data root (looked for {looked}); skipped — download with `metafew data download {name}`"


# -- backbones --------------------------------------------------------------------------


def pretraining_data(recipe: dict[str, Any], data_root: str | None):
    from metafew.data.caltech101 import Caltech101
    from metafew.data.medmnist import MedMNIST
    from metafew.data.omniglot import Omniglot

    name, subset, size = recipe["dataset"], recipe.get("subset", "train"), int(recipe.get("image_size", 28))
    if name == "omniglot":
        split = "lake" if subset in ("background", "evaluation") else "vinyals"
        return Omniglot(subset, split=split, root=data_root, image_size=size)
    if name == "caltech101":
        return Caltech101(subset, root=data_root, image_size=size)
    return MedMNIST(name, subset, root=data_root)


def backbone_provenance(recipe: dict[str, Any], data_root: str | None) -> dict[str, Any]:
    """What decides the weights of ``recipe``'s backbone, recorded as metafew records a suite's (``pretrain_provenance``).

    The recipe's own key, the metafew and torch versions, the code of the modules that
    compute the weights (pretraining loop, data loading and decoding, the backbone's and
    the dataset's modules) and the pretraining data's fingerprint (file list and sizes, or
    the ``.npz``'s md5): a cached backbone is reused only while all of them are the same.
    """
    from metafew.bench.provenance import FORMAT, pretrain_modules
    from metafew.cache_keys import code_checksum, dataset_fingerprint, library_versions
    from metafew.config import PretrainConfig

    modules = pretrain_modules(PretrainConfig(dataset=recipe["dataset"], backbone=recipe["arch"]))
    return {
        "format": FORMAT,
        "recipe_key": recipe_key(recipe),
        "versions": library_versions(),
        "code": code_checksum(modules),
        "data": dataset_fingerprint(recipe["dataset"], data_root, mtimes=False),
    }


def ensure_backbone(
    recipe: dict[str, Any], folder: Path, device: torch.device, data_root: str | None, log: Log
) -> Path:
    """The recipe's checkpoint: the cached one while what made it holds (:func:`backbone_provenance`), else pretrained now."""
    from metafew import pretrain
    from metafew.bench.provenance import changes, provenance_key, read_provenance, write_provenance

    current = backbone_provenance(recipe, data_root)
    stem = f"{recipe['arch']}-{recipe['dataset']}-{recipe_key(recipe)}"
    path = folder / f"{stem}-{provenance_key(current)}.safetensors"
    if path.exists():
        if read_provenance(path) is None:  # the name holds the key; the record beside it was lost
            write_provenance(path, current)
        return path
    earlier = sorted(folder.glob(f"{stem}-*.safetensors"), key=lambda p: p.stat().st_mtime)
    known = [r for r in map(read_provenance, earlier) if r is not None]
    if known:
        log(f"cached backbone {stem} is stale ({', '.join(changes(known[-1], current)) or 'its record'} changed)")
    elif (folder / f"{stem}.safetensors").exists():
        log(f"not reusing {folder / f'{stem}.safetensors'}: cached before its torch version and code were recorded")
    ds = pretraining_data(recipe, data_root)
    log(
        f"pretraining {recipe['arch']} on {ds.name} ({len(ds)} images, {ds.num_classes} classes, "
        f"{recipe['epochs']} epochs, seed {recipe['seed']}) -> {path}"
    )
    t0 = time.perf_counter()
    pretrain(
        recipe["arch"], ds, epochs=int(recipe["epochs"]), lr=float(recipe.get("lr", 0.05)),
        batch_size=int(recipe.get("batch_size", 128)), seed=int(recipe["seed"]), device=device,
        out=path, progress=sys.stderr.isatty(),
    )  # fmt: skip
    write_provenance(path, current)
    log(f"  pretrained in {time.perf_counter() - t0:.0f} s")
    return path


# -- scoring draws ----------------------------------------------------------------------


def support_plan(pool_labels: torch.Tensor, classes: Sequence[str], shots: int) -> list[int]:
    """Per-class support sizes of a draw scored on a separate test set (as :func:`metafew.adaptation.estimate`)."""
    from metafew.adaptation.estimate import support_sizes

    counts = torch.bincount(pool_labels, minlength=len(classes)).tolist()
    return support_sizes(counts, shots, classes)[1]


def draw_indices(pool_labels: torch.Tensor, sizes: Sequence[int], seed: int, draw: int) -> torch.Tensor:
    """Support indices of draw number ``draw``: the same draw :func:`metafew.adaptation.estimate` makes."""
    from metafew.adaptation.estimate import draw_support
    from metafew.seeding import generator

    return draw_support(pool_labels, sizes, generator(seed, f"draw-{draw}"))[0]


def draw_metrics(log_probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    """Accuracy, balanced accuracy and macro AUC of one draw's scores on the test images."""
    from metafew.adaptation.metrics import compute_metrics

    m = compute_metrics(log_probs, labels, classes)
    return {"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "auc": m.auc}


def model_draws(
    dataset: str, backbone_path: Path, method: str, shots: int, draws: int, seed: int, options: dict[str, Any],
    device: torch.device, data_root: str | None, split: str = "test", bn_stats: str = "support",
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Adapt to ``draws`` support draws (as :func:`metafew.adaptation.estimate` does) and score each on ``split``.

    Returns the log-probabilities ``[draws, M, classes]`` on the ``M`` images of ``split``
    and facts on the run (options, seconds).
    """
    from metafew.adaptation import DEFAULT_OPTIONS, resolve_backbone
    from metafew.adaptation.estimate import adapt_on, deployment_policy, predict_logits
    from metafew.data.medmnist import MedMNIST
    from metafew.learners import create
    from metafew.seeding import derive_seed

    t0 = time.perf_counter()
    pool = MedMNIST(dataset, "train", root=data_root)
    test = MedMNIST(dataset, split, root=data_root)
    module, prep, _ = resolve_backbone(str(backbone_path), device=device)
    opts = {**DEFAULT_OPTIONS[method], **options}
    learner = create(method, module, **opts).to(device).eval()
    bn = deployment_policy(learner, bn_stats, "support")  # type: ignore[arg-type]
    sizes = support_plan(pool.labels, pool.classes, shots)
    images, labels = pool.images, pool.labels
    out = []
    for i in range(draws):
        support = draw_indices(labels, sizes, seed, i)
        clf = adapt_on(learner, images, labels, support, prep, device, derive_seed(seed, f"adapt-{i}"), bn)
        out.append(predict_logits(clf, test.images, prep, device).log_softmax(-1))
        del clf
    return torch.stack(out), {"options": opts, "bn_stats": bn_stats, "seconds": round(time.perf_counter() - t0, 2)}


def baseline_draws(
    dataset: str, baseline: str, shots: int, draws: int, seed: int, device: torch.device, data_root: str | None,
    split: str = "test",
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Log-probabilities ``[draws, M, classes]`` of a pixel baseline (``BASELINE_ROWS``) on the same draws."""
    from metafew.adaptation.baselines import BASELINES, log_probabilities
    from metafew.data.medmnist import MedMNIST

    t0 = time.perf_counter()
    fn_name = BASELINE_ROWS[baseline]
    pool = MedMNIST(dataset, "train", root=data_root)
    test = MedMNIST(dataset, split, root=data_root)
    sizes = support_plan(pool.labels, pool.classes, shots)
    xq = test.images.to(device)
    out = []
    for i in range(draws):
        support = draw_indices(pool.labels, sizes, seed, i)
        # as metafew.adapt's estimate scores them; -inf (a class absent from the support) stays -inf
        out.append(
            log_probabilities(fn_name, pool.images[support].to(device), pool.labels[support], xq, len(pool.classes))
        )
    return torch.stack(out), {"description": BASELINES[fn_name], "seconds": round(time.perf_counter() - t0, 2)}


def auto_draws(
    dataset: str, methods: Sequence[str], shots: int, draws: int, seed: int, device: torch.device,
    data_root: str | None, candidates: Sequence[str] = (), split: str = "test", bn_stats: str = "support",
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Log-probabilities ``[draws, M, classes]`` on ``split`` of the backbone and method chosen per draw.

    ``metafew adapt --backbone auto``'s nested selection (:class:`metafew.adaptation.select.Selection`):
    every shipped backbone (and ``candidates``) under each of ``methods``; each draw
    chooses by the inner k-fold balanced accuracy on its own support images only (the
    same draws as :func:`baseline_draws` and :func:`model_draws`), adapts the choice to
    them, and is scored on ``split``, which the choice never sees: what
    ``metafew.adaptation.estimate.estimate(choose=Selection.choose, test=...)`` does.
    The final model's choice on all labelled images (``Selection.choose_all``) plays no part in it and is not made.
    """
    from metafew.adaptation.core import default_options
    from metafew.adaptation.estimate import adapt_on, predict_logits
    from metafew.adaptation.select import Selection, candidate_backbones, folds_for
    from metafew.data.medmnist import MedMNIST
    from metafew.seeding import derive_seed

    t0 = time.perf_counter()
    pool = MedMNIST(dataset, "train", root=data_root)
    test = MedMNIST(dataset, split, root=data_root)
    sel = Selection(
        pool, candidate_backbones(candidates), list(methods), default_options={m: default_options(m) for m in methods},
        options={}, device=device, data_root=data_root, skip_bad=False, bn_stats=bn_stats,  # type: ignore[arg-type]
        query_bn="support", seed=seed,
    )  # fmt: skip
    sizes = support_plan(pool.labels, pool.classes, shots)
    out, chosen = [], []
    for i in range(draws):
        support = draw_indices(pool.labels, sizes, seed, i)
        c = sel.choose(i, support)  # from the support images alone
        clf = adapt_on(c.learner, c.images, pool.labels, support, c.prep, device, derive_seed(seed, f"adapt-{i}"), c.bn)
        out.append(predict_logits(clf, test.images, c.prep, device).log_softmax(-1))
        chosen.append(c.name)
        del clf
    counts = {c.name: chosen.count(c.name) for c in sel.candidates}
    return torch.stack(out), {
        "candidates": [{k: v for k, v in c.describe().items() if k != "inner_score"} for c in sel.candidates],
        "chosen_per_draw": chosen, "chosen_counts": counts, "inner_folds": folds_for(sizes), "bn_stats": bn_stats,
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


# -- intervals --------------------------------------------------------------------------


_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5th percentile of Student's t with ``df`` degrees of freedom (tabulated to 30, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "ci95"}``: mean and 1.96 std / sqrt(n) (None for one value)."""
    v = np.asarray(values, dtype=np.float64)
    ci = float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "ci95": ci}


def seed_interval(table: np.ndarray) -> dict[str, Any]:
    """``table[seed, draw]`` -> per-seed means over draws and their Student-t 95% interval over seeds."""
    per_seed = np.nanmean(table, axis=1)
    s = len(per_seed)
    ci = float(t_quantile(s - 1) * per_seed.std(ddof=1) / math.sqrt(s)) if s > 1 else None
    return {"mean": float(per_seed.mean()), "ci95": ci, "per_seed": [float(x) for x in per_seed], "seeds": s}


def pooled_interval(table: np.ndarray) -> dict[str, Any]:
    """``table[seed, draw]`` -> grand mean and its 95% interval with seeds and draws both random (crossed design)."""
    s, d = table.shape
    grand = float(table.mean())
    out: dict[str, Any] = {"mean": grand, "ci95": None}
    if s < 2 or d < 2:
        return out
    seed_means, draw_means = table.mean(1), table.mean(0)
    ms_seed = d * float(((seed_means - grand) ** 2).sum()) / (s - 1)
    ms_draw = s * float(((draw_means - grand) ** 2).sum()) / (d - 1)
    resid = table - seed_means[:, None] - draw_means[None, :] + grand
    ms_res = float((resid**2).sum()) / ((s - 1) * (d - 1))
    var = max(ms_seed + ms_draw - ms_res, ms_res) / (s * d)
    out["ci95"] = float(1.96 * math.sqrt(var))
    out["variance_components"] = {
        "seed": max((ms_seed - ms_res) / d, 0.0),
        "draw": max((ms_draw - ms_res) / s, 0.0),
        "residual": ms_res,
    }
    return out


def bootstrap_cell(
    log_probs: torch.Tensor, labels: torch.Tensor, num_classes: int, resamples: int, seed: int
) -> dict[str, tuple[float, float] | None]:
    """Percentile 95% intervals of the mean over runs of accuracy, balanced accuracy and AUC, resampling test images.

    ``log_probs``: ``[runs, M, C]`` (runs: seeds x draws) on the same ``M`` test images.
    Accuracy and balanced accuracy use :func:`metafew.adaptation.metrics.bootstrap_draws_interval`;
    the AUC resamples the same way, each replicate's image multiset shared by all runs.
    """
    from metafew.adaptation.metrics import bootstrap_draws_interval
    from metafew.engine.evaluate import macro_auc

    runs, m = log_probs.shape[:2]
    y = labels.long()
    idx = np.arange(m)
    correct = (log_probs.argmax(-1) == y).numpy()
    out: dict[str, tuple[float, float] | None] = dict(
        bootstrap_draws_interval(
            [(idx, y.numpy(), correct[r]) for r in range(runs)], m, num_classes, resamples=resamples, seed=seed
        )
    )
    gen = torch.Generator().manual_seed(seed + 1)
    picks = torch.randint(0, m, (resamples, m), generator=gen)
    total = torch.zeros(resamples, dtype=torch.float64)
    count = torch.zeros(resamples, dtype=torch.float64)
    chunk = max(1, 2_000_000 // max(m * num_classes, 1))
    for r in range(runs):
        s = log_probs[r].double().nan_to_num(neginf=-1e30)
        for a in range(0, resamples, chunk):
            p = picks[a : a + chunk]
            auc = macro_auc(s[p], y[p], num_classes)
            ok = ~auc.isnan()
            total[a : a + chunk] += torch.where(ok, auc, 0.0)
            count[a : a + chunk] += ok.double()
    rep = (total / count)[count > 0]
    out["auc"] = None
    if rep.numel() >= resamples // 2:
        lo, hi = np.percentile(rep.numpy(), [2.5, 97.5])
        out["auc"] = (float(lo), float(hi))
    return out


def summarise(
    log_probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], resamples: int, seed: int
) -> dict[str, Any]:
    """Per-draw metrics and every interval of a cell; ``log_probs``: ``[seeds, draws, M, C]``."""
    s, d = log_probs.shape[:2]
    per = [[draw_metrics(log_probs[i, j], labels, classes) for j in range(d)] for i in range(s)]
    cell: dict[str, Any] = {"per_draw": {}, "metrics": {}}
    for metric in METRICS:
        table = np.array([[np.nan if x[metric] is None else x[metric] for x in row] for row in per], dtype=np.float64)
        cell["per_draw"][metric] = table.tolist()  # [seed][draw]
        if np.isnan(table).all():
            cell["metrics"][metric] = None
            continue
        first = table[0][~np.isnan(table[0])]
        cell["metrics"][metric] = {
            "draws": {**mean_ci(first), "seed_index": 0, "low": float(np.percentile(first, 2.5)),
                      "high": float(np.percentile(first, 97.5))},
            "seeds": seed_interval(table),
            "pooled": pooled_interval(np.nan_to_num(table, nan=float(np.nanmean(table)))),
        }  # fmt: skip
    if resamples:
        boot = bootstrap_cell(log_probs.flatten(0, 1), labels, len(classes), resamples, seed)
        for metric in METRICS:
            if cell["metrics"][metric] is not None:
                cell["metrics"][metric]["test_bootstrap"] = boot.get(metric)
    for metric in METRICS:  # flat figures, for the plots and a quick look
        mm = cell["metrics"][metric]
        cell[metric] = None if mm is None else mm["pooled"]["mean"]
        cell[f"{metric}_ci95"] = None if mm is None else (mm["seeds"]["ci95"] or mm["draws"]["ci95"])
    return cell


def paired_differences(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Model minus baseline on the same draws: over draws (model averaged over seeds) and per seed."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        a = np.asarray(model["per_draw"][metric], dtype=np.float64)  # [seeds, draws]
        b = np.asarray(baseline["per_draw"][metric], dtype=np.float64)[0]  # [draws]
        if a.shape[1] != b.shape[0]:
            continue
        diff = a - b[None, :]
        avg = np.nanmean(diff, axis=0)
        avg = avg[~np.isnan(avg)]
        if len(avg) == 0:
            continue
        entry: dict[str, Any] = mean_ci(avg)
        entry["per_seed"] = [mean_ci(row[~np.isnan(row)]) for row in diff]
        entry["excludes_zero"] = entry["ci95"] is not None and abs(entry["mean"]) > entry["ci95"]
        out[metric] = entry
    return out


def best_cells(results: dict[str, Any]) -> dict[tuple[str, int], str]:
    """Per (dataset, K): the key of the model cell with the highest mean balanced accuracy."""
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for key, c in results["cells"].items():
        if c.get("kind") != "model" or c.get("balanced_accuracy") is None:
            continue
        k = (c["dataset"], c["shots"])
        if k not in best or c["balanced_accuracy"] > best[k][0]:
            best[k] = (c["balanced_accuracy"], key)
    return {k: v[1] for k, v in best.items()}


def compare_to_baselines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per dataset and K: the best model cell, and its paired difference to each baseline cell on the same draws."""
    rows = []
    for (dataset, shots), key in sorted(best_cells(results).items()):
        model = results["cells"][key]
        row: dict[str, Any] = {
            "dataset": dataset, "shots": shots, "model": {k: model[k] for k in ("backbone", "method")},
            "pretrain_seeds": model["pretrain_seeds"], "baselines": {},
        }  # fmt: skip
        for c in results["cells"].values():
            same = c["dataset"] == dataset and c["shots"] == shots and c["draws"] == model["draws"]
            if c.get("kind") == "baseline" and same and c["draw_seed"] == model["draw_seed"]:
                row["baselines"][c["method"]] = paired_differences(model, c)
        if row["baselines"]:
            rows.append(row)
    return rows


def compare_auto_to_baselines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per automatic-choice cell (``--auto``): its paired difference to each baseline cell on the same draws.

    Unlike :func:`compare_to_baselines`, nothing is chosen on the test split: each draw's
    backbone and method were chosen on its support images. ``beats``: the 95% CI of the
    difference lies above 0 on both balanced accuracy and AUC.
    """
    rows = []
    for c in results["cells"].values():
        if c.get("kind") != "auto":
            continue
        row: dict[str, Any] = {
            "dataset": c["dataset"], "shots": c["shots"], "methods": c["methods"], "draws": c["draws"],
            "chosen_counts": c["chosen_counts"], "baselines": {},
        }  # fmt: skip
        for b in results["cells"].values():
            same = b["dataset"] == c["dataset"] and b["shots"] == c["shots"] and b["draws"] == c["draws"]
            if b.get("kind") == "baseline" and same and b["draw_seed"] == c["draw_seed"]:
                d = paired_differences(c, b)
                for x in d.values():
                    x.pop("per_seed", None)  # one "seed": the shipped backbones as they are
                    x["above_zero"] = x["ci95"] is not None and x["mean"] - x["ci95"] > 0
                d["beats"] = all(d.get(m, {}).get("above_zero", False) for m in ("balanced_accuracy", "auc"))
                row["baselines"][b["method"]] = d
        rows.append(row)
    return sorted(rows, key=lambda r: (r["dataset"], r["shots"]))


# -- reporting --------------------------------------------------------------------------


def _iv(m: dict[str, Any] | None, part: str) -> str:
    if m is None or m.get(part) is None:
        return "n/a"
    p = m[part]
    if part == "test_bootstrap":
        return f"{p[0]:.3f}–{p[1]:.3f}"
    return f"{p['mean']:.3f} ± {p['ci95']:.3f}" if p.get("ci95") is not None else f"{p['mean']:.3f}"


def write_markdown(results: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    """The tables: every cell with its draw, seed, pooled and bootstrap intervals; then the baseline comparison."""
    meta = results["meta"]
    lines = [f"# {suite.get('description', 'medical')}", ""]
    lines.append(
        f"{meta['draws']} support draws per cell (draw seed {meta['seed']}), backbones pretrained with seeds "
        f"{', '.join(map(str, meta['pretrain_seeds']))}, scored on the whole official test split. "
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}."
    )
    lines += ["", "What each interval covers:", ""]
    lines += [f"- **{k}**: {v}." for k, v in INTERVALS.items()]
    lines.append("")
    for skipped in results.get("skipped", []):
        lines += [f"- {skipped}", ""]
    for ds in suite["datasets"]:
        ref = suite.get("reference", {}).get(ds, {})
        cells = [c for c in results["cells"].values() if c["dataset"] == ds]
        if not cells:
            continue
        lines += [
            f"## {ds} (test split: {cells[0]['test_images']} images; majority class rate {cells[0]['majority_rate']:.3f})",
            "",
        ]
        if ref:
            lines += [
                f"Reference: {ref.get('source', '')}: accuracy {ref.get('accuracy', 'n/a')}, AUC {ref.get('auc', 'n/a')} "
                "(trained on the whole training split).",
                "",
            ]
        for metric in METRICS:
            lines += [
                f"{metric.replace('_', ' ')}:",
                "",
                "| backbone | method | K | seeds | draws (first seed) | over seeds (t) | draws x seeds | test bootstrap |",
                "|---|---|---:|---:|---|---|---|---|",
            ]
            for c in sorted(cells, key=lambda c: (c["backbone"] or "", c["method"], c["shots"])):
                m = c["metrics"][metric]
                lines.append(
                    f"| {c['backbone'] or '—'} | {c['method']} | {c['shots']} | {len(c['pretrain_seeds']) or '—'} | "
                    f"{_iv(m, 'draws')} | {_iv(m, 'seeds')} | {_iv(m, 'pooled')} | {_iv(m, 'test_bootstrap')} |"
                )
            lines.append("")
    comparison = results.get("comparison") or []
    if comparison:
        lines += [
            "## Best model cell minus each baseline, paired on the same draws (mean ± 95% CI over draws)",
            "",
            "| dataset | K | model | baseline | balanced acc. | AUC | accuracy |",
            "|---|---:|---|---|---|---|---|",
        ]
        for row in comparison:
            for name, d in row["baselines"].items():

                def fmt(metric: str, d: dict[str, Any] = d) -> str:
                    x = d.get(metric)
                    if not x:
                        return "n/a"
                    star = "" if x["excludes_zero"] else " (CI includes 0)"
                    return f"{x['mean']:+.3f} ± {x['ci95']:.3f}{star}"

                model = f"{row['model']['backbone']} {row['model']['method']} ({len(row['pretrain_seeds'])} seeds)"
                lines.append(
                    f"| {row['dataset']} | {row['shots']} | {model} | {name} | {fmt('balanced_accuracy')} | "
                    f"{fmt('auc')} | {fmt('accuracy')} |"
                )
        lines.append("")
    auto = results.get("auto_comparison") or []
    if auto:
        lines += [
            "## Backbone and method chosen per draw on its support images (`metafew adapt --backbone auto`) "
            "minus each baseline, paired on the same draws (mean ± 95% CI over draws)",
            "",
            "| dataset | K | methods tried | chosen (draws) | baseline | balanced acc. | AUC | accuracy | beats |",
            "|---|---:|---|---|---|---|---|---|---|",
        ]
        for row in auto:
            chosen = ", ".join(f"{n} {k}" for n, k in row["chosen_counts"].items() if k)
            for name, d in row["baselines"].items():

                def fmt_auto(metric: str, d: dict[str, Any] = d) -> str:
                    x = d.get(metric)
                    if not x:
                        return "n/a"
                    ci = "n/a" if x["ci95"] is None else f"{x['ci95']:.3f}"
                    return f"{x['mean']:+.3f} ± {ci}" + ("" if x["above_zero"] else " (CI not above 0)")

                lines.append(
                    f"| {row['dataset']} | {row['shots']} | {', '.join(row['methods'])} | {chosen} | {name} | "
                    f"{fmt_auto('balanced_accuracy')} | {fmt_auto('auc')} | {fmt_auto('accuracy')} | "
                    f"{'yes' if d['beats'] else '**no**'} |"
                )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, Any], suite: dict[str, Any], metric: str, path: Path) -> None:
    """Metric against K, one panel per dataset and backbone, one line per method (baselines dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"].values() if c[metric] is not None]
    models = [c for c in cells if c.get("kind") == "model"]
    datasets = [d for d in suite["datasets"] if any(c["dataset"] == d for c in models)]
    backbones = [b for b in suite["backbones"] if any(c["backbone"] == b for c in models)]
    if not datasets or not backbones:
        return
    fig, axes = plt.subplots(
        len(datasets), len(backbones), figsize=(4.2 * len(backbones), 3.4 * len(datasets)), squeeze=False, sharey="row"
    )
    for i, ds in enumerate(datasets):
        ref = suite.get("reference", {}).get(ds, {})
        for j, bb in enumerate(backbones):
            ax = axes[i][j]
            lines = [(m, bb, "-") for m in suite["methods"]] + [(b, None, ":") for b in BASELINE_ROWS]
            for method, backbone, style in lines:
                pts = sorted((c["shots"], c[metric], c[f"{metric}_ci95"] or 0.0) for c in cells
                             if c["dataset"] == ds and c["backbone"] == backbone and c["method"] == method)  # fmt: skip
                if pts:
                    k, m, ci = zip(*pts)
                    ax.errorbar(k, m, yerr=ci, marker="o", capsize=3, ls=style, label=method)
            if metric in ref:
                ax.axhline(ref[metric], ls="--", color="gray", label=f"ResNet-18, all {ds} train ({ref[metric]:.3f})")
            if metric == "accuracy":
                maj = next(c["majority_rate"] for c in cells if c["dataset"] == ds)
                ax.axhline(maj, ls=":", color="red", label=f"majority class ({maj:.3f})")
            ax.set_xscale("log", base=2)
            ks = sorted({c["shots"] for c in cells})
            ax.set_xticks(ks, labels=[str(k) for k in ks])
            ax.set_title(f"{ds} - backbone: {bb}", fontsize=9)
            ax.set_xlabel("K (support images per class)")
            if j == 0:
                ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- MAML / fine-tuning option sweep on the validation split ------------------------------


TUNE_GRID: dict[str, list[dict[str, Any]]] = {
    "maml": [{"test_inner_lr": lr, "test_inner_steps": s} for lr in (0.001, 0.01, 0.05, 0.2) for s in (5, 10)],
    "finetune": [{"lr": lr, "steps": s} for lr in (0.01, 0.1) for s in (100, 300)],
}


def tune(args: argparse.Namespace, suite: dict[str, Any], device: torch.device, backbone_dir: Path, log: Log) -> None:
    """Score each option set of TUNE_GRID on PneumoniaMNIST's validation split (never the test split)."""
    from metafew.data.medmnist import MedMNIST

    recipe = recipe_for(suite, "omniglot", "pneumoniamnist")
    path = ensure_backbone(recipe, backbone_dir, device, args.data_root, log)
    val = MedMNIST("pneumoniamnist", "val", root=args.data_root)
    for method, grid in TUNE_GRID.items():
        for opts in grid:
            for k in (5, 10):
                lp, facts = model_draws(
                    "pneumoniamnist", path, method, k, args.draws or 20, 1000 + suite["seed"], opts, device,
                    args.data_root, split="val",
                )  # fmt: skip
                r = summarise(lp[None], val.labels, val.classes, 0, 0)
                log(
                    f"{method} {opts} K={k}: val accuracy {r['accuracy']:.3f}, balanced {r['balanced_accuracy']:.3f}, "
                    f"AUC {r['auc']:.3f} ({facts['seconds']:.0f} s)"
                )


# -- main -------------------------------------------------------------------------------


def _save(results: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def _line(cell: dict[str, Any]) -> str:
    parts = []
    for metric in METRICS:
        m = cell["metrics"][metric]
        if m is None:
            continue
        text = f"{metric} {_iv(m, 'draws')} (seeds {_iv(m, 'seeds')}"
        if m.get("test_bootstrap"):
            text += f", bootstrap {_iv(m, 'test_bootstrap')}"
        parts.append(text + ")")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the suite's cells (resuming), then write the JSON, the tables and the plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=SUITE, help="suite TOML")
    parser.add_argument("--quick", action="store_true", help="the [quick] settings of the suite")
    parser.add_argument("--out", type=Path, help="results folder (default results/medical[-quick])")
    parser.add_argument("--name", default="medical", help="stem of the output files (default medical)")
    parser.add_argument(
        "--backbone-dir", type=Path, help="pretrained backbone cache (default <metafew cache>/pretrained/medical)"
    )
    parser.add_argument("--data-root", help="dataset root (default $METAFEW_DATA)")
    parser.add_argument("--datasets", nargs="+", help="subset of the suite's datasets")
    parser.add_argument("--backbones", nargs="+", help="subset of the suite's backbones")
    parser.add_argument("--methods", nargs="+", help="subset of the suite's methods")
    parser.add_argument("--shots", nargs="+", type=int, help="subset of the suite's K values")
    parser.add_argument("--draws", type=int, help="support draws per cell (default: the suite's)")
    parser.add_argument(
        "--pretrain-seeds", nargs="+", type=int, help="pretrain each backbone once per seed (default: the suite's)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="test-set bootstrap resamples per cell (0: none; default 1000)"
    )
    parser.add_argument(
        "--baselines", choices=["on", "off", "only"], default="on",
        help="pixel baseline rows at every dataset and K: with the model cells (on), not at all, or alone (only)",
    )  # fmt: skip
    parser.add_argument(
        "--auto", action="store_true",
        help="instead of the suite's backbone x method cells, score the backbone and method chosen per draw by "
        "`metafew adapt --backbone auto`'s nested selection on the support images (among the shipped backbones "
        "and --candidates, under --methods, default protonet), paired with the baselines on the same draws",
    )  # fmt: skip
    parser.add_argument(
        "--candidates", nargs="+", default=[], help="with --auto: backbone files tried besides the shipped ones"
    )
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and the tables only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tune", action="store_true", help="run the option sweep on the validation split instead")
    args = parser.parse_args(argv)

    from metafew.data.medmnist import MedMNIST
    from metafew.device import resolve_device
    from metafew.paths import cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite, args.quick)
    for key in ("datasets", "backbones", "methods", "shots", "pretrain_seeds"):
        if getattr(args, key):
            suite[key] = getattr(args, key)
    if args.draws and not args.tune:
        suite["draws"] = args.draws
    seeds = [int(s) for s in suite.get("pretrain_seeds", [suite.get("seed", 0)])]
    device = resolve_device(args.device)
    out = args.out or Path("results") / ("medical-quick" if args.quick else "medical")
    out.mkdir(parents=True, exist_ok=True)
    backbone_dir = args.backbone_dir or cache_dir() / "pretrained" / "medical"
    backbone_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.tune:
        tune(args, suite, device, backbone_dir, log)
        return 0

    results_path = out / f"{args.name}.json"
    results: dict[str, Any] = {"cells": {}}
    if results_path.exists():
        results = json.loads(results_path.read_text())
    results["meta"] = {
        "suite": str(args.suite), "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "draws": suite["draws"], "seed": suite["seed"], "pretrain_seeds": seeds, "bootstrap": args.bootstrap,
        "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": torch.get_num_threads(),
        "device": f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if device.type == "cpu" else torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "intervals": INTERVALS,
    }  # fmt: skip
    results.setdefault("commands", []).append({k: results["meta"][k] for k in ("command", "date", "torch", "device")})
    # what could not be run, kept across resumed runs (a list of lines; one found later drops out)
    earlier = [line for line in results.get("skipped", []) if not line.startswith(tuple(suite["datasets"]))]
    skipped: list[str] = []
    datasets = []
    for dataset in suite["datasets"]:
        why = missing_medmnist(dataset, args.data_root)
        if why is None:
            datasets.append(dataset)
        else:
            skipped.append(why)
            log(why)
    from metafew.adaptation.select import DEFAULT_METHODS

    auto_methods = list(args.methods or DEFAULT_METHODS) if args.auto and args.baselines != "only" else []
    methods = [] if args.baselines == "only" or args.auto else suite["methods"]
    baselines = [] if args.baselines == "off" else list(BASELINE_ROWS)
    cells_per_k = len(suite["backbones"]) * len(methods) + len(baselines) + (1 if auto_methods else 0)
    total = len(datasets) * len(suite["shots"]) * cells_per_k
    done = 0
    start = time.perf_counter()
    draws, draw_seed = suite["draws"], suite["seed"]
    for dataset in datasets:
        test = MedMNIST(dataset, "test", root=args.data_root)
        counts = torch.bincount(test.labels, minlength=len(test.classes))
        facts = {"test_images": len(test), "majority_rate": float(counts.max() / counts.sum())}
        for k in suite["shots"]:
            for baseline in baselines:
                done += 1
                key = json.dumps([dataset, "baseline", baseline, k, draws, draw_seed, args.bootstrap])
                if key in results["cells"]:
                    continue
                lp, info = baseline_draws(dataset, baseline, k, draws, draw_seed, device, args.data_root)
                cell = summarise(lp[None], test.labels, test.classes, args.bootstrap, draw_seed)
                cell.update(
                    kind="baseline", dataset=dataset, backbone=None, method=baseline, shots=k, draws=draws,
                    draw_seed=draw_seed, pretrain_seeds=[], **facts, **info,
                )  # fmt: skip
                results["cells"][key] = cell
                _save(results, results_path)
                log(f"[{done}/{total}] {dataset} {baseline} K={k}: {_line(cell)} ({info['seconds']:.0f} s)")
            if auto_methods:
                done += 1
                bn = suite.get("bn_stats", "support")
                key = json.dumps(
                    [dataset, "auto", auto_methods, args.candidates, bn, k, draws, draw_seed, args.bootstrap]
                )
                if key not in results["cells"]:
                    lp, info = auto_draws(
                        dataset, auto_methods, k, draws, draw_seed, device, args.data_root, args.candidates,
                        bn_stats=bn,
                    )  # fmt: skip
                    cell = summarise(lp[None], test.labels, test.classes, args.bootstrap, draw_seed)
                    cell.update(
                        kind="auto", dataset=dataset, backbone="auto", method="auto: " + ",".join(auto_methods),
                        methods=auto_methods, shots=k, draws=draws, draw_seed=draw_seed, pretrain_seeds=[],
                        extra_candidates=list(args.candidates), **facts, **info,
                    )  # fmt: skip
                    results["cells"][key] = cell
                    _save(results, results_path)
                    log(
                        f"[{done}/{total}] {dataset} auto ({','.join(auto_methods)}) K={k}: {_line(cell)}; chosen "
                        f"{info['chosen_counts']} ({info['seconds']:.0f} s)"
                    )
        for backbone in suite["backbones"] if methods else []:
            recipes = [recipe_for(suite, backbone, dataset, s) for s in seeds]
            reason = missing_medmnist(recipes[0]["dataset"], args.data_root) if recipes[0]["dataset"] in OTHER else None
            if reason is not None:
                log(f"{dataset}: backbone {backbone} cannot be pretrained: {reason}")
                skipped.append(f"{dataset} x {backbone}: pretraining data missing: {reason}")
                done += len(methods) * len(suite["shots"])
                continue
            paths = [ensure_backbone(r, backbone_dir, device, args.data_root, log) for r in recipes]
            for method in methods:
                options = dict(suite.get("options", {}).get(method, {}))
                bn = suite.get("bn_stats", "support")
                for k in suite["shots"]:
                    done += 1
                    key = json.dumps(
                        [dataset, backbone, [p.stem for p in paths], method, options, bn, k, draws,
                         draw_seed, args.bootstrap]
                    )  # fmt: skip
                    if key in results["cells"]:
                        continue
                    runs = [
                        model_draws(
                            dataset, p, method, k, draws, draw_seed, options, device, args.data_root, bn_stats=bn
                        )
                        for p in paths
                    ]
                    lp = torch.stack([r[0] for r in runs])
                    cell = summarise(lp, test.labels, test.classes, args.bootstrap, draw_seed)
                    cell.update(
                        kind="model", dataset=dataset, backbone=backbone, method=method, shots=k, draws=draws,
                        draw_seed=draw_seed, pretrain_seeds=seeds, backbone_checkpoints=[p.name for p in paths],
                        options=runs[0][1]["options"], bn_stats=bn, seconds=sum(r[1]["seconds"] for r in runs), **facts,
                    )  # fmt: skip
                    results["cells"][key] = cell
                    _save(results, results_path)
                    log(
                        f"[{done}/{total}] {dataset} {backbone} {method} K={k}: {_line(cell)} "
                        f"({cell['seconds']:.0f} s; {time.perf_counter() - start:.0f} s so far)"
                    )
    results["skipped"] = earlier + skipped
    results["comparison"] = compare_to_baselines(results)
    results["auto_comparison"] = compare_auto_to_baselines(results)
    for row in results["auto_comparison"]:
        for name, d in row["baselines"].items():
            shown = ", ".join(
                f"{m} {d[m]['mean']:+.3f} ± {d[m]['ci95'] if d[m]['ci95'] is None else round(d[m]['ci95'], 3)}"
                for m in METRICS if m in d
            )  # fmt: skip
            verdict = "beats" if d["beats"] else "does NOT beat"
            log(f"{row['dataset']} K={row['shots']}: the automatic choice {verdict} {name} ({shown})")
    _save(results, results_path)
    write_markdown(results, suite, out / f"{args.name}.md")
    written = [results_path, out / f"{args.name}.md"]
    if not args.no_plots:
        for metric in ("accuracy", "auc"):
            plot(results, suite, metric, out / f"{args.name}_{metric}.png")
            written.append(out / f"{args.name}_{metric}.png")
    log("results: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
