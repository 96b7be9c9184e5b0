#!/usr/bin/env python
"""Few-shot adaptation to MedMNIST (PneumoniaMNIST, BreastMNIST): the suite benchmarks/suites/medical.toml.

For every dataset x backbone x method x K, ``draws`` seeded support draws of K images per
class from the official train split are adapted to (exactly as ``metafew adapt`` does)
and each is scored on the whole official test split: accuracy, balanced accuracy and AUC
with 95% CIs over draws, beside the MedMNIST v2 ResNet-18 figures and the test split's
majority-class rate.

Backbones are pretrained with :func:`metafew.pretrain` when their checkpoint is missing,
and cached in ``--backbone-dir`` (default ``<metafew cache>/pretrained/medical``), named by
a hash of their recipe, so a changed recipe never reuses a stale checkpoint.
Results are written after every cell to ``<out>/medical.json``; a rerun skips the cells
already there (same settings), so an interrupted run resumes.

    python benchmarks/medical.py                       # the whole suite (see --help for run time)
    python benchmarks/medical.py --quick               # a smoke run, minutes on a CPU
    python benchmarks/medical.py --datasets pneumoniamnist --methods protonet --shots 10
    python benchmarks/medical.py --tune                # the MAML / fine-tuning option sweep on the VALIDATION split

Outputs in --out (default results/medical, or results/medical-quick): medical.json,
medical.md (tables), medical_accuracy.png and medical_auc.png (metric against K, one
panel per dataset and backbone, one line per method, the ResNet-18 figure dashed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
SUITE = HERE / "suites" / "medical.toml"
OTHER = {"pneumoniamnist": "breastmnist", "breastmnist": "pneumoniamnist"}


# -- configuration ----------------------------------------------------------------------


def load_suite(path: Path, quick: bool) -> dict[str, Any]:
    with open(path, "rb") as f:
        suite = tomllib.load(f)
    if quick:
        q = suite.get("quick", {})
        for key in ("shots", "draws", "backbones", "datasets", "methods"):
            if key in q:
                suite[key] = q[key]
        if "pretrain_epochs" in q:
            for recipe in suite["pretrain"].values():
                recipe["epochs"] = q["pretrain_epochs"]
    return suite


def recipe_for(suite: dict[str, Any], backbone: str, dataset: str) -> dict[str, Any]:
    recipe = dict(suite["pretrain"][backbone])
    if recipe["dataset"] == "medmnist-other":
        recipe["dataset"] = OTHER[dataset]
    recipe.setdefault("seed", suite.get("seed", 0))
    return recipe


def recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


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


def ensure_backbone(recipe: dict[str, Any], folder: Path, device: torch.device, data_root: str | None, log) -> Path:
    """The recipe's checkpoint, pretrained now if it is not cached yet."""
    from metafew import pretrain

    path = folder / f"{recipe['arch']}-{recipe['dataset']}-{recipe_key(recipe)}.safetensors"
    if path.exists():
        return path
    ds = pretraining_data(recipe, data_root)
    log(
        f"pretraining {recipe['arch']} on {ds.name} ({len(ds)} images, {ds.num_classes} classes, {recipe['epochs']} epochs) -> {path}"
    )
    t0 = time.perf_counter()
    pretrain(
        recipe["arch"], ds, epochs=int(recipe["epochs"]), lr=float(recipe.get("lr", 0.05)),
        batch_size=int(recipe.get("batch_size", 128)), seed=int(recipe["seed"]), device=device,
        out=path, progress=sys.stderr.isatty(),
    )  # fmt: skip
    log(f"  pretrained in {time.perf_counter() - t0:.0f} s")
    return path


# -- one cell ---------------------------------------------------------------------------


