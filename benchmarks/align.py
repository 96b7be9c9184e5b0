"""Does aligning the backbone to unlabeled target images help? BreastMNIST, ProtoNet, shipped backbones.

For each shipped backbone and alignment (none / bn / mmd), ``--draws`` seeded support
draws of ``--shots`` train images per class, each scored on the whole official test
split. The unlabeled pool is the official train split's images (labels dropped): it
holds the support images but never a scored one, so the figures stay honest.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/align.py --draws 20 --steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="breastmnist")
    p.add_argument("--backbones", default="caltech101-conv4,omniglot-background-conv4")
    p.add_argument("--aligns", default="none,bn,mmd")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)

    from metafew.adaptation import DEFAULT_OPTIONS, estimate, resolve_backbone
    from metafew.adaptation.align import align_backbone, load_source
    from metafew.data.medmnist import MedMNIST
    from metafew.device import resolve_device
    from metafew.learners import create

    dev = resolve_device(args.device)
    pool = MedMNIST(args.dataset, "train")
    test = MedMNIST(args.dataset, "test")
    rows: list[dict[str, Any]] = []
    for name in args.backbones.split(","):
        module, prep, info = resolve_backbone(name, device=dev)
        for align in args.aligns.split(","):
            t0 = time.perf_counter()
            backbone, ainfo = module, None
            if align != "none":
                src = None if align == "bn" else load_source(info["pretrained_on"], prep, seed=args.seed)
                backbone, ainfo = align_backbone(
                    module, prep, pool.images, align, source=src, steps=args.steps, seed=args.seed, device=dev
                )
            bn_stats = "support" if align == "none" else "backbone"
            learner = create("protonet", backbone, **DEFAULT_OPTIONS["protonet"]).to(dev).eval()
            report = estimate(
                learner, pool.images, pool.labels, pool.classes, prep, method="protonet", shots=args.shots,
                draws=args.draws, seed=args.seed, device=dev, test=(test.images, test.labels, test.name),
                warn=False, bn_stats=bn_stats,
            )  # fmt: skip
            assert report.accuracy is not None and report.balanced_accuracy is not None
            row = {
                "backbone": name, "align": align, "bn_stats": bn_stats,
                "accuracy": report.accuracy.mean, "accuracy_ci95": report.accuracy.ci95,
                "balanced_accuracy": report.balanced_accuracy.mean,
                "balanced_accuracy_ci95": report.balanced_accuracy.ci95,
                "auc": report.auc.mean if report.auc else None, "auc_ci95": report.auc.ci95 if report.auc else None,
                "alignment": ainfo, "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:28s} {align:5s} acc {row['accuracy']:.3f}±{row['accuracy_ci95']:.3f} "
                f"bal {row['balanced_accuracy']:.3f}±{row['balanced_accuracy_ci95']:.3f} "
                f"AUC {row['auc'] or float('nan'):.3f}±{row['auc_ci95'] or float('nan'):.3f} "
                f"({row['seconds']} s)",
                flush=True,
            )
    if args.out:
        meta = {"command": " ".join(sys.argv), "machine": platform.processor(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": {**meta, **vars(args), "out": str(args.out)}, "rows": rows}, indent=2))
    print(f"\n{args.dataset}, ProtoNet {args.shots}-shot, {args.draws} draws scored on the test split")
    print("| backbone | alignment | accuracy | balanced accuracy | AUC |\n|---|---|---|---|---|")
    for r in rows:
        auc = f"{r['auc']:.3f} ± {r['auc_ci95']:.3f}" if r["auc"] is not None else "n/a"
        print(
            f"| {r['backbone']} | {r['align']} | {r['accuracy']:.3f} ± {r['accuracy_ci95']:.3f} "
            f"| {r['balanced_accuracy']:.3f} ± {r['balanced_accuracy_ci95']:.3f} | {auc} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
