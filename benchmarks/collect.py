"""Gather the finished rows of a suite from their run folders into one results JSON.

``metafew bench --row X`` rewrites its JSON with the rows of that call only; rows run one
by one (two at a time on two cores, or resumed across sessions) are gathered here from
the ``result.json`` each row folder caches, in the suite's row order:

    python benchmarks/collect.py --suite omniglot-pretrained --runs results/runs/omniglot-pretrained \\
        --out benchmarks/results/omniglot-pretrained.json --command "metafew bench --suite omniglot-pretrained ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metafew.bench import load_suite
from metafew.bench.runner import write_outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument(
        "--runs", type=Path, nargs="+", required=True, help="the suite's work folder(s) (<out>/runs/<suite>)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--command", help="the command the rows were run with, recorded in the JSON")
    p.add_argument("--commit", help="the code the rows ran on (default: none recorded; this checkout may differ)")
    args = p.parse_args()
    suite = load_suite(args.suite)
    found = {}
    for cache in [c for runs in args.runs for c in sorted(runs.glob("*/result.json"))]:
        doc = json.loads(cache.read_text())
        found[doc["row"]["name"]] = doc["row"]
    rows = [found[r.name] for r in suite.rows if r.name in found]
    missing = [r.name for r in suite.rows if r.name not in found]
    write_outputs(suite, rows, args.out)
    doc = json.loads(args.out.read_text())
    doc.update(command=args.command, git_commit=args.commit, rows_not_run=missing)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.out}: {len(rows)} rows" + (f"; not run: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
