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
from metafew.bench.runner import report_keys, same_row, write_outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument(
        "--runs", type=Path, nargs="+", required=True, help="the suite's work folder(s) (<out>/runs/<suite>)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--command", help="the command the rows were run with, recorded in the JSON")
    p.add_argument("--commit", help="the code the rows ran on (default: none recorded; this checkout may differ)")
    p.add_argument(
        "--same-backbone",
        type=Path,
        nargs="*",
        default=[],
        help="backbone files whose tensors equal the suite's [pretrain] backbone (checked), so rows trained from them count",
    )
    p.add_argument(
        "--keep",
        type=Path,
        help="an earlier results file: its rows whose run folders are gone are kept (by name) unless found again",
    )
    args = p.parse_args()
    suite = load_suite(args.suite)
    caches = sorted((c for runs in args.runs for c in runs.glob("*/result.json")), key=lambda c: c.stat().st_mtime)
    docs = [json.loads(c.read_text()) for c in caches]
    rows, missing = [], []
    stem = None if suite.pretrain is None else f"pretrain-{suite.pretrain.backbone}-{suite.pretrain.dataset}-"
    stem = stem and stem + suite.pretrain.key()  # type: ignore[union-attr]

    same = {p.name for p in args.same_backbone if _equal_tensors(p, _pretrained(args.runs, stem))}

    def spec_of(doc: dict) -> dict:
        spec = dict(doc.get("spec", {}))
        ckpt = spec.get("backbone_checkpoint")
        if stem and ckpt and (Path(ckpt).name.startswith(stem) or Path(ckpt).name in same):  # the [pretrain] one
            spec["backbone_checkpoint"] = None
        return spec

    kept = {r["name"]: r for r in json.loads(args.keep.read_text())["rows"]} if args.keep else {}
    for bench in suite.rows:
        # The newest cached result of this row's exact settings; a row renamed since it ran
        # (same settings, other name) is still found, and reported under its current name.
        found = [d["row"] for d in docs if same_row(spec_of(d), bench.to_dict())]
        if found:
            rows.append(report_keys(found[-1], bench))
        elif bench.name in kept and _agrees(kept[bench.name], bench.to_dict()):
            rows.append(kept[bench.name])
        else:
            missing.append(bench.name)
    write_outputs(suite, rows, args.out)
    doc = json.loads(args.out.read_text())
    doc.update(command=args.command, git_commit=args.commit, rows_not_run=missing)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.out}: {len(rows)} rows" + (f"; not run: {', '.join(missing)}" if missing else ""))


def _agrees(row: dict, spec: dict) -> bool:
    """Whether a reported row's settings equal the suite row's, where the report records them.

    A report leaves out the learner options: a row whose options changed since it was kept
    must be left out by hand (run it again, or drop it from the kept file).
    """
    pairs = [("learner", "learner"), ("n_way", "n_way"), ("k_shot", "k_shot"), ("train_steps", "steps")]
    return all(row[a] == spec[b] for a, b in pairs if a in row and b in spec)


def _pretrained(runs: list[Path], stem: str | None) -> Path | None:
    """The suite's [pretrain] backbone in one of the run folders."""
    found = [p for r in runs for p in sorted(r.glob(f"{stem}*.safetensors"))] if stem else []
    return found[0] if found else None


def _equal_tensors(a: Path, b: Path | None) -> bool:
    """Whether two safetensors files hold the same tensors, bit for bit (metadata aside)."""
    if b is None:
        return False
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    main()