def run_cell(
    dataset: str, backbone_path: Path, method: str, shots: int, draws: int, seed: int,
    options: dict[str, Any], device: torch.device, data_root: str | None, split: str = "test",
    bn_stats: str = "support",
) -> dict[str, Any]:  # fmt: skip
    """Adapt ``draws`` times to K train images per class, score each on the whole ``split``."""
    from metafew.adaptation import DEFAULT_OPTIONS, estimate, resolve_backbone
    from metafew.data.medmnist import MedMNIST
    from metafew.learners import create

    pool = MedMNIST(dataset, "train", root=data_root)
    test = MedMNIST(dataset, split, root=data_root)
    module, prep, _ = resolve_backbone(str(backbone_path), device=device)
    opts = {**DEFAULT_OPTIONS[method], **options}
    learner = create(method, module, **opts).to(device).eval()
    report = estimate(
        learner, pool.images, pool.labels, pool.classes, prep, method=method, shots=shots, draws=draws,
        seed=seed, device=device, test=(test.images, test.labels, test.name), warn=False, bn_stats=bn_stats,
    )  # fmt: skip
    counts = torch.bincount(test.labels, minlength=len(test.classes))
    return {
        "accuracy": report.accuracy.mean, "accuracy_ci95": report.accuracy.ci95,
        "balanced_accuracy": report.balanced_accuracy.mean, "balanced_accuracy_ci95": report.balanced_accuracy.ci95,
        "auc": report.auc.mean if report.auc else None, "auc_ci95": report.auc.ci95 if report.auc else None,
        "accuracy_range": [report.accuracy.low, report.accuracy.high],
        "recall": report.recall, "test_images": len(test), "majority_rate": float(counts.max() / counts.sum()),
        "options": opts, "bn_stats": bn_stats, "seconds": round(report.seconds, 2),
        "per_draw_accuracy": [d["accuracy"] for d in report.per_draw],
        "per_draw_auc": [d["auc"] for d in report.per_draw],
    }  # fmt: skip


# -- reporting --------------------------------------------------------------------------


