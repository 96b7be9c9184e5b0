"""Rows of a pretrained-backbone suite over several pretraining seeds: how much of a figure is the backbone's luck.

A suite's rows all start from one backbone, pretrained with ``[pretrain] seed``. This script
re-runs chosen rows from backbones pretrained with other seeds (the same recipe otherwise;
the runner pretrains each once and caches it), on the suite's same fixed test episodes, and
writes every seed's figure with the mean over seeds and its 95% interval (Student t with
``seeds - 1`` degrees of freedom), beside the row's published figure:

    OMP_NUM_THREADS=1 python benchmarks/pretrain_seeds.py --suite omniglot-pretrained --seeds 1 2 \\
        --rows protonet-5w1s-floor protonet-20w1s-floor --seed0 benchmarks/results/omniglot-pretrained.json \\
        --work-dir results/runs/omniglot-pretrained-seeds --out benchmarks/results/omniglot-pretrained-seeds.json

``--seed0`` takes the suite's own results for its ``[pretrain] seed`` instead of running
them again. Each seed runs as ``metafew bench --suite <copy with that seed> --row ...`` in its
own work folder, so rows resume and finished rows are reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# Two-sided 97.5% quantiles of Student's t (scipy is not a dependency), by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def with_pretrain_seed(text: str, seed: int) -> str:
    """The suite TOML ``text`` with its ``[pretrain]`` table's ``seed`` set to ``seed`` (and its name tagged)."""
    head, sep, rest = text.partition("[pretrain]\n")
    if not sep:
        raise SystemExit("the suite has no [pretrain] table: its rows do not share a pretrained backbone")
    block, nxt, tail = re.split(r"(\n\[)", rest, maxsplit=1) if "\n[" in rest else (rest, "", "")
    if re.search(r"(?m)^seed\s*=", block):
        block = re.sub(r"(?m)^seed\s*=.*$", f"seed = {seed}", block)
    else:
        block = block.rstrip("\n") + f"\nseed = {seed}\n"
    head = re.sub(r'(?m)^name\s*=\s*"([^"]+)"', rf'name = "\1-pretrain-seed{seed}"', head, count=1)
    return head + sep + block + nxt + tail


def summary(values: list[float]) -> dict[str, float | None]:
    """Mean over seeds and the half-width of its 95% Student t interval (None for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    return {"mean": mean, "ci95": T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="suite name or TOML path (it needs a [pretrain] table)")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="pretraining seeds to run")
    p.add_argument("--rows", nargs="+", required=True, help="rows of the suite to run for each seed")
    p.add_argument("--seed0", type=Path, help="the suite's results JSON: its rows count for the suite's own seed")
    p.add_argument("--work-dir", type=Path, required=True, help="where each seed's suite copy and rows live")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from metafew.bench import load_suite
    from metafew.bench.suite import resolve_suite

    path = resolve_suite(args.suite)
    suite = load_suite(path)
    assert suite.pretrain is not None
    base_seed = suite.pretrain.seed
    args.work_dir.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    if args.seed0:
        per_seed[base_seed] = {
            r["name"]: r for r in json.loads(args.seed0.read_text())["rows"] if r["name"] in args.rows
        }
    commands = []
    for seed in args.seeds:
        copy = args.work_dir / f"{suite.name}-pretrain-seed{seed}.toml"
        copy.write_text(with_pretrain_seed(path.read_text(), seed))
        out = args.work_dir / f"seed{seed}.json"
        cmd = [sys.executable, "-m", "metafew", "bench", "--suite", str(copy), "--out", str(out), "--no-progress"]
        cmd += ["--work-dir", str(args.work_dir / f"runs-seed{seed}"), "--overwrite"]
        for row in args.rows:
            cmd += ["--row", row]
        commands.append(" ".join(["metafew", *cmd[3:]]))
        print("$", commands[-1], flush=True)
        subprocess.run(cmd, check=True)
        per_seed[seed] = {r["name"]: r for r in json.loads(out.read_text())["rows"]}

    rows = []
    for name in args.rows:
        got = {s: per_seed[s][name] for s in sorted(per_seed) if name in per_seed[s]}
        if not got:
            continue
        first = next(iter(got.values()))
        accs = [r["accuracy_mean"] for r in got.values()]
        rows.append({
            "name": name, "n_way": first["n_way"], "k_shot": first["k_shot"], "episodes": first["episodes"],
            "published": first.get("published"), "source": first.get("source"),
            "seeds": list(got), "per_seed": {str(s): {"accuracy_mean": r["accuracy_mean"],
                                                       "accuracy_ci95": r["accuracy_ci95"]} for s, r in got.items()},
            "over_seeds": summary(accs),
        })  # fmt: skip
    doc = {
        "benchmark": "pretrain-seeds",
        "suite": suite.name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "command": " ".join(["python benchmarks/pretrain_seeds.py", *(argv if argv is not None else sys.argv[1:])]),
        "bench_commands": commands,
        "protocol": "each seed's backbone pretrained by the suite's [pretrain] recipe with that seed, then the row "
        "as the suite defines it, on the suite's fixed test episodes (the same for every seed); over_seeds: mean "
        "of the per-seed accuracies and the half-width of the 95% Student t interval (seeds - 1 dof)",
        "rows": rows,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        o = r["over_seeds"]
        ci = f" ± {o['ci95']:.2f}" if o["ci95"] is not None else ""
        print(f"{r['name']}: {o['mean']:.2f}{ci} over seeds {r['seeds']} (published {r['published']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
