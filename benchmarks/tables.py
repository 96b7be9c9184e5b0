"""Write the RESULTS.md tables from the committed JSON results, so numbers and prose cannot drift.

RESULTS.md marks each generated table with a pair of comments naming its JSON file::

    <!-- table: results/omniglot-pretrained.json -->
    ...generated, do not edit...
    <!-- /table -->

Run ``python benchmarks/tables.py`` after committing new results (``--check`` exits 1 when
RESULTS.md is out of date, which the tests use).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MARK = re.compile(r"(<!-- table: (?P<file>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "0 s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(doc: dict[str, Any]) -> str:
    """A Markdown table of a suite's JSON rows: figure ± CI, published, gap, training and time."""
    lines = [
        "| row | setting | training | accuracy (%) | published | gap | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        err = r.get("metric") == "error"
        ours = r["error_rate"] if err else r["accuracy_mean"]
        pub = r.get("published")
        gap = "" if pub is None else f"{(pub - ours) if err else (ours - pub):+.2f}"
        verdict = "" if pub is None else (" (at or above)" if (ours <= pub if err else ours >= pub) else "")
        setting = f"{r['n_way']}-way {r['k_shot']}-shot, {r['episodes']} {'runs' if err else 'episodes'}"
        training = f"{r['train_steps']} steps" if r.get("train_steps") else "none (pretrained backbone only)"
        figure = f"{'error ' if err else ''}{_pct(ours)} ± {_pct(r['accuracy_ci95'])}"
        lines.append(
            f"| {r.get('name', r['learner'])} | {setting} | {training} | {figure} | {'' if pub is None else pub} | "
            f"{gap}{verdict} | {_duration(r.get('train_seconds'))} |"
        )
    meta = [f"suite `{doc.get('suite')}`", f"metafew {doc.get('metafew_version')}", f"torch {doc.get('torch_version')}"]
    if doc.get("git_commit"):
        commit = str(doc["git_commit"])
        meta.append(f"code `{commit[:10] if ' ' not in commit else commit}`")
    devices = sorted({r.get("device", "") for r in doc["rows"]})
    meta.append("device: " + "; ".join(devices))
    if doc.get("command"):
        meta.append(f"command: `{doc['command']}`")
    return "\n".join(lines) + "\n\n" + ", ".join(meta) + f", {doc.get('date', '')}\n"


def alignment_table(doc: dict[str, Any]) -> str:
    """The table of ``benchmarks/align.py``: adaptation with and without cross-domain feature alignment."""
    m = doc["meta"]
    lines = [
        "| backbone | alignment | BN statistics | accuracy | balanced accuracy | AUC | MMD: unaligned -> bn -> aligned |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        a = r.get("alignment") or {}
        keys = ("mmd_unaligned", "mmd_bn_only", "mmd_after")
        shown = " -> ".join(f"{a[k]:.3f}" for k in keys if a.get(k) is not None)
        lines.append(
            f"| {r['backbone']} | {r['align']} | {r['bn_stats']} | {r['accuracy']:.3f} ± {r['accuracy_ci95']:.3f} | "
            f"{r['balanced_accuracy']:.3f} ± {r['balanced_accuracy_ci95']:.3f} | {r['auc']:.3f} ± {r['auc_ci95']:.3f} | {shown} |"
        )
    meta = (
        f"{m['dataset']}, {m['shots']}-shot, {m['draws']} draws scored on the official test split, torch {m['torch']}"
    )
    return "\n".join(lines) + f"\n\n{meta}; command: `python {m['command']}`\n"


def roofline_table(doc: dict[str, Any]) -> str:
    """The table of ``benchmarks/roofline.py``: FLOPs, time and share of the measured conv limit per step."""
    lim = doc["limit_gflops"]
    lines = [
        "| step | precision | GFLOP / step | ms / step | GFLOP/s | share of the conv limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['row']} | {r['variant']} | {r['gflop_per_step']:.2f} | {1000 * r['seconds_per_step']:.1f} | "
            f"{r['gflops']:.1f} | {100 * r['share_of_conv_limit']:.0f}% |"
        )
    meta = (
        f"limits measured in the same process: matmul {lim['matmul']:.1f}, 3x3 conv fwd+bwd {lim['conv3x3_fp32']:.1f} "
        f"(float32) / {lim['conv3x3_bf16']:.1f} (bf16) GFLOP/s; {doc['threads']} thread, torch {doc['torch']}, {doc['date']}"
    )
    return "\n".join(lines) + f"\n\n{meta}\n"


def mmap_table(doc: dict[str, Any]) -> str:
    """The table of ``benchmarks/mmap_storage.py`` (in-memory vs memory-mapped storage), as it wrote it."""
    m = doc["machine"]
    load = ", ".join(f"{x:.1f}" for x in m.get("load_average", []))
    meta = (
        f"{m['cpu']}, {m['cores']} cores (load average {load}), {m['torch_threads']} torch thread, torch {m['torch']}, "
        f"{m['date']}; command: `{doc['command']}`"
    )
    return doc["table"].rstrip("\n") + f"\n\n{meta}\n"


def distributed_table(doc: dict[str, Any]) -> str:
    """The table of ``benchmarks/distributed.py``: episodes/s with 1 and 2 processes, scaling efficiency."""
    lines = [
        "| learner | episodes | 1 process x 1 thread | 1 process x 2 threads | 2 processes x 1 thread | scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        rate = {(x["processes"], x["threads"]): x["episodes_per_s"] for x in r["runs"]}
        shown = [f"{rate[k]:.2f} ep/s" if k in rate else "" for k in ((1, 1), (1, 2), (2, 1))]
        setting = f"{r['way']}-way {r['shot']}-shot, {r['query']} queries, meta-batch {r['meta_batch']}"
        lines.append(f"| {r['learner']} | {setting} | {' | '.join(shown)} | {r['scaling_efficiency']:.2f} |")
    m = doc["machine"]
    meta = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; {doc.get('note') or ''}; command: `{doc['command']}`"
    return "\n".join(lines) + f"\n\n{meta}\n"


def render(text: str, base: Path) -> str:
    """``text`` with every marked table regenerated from its JSON file (paths relative to ``base``)."""

    def fill(m: re.Match[str]) -> str:
        doc = json.loads((base / m["file"]).read_text())
        kind = (
            alignment_table
            if "meta" in doc
            else roofline_table
            if "limit_gflops" in doc
            else mmap_table
            if isinstance(doc.get("table"), str)
            else distributed_table
            if str(doc.get("benchmark", "")).startswith("distributed")
            else table
        )
        return m.group(1) + kind(doc) + m.group(4)

    return MARK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date, change nothing")
    args = p.parse_args(argv)
    old = args.results.read_text()
    new = render(old, args.results.parent)
    if args.check:
        if new != old:
            print(f"{args.results} is out of date: run python benchmarks/tables.py", file=sys.stderr)
            return 1
        return 0
    args.results.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