def write_markdown(results: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    lines = [f"# {suite.get('description', 'medical')}", ""]
    meta = results["meta"]
    lines.append(f"{meta['draws']} support draws per cell (seed {meta['seed']}), scored on the whole official test split; "
                 f"mean ± 95% CI over draws. Device: {meta['device']}.")  # fmt: skip
    lines.append("")
    for ds in suite["datasets"]:
        ref = suite.get("reference", {}).get(ds, {})
        cells = [c for c in results["cells"].values() if c["dataset"] == ds]
        if not cells:
            continue
        majority = cells[0]["majority_rate"]
        lines += [
            f"## {ds} (test split: {cells[0]['test_images']} images; majority class rate {majority:.3f})",
            "",
            f"Reference: {ref.get('source', '')}: accuracy {ref.get('accuracy', 'n/a')}, AUC {ref.get('auc', 'n/a')} "
            "(trained on the whole training split).",
            "",
            "| backbone | method | K | accuracy | balanced acc. | AUC | seconds |",
            "|---|---|---:|---|---|---|---:|",
        ]
        for c in sorted(cells, key=lambda c: (c["backbone"], c["method"], c["shots"])):
            auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f} ± {c['auc_ci95']:.3f}"
            lines.append(
                f"| {c['backbone']} | {c['method']} | {c['shots']} | {c['accuracy']:.3f} ± {c['accuracy_ci95']:.3f} | "
                f"{c['balanced_accuracy']:.3f} ± {c['balanced_accuracy_ci95']:.3f} | {auc} | {c['seconds']:.0f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, Any], suite: dict[str, Any], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results["cells"].values())
    datasets = [d for d in suite["datasets"] if any(c["dataset"] == d for c in cells)]
    backbones = [b for b in suite["backbones"] if any(c["backbone"] == b for c in cells)]
    if not datasets or not backbones:
        return
    fig, axes = plt.subplots(
        len(datasets), len(backbones), figsize=(4.2 * len(backbones), 3.4 * len(datasets)), squeeze=False, sharey="row"
    )
    for i, ds in enumerate(datasets):
        ref = suite.get("reference", {}).get(ds, {})
        for j, bb in enumerate(backbones):
            ax = axes[i][j]
            for method in suite["methods"]:
                pts = sorted((c["shots"], c[metric], c[f"{metric}_ci95"]) for c in cells
                             if c["dataset"] == ds and c["backbone"] == bb and c["method"] == method and c[metric] is not None)  # fmt: skip
                if pts:
                    k, m, ci = zip(*pts)
                    ax.errorbar(k, m, yerr=ci, marker="o", capsize=3, label=method)
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


def tune(args: argparse.Namespace, suite: dict[str, Any], device: torch.device, backbone_dir: Path, log) -> None:
    """Score each option set of TUNE_GRID on PneumoniaMNIST's validation split (never the test split)."""
    recipe = recipe_for(suite, "omniglot", "pneumoniamnist")
    path = ensure_backbone(recipe, backbone_dir, device, args.data_root, log)
    for method, grid in TUNE_GRID.items():
        for opts in grid:
            for k in (5, 10):
                r = run_cell(
                    "pneumoniamnist",
                    path,
                    method,
                    k,
                    args.draws or 20,
                    1000 + suite["seed"],
                    opts,
                    device,
                    args.data_root,
                    split="val",
                )
                log(
                    f"{method} {opts} K={k}: val accuracy {r['accuracy']:.3f}, balanced {r['balanced_accuracy']:.3f}, AUC {r['auc']:.3f} ({r['seconds']:.0f} s)"
                )


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=SUITE, help="suite TOML")
    parser.add_argument("--quick", action="store_true", help="the [quick] settings of the suite")
    parser.add_argument("--out", type=Path, help="results folder (default results/medical[-quick])")
    parser.add_argument(
        "--backbone-dir", type=Path, help="pretrained backbone cache (default <metafew cache>/pretrained/medical)"
    )
    parser.add_argument("--data-root", help="dataset root (default $METAFEW_DATA)")
    parser.add_argument("--datasets", nargs="+", help="subset of the suite's datasets")
    parser.add_argument("--backbones", nargs="+", help="subset of the suite's backbones")
    parser.add_argument("--methods", nargs="+", help="subset of the suite's methods")
    parser.add_argument("--shots", nargs="+", type=int, help="subset of the suite's K values")
    parser.add_argument("--draws", type=int, help="support draws per cell (default: the suite's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tune", action="store_true", help="run the option sweep on the validation split instead")
    args = parser.parse_args(argv)

    from metafew.device import resolve_device
    from metafew.paths import cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite, args.quick)
    for key in ("datasets", "backbones", "methods", "shots"):
        if getattr(args, key):
            suite[key] = getattr(args, key)
    if args.draws and not args.tune:
        suite["draws"] = args.draws
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

    results_path = out / "medical.json"
    results: dict[str, Any] = {"cells": {}}
    if results_path.exists():
        results = json.loads(results_path.read_text())
    results["meta"] = {
        "suite": str(args.suite), "draws": suite["draws"], "seed": suite["seed"], "quick": args.quick,
        "device": f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }  # fmt: skip
    total = len(suite["datasets"]) * len(suite["backbones"]) * len(suite["methods"]) * len(suite["shots"])
    done = 0
    start = time.perf_counter()
    for dataset in suite["datasets"]:
        for backbone in suite["backbones"]:
            recipe = recipe_for(suite, backbone, dataset)
            path = ensure_backbone(recipe, backbone_dir, device, args.data_root, log)
            for method in suite["methods"]:
                options = dict(suite.get("options", {}).get(method, {}))
                for k in suite["shots"]:
                    done += 1
                    bn = suite.get("bn_stats", "support")
                    key = json.dumps(
                        [dataset, backbone, recipe_key(recipe), method, options, bn, k, suite["draws"], suite["seed"]]
                    )
                    if key in results["cells"]:
                        continue
                    cell = run_cell(
                        dataset,
                        path,
                        method,
                        k,
                        suite["draws"],
                        suite["seed"],
                        options,
                        device,
                        args.data_root,
                        bn_stats=bn,
                    )
                    cell.update(
                        dataset=dataset, backbone=backbone, method=method, shots=k, backbone_checkpoint=path.name
                    )
                    results["cells"][key] = cell
                    tmp = results_path.with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(results, indent=1) + "\n")
                    os.replace(tmp, results_path)
                    auc = f"{cell['auc']:.3f}" if cell["auc"] is not None else "n/a"
                    log(
                        f"[{done}/{total}] {dataset} {backbone} {method} K={k}: accuracy {cell['accuracy']:.3f} ± "
                        f"{cell['accuracy_ci95']:.3f}, balanced {cell['balanced_accuracy']:.3f}, AUC {auc} "
                        f"({cell['seconds']:.0f} s; {time.perf_counter() - start:.0f} s so far)"
                    )
    write_markdown(results, suite, out / "medical.md")
    plot(results, suite, "accuracy", out / "medical_accuracy.png")
    plot(results, suite, "auc", out / "medical_auc.png")
    log(f"results: {results_path}, {out / 'medical.md'}, {out / 'medical_accuracy.png'}, {out / 'medical_auc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
