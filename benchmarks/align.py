"""Does aligning the backbone to unlabeled target images help? MedMNIST, ProtoNet, shipped backbones.

For each dataset, shipped backbone and alignment (none / bn / mmd / dann), ``--draws``
seeded support draws of ``--shots`` train images per class, each scored on the whole
official test split. The unlabeled pool is the official train split's images (labels
dropped): it holds the support images but never a scored one, so the figures stay honest.
Every alignment of a backbone is scored on the same draws, so each row also gets its
paired difference to ``none`` (mean and 95% CI over the draws); accuracy and balanced
accuracy also get the test-set bootstrap interval (1,000 resamples of the test images).
Rows are written to ``--out`` after each one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/align.py --datasets pneumoniamnist,breastmnist --draws 20 \
        --out benchmarks/results/align-medical.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch


def paired(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Per metric, mean and 95% CI (1.96 std / sqrt(n)) over draws of ``a - b`` (the same draws)."""
    out = {}
    for metric in a:
        d = [x - y for x, y in zip(a[metric], b[metric]) if x is not None and y is not None]
        if len(d) > 1:
            mean = sum(d) / len(d)
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
            out[metric] = {"mean": mean, "ci95": 1.96 * sd / math.sqrt(len(d))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", "--dataset", default="breastmnist", help="comma-separated MedMNIST sets")
    p.add_argument("--backbones", default="caltech101-conv4,omniglot-background-conv4")
    p.add_argument("--aligns", default="none,bn,mmd,dann")
    p.add_argument("--shots", default="10", help="comma-separated shots per class, e.g. 1,5,10,20")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the others")
    args = p.parse_args(argv)

    from metafew.adaptation import DEFAULT_OPTIONS, estimate, resolve_backbone
    from metafew.adaptation.align import align_backbone, load_source
    from metafew.data.medmnist import MedMNIST
    from metafew.device import resolve_device
    from metafew.learners import create

    dev = resolve_device(args.device)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "protocol": "ProtoNet, support drawn from the official train split, every draw scored on the whole "
        "official test split; the unlabeled pool is the train split's images without labels; "
        "difference_vs_none: this row minus the unaligned backbone, paired on the same draws, mean and "
        "1.96 std / sqrt(draws); test_bootstrap: percentile 95% interval over 1,000 resamples of the test images",
    }  # fmt: skip
    shots = [int(k) for k in str(args.shots).split(",")]
    rows: list[dict[str, Any]] = []
    if args.resume and args.out and args.out.exists():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["draws"] == args.draws]

    def done(dataset: str, name: str, align: str, k: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["dataset"], r["backbone"], r["align"], r["shots"]) == (dataset, name, align, k)),
            None,
        )

    for dataset in args.datasets.split(","):
        pool = MedMNIST(dataset, "train")
        test = MedMNIST(dataset, "test")
        for name in args.backbones.split(","):
            module, prep, info = resolve_backbone(name, device=dev)
            unaligned: dict[int, dict[str, list[float]]] = {}
            for align in args.aligns.split(","):
                todo = [k for k in shots if done(dataset, name, align, k) is None]
                if align == "none" or not todo:  # the baseline's per-draw figures, for the paired differences
                    unaligned.update(
                        {k: r["per_draw"] for k in shots if align == "none" and (r := done(dataset, name, align, k))}
                    )
                if not todo:
                    continue
                t0 = time.perf_counter()
                backbone, ainfo = module, None
                if align != "none":  # aligned once, scored at every K
                    src = None if align == "bn" else load_source(info["pretrained_on"], prep, seed=args.seed)
                    backbone, ainfo = align_backbone(
                        module, prep, pool.images, align, source=src, steps=args.steps, seed=args.seed, device=dev
                    )
                align_seconds = time.perf_counter() - t0
                bn_stats: Literal["support", "backbone"] = "support" if align == "none" else "backbone"
                learner = create("protonet", backbone, **DEFAULT_OPTIONS["protonet"]).to(dev).eval()
                for k in todo:
                    t1 = time.perf_counter()
                    report = estimate(
                        learner, pool.images, pool.labels, pool.classes, prep, method="protonet", shots=k,
                        draws=args.draws, seed=args.seed, device=dev, test=(test.images, test.labels, test.name),
                        warn=False, bn_stats=bn_stats, baselines=False,
                    )  # fmt: skip
                    assert report.accuracy is not None and report.balanced_accuracy is not None
                    per_draw = {m: [d[m] for d in report.per_draw] for m in ("accuracy", "balanced_accuracy", "auc")}
                    row = {
                        "dataset": dataset, "backbone": name, "align": align, "bn_stats": bn_stats, "shots": k,
                        "draws": args.draws,
                        "accuracy": report.accuracy.mean, "accuracy_ci95": report.accuracy.ci95,
                        "accuracy_test_bootstrap": report.accuracy.test_bootstrap,
                        "balanced_accuracy": report.balanced_accuracy.mean,
                        "balanced_accuracy_ci95": report.balanced_accuracy.ci95,
                        "balanced_accuracy_test_bootstrap": report.balanced_accuracy.test_bootstrap,
                        "auc": report.auc.mean if report.auc else None,
                        "auc_ci95": report.auc.ci95 if report.auc else None,
                        "difference_vs_none": paired(per_draw, unaligned[k]) if k in unaligned and align != "none" else None,
                        "per_draw": per_draw, "alignment": ainfo,
                        "seconds": round(time.perf_counter() - t1 + (align_seconds if k == todo[0] else 0), 1),
                    }  # fmt: skip
                    if align == "none":
                        unaligned[k] = per_draw
                    rows.append(row)
                    print(
                        f"{dataset} {name:28s} {align:5s} K={k:<2d} acc {row['accuracy']:.3f}±{row['accuracy_ci95']:.3f} "
                        f"bal {row['balanced_accuracy']:.3f}±{row['balanced_accuracy_ci95']:.3f} "
                        f"AUC {row['auc'] or float('nan'):.3f}±{row['auc_ci95'] or float('nan'):.3f} "
                        f"({row['seconds']} s)",
                        flush=True,
                    )
                    if args.out:  # after every row, atomically: a killed run keeps what it did (--resume)
                        out = {"meta": {**meta, **vars(args), "out": str(args.out)}, "rows": rows}
                        tmp = args.out.with_suffix(".tmp")
                        tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
                        tmp.replace(args.out)
    print(f"\nProtoNet, {args.draws} draws scored on the test split")
    print(
        "| dataset | backbone | K | alignment | accuracy | balanced accuracy | AUC | balanced acc. vs none |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        auc = f"{r['auc']:.3f} ± {r['auc_ci95']:.3f}" if r["auc"] is not None else "n/a"
        d = (r["difference_vs_none"] or {}).get("balanced_accuracy")
        diff = f"{d['mean']:+.3f} ± {d['ci95']:.3f}" if d else ""
        print(
            f"| {r['dataset']} | {r['backbone']} | {r['shots']} | {r['align']} | {r['accuracy']:.3f} ± {r['accuracy_ci95']:.3f} "
            f"| {r['balanced_accuracy']:.3f} ± {r['balanced_accuracy_ci95']:.3f} | {auc} | {diff} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
