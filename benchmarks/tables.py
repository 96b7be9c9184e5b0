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
    return doc["table"].rstrip("\n") + f"\n\n{_machine(doc['machine'])}; command: `{doc['command']}`\n"


def _machine(m: dict[str, Any]) -> str:
    """The machine line ``benchmarks/mmap_storage.py`` records: CPU, cores, load, threads, torch, date."""
    load = ", ".join(f"{x:.1f}" for x in m.get("load_average", []))
    return (
        f"{m['cpu']}, {m['cores']} cores (load average {load}), {m['torch_threads']} torch thread, torch {m['torch']}, "
        f"{m['date']}"
    )


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


def channels_last_table(doc: dict[str, Any]) -> str:
    """The table of ``benchmarks/channels_last.py``: Conv-4 in NCHW and channels-last, one thread."""
    lines = ["| images | precision | what | NCHW | channels-last | speed-up |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(
            f"| {r['images']} | {r['precision']} | {r['mode']} | {r['nchw_ms']:.1f} ms | "
            f"{r['channels-last_ms']:.1f} ms | {r['speedup']:.2f}x |"
        )
    m = doc["meta"]
    return "\n".join(lines) + f"\n\n{m['machine']}, torch {m['torch']}, {m['date']}; command: `{m['command']}`\n"


def equal_time_table(doc: dict[str, Any]) -> str:
    """``benchmarks/learn2learn/equal_time.py``: accuracy against wall time, learn2learn's example and metafew."""
    lines = ["| who | wall time | progress | accuracy (%) |", "|---|---|---|---|"]
    for who, rows in doc["rows"].items():
        for r in rows:
            progress = f"{r['steps']} meta-steps" if "steps" in r else f"pretraining epoch {r['epoch']}"
            lines.append(
                f"| {who} | {r['seconds']:.0f} s | {progress} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} |"
            )
    peer, first = doc["learn2learn_at_budget"], doc["metafew_first_at_or_above"]
    verdict = (
        f"learn2learn reaches {100 * peer['accuracy']:.2f}% in its {doc['budget_seconds']:.0f} s; metafew is at or "
        f"above that at its first snapshot, {first['seconds']:.0f} s: **at least {doc['speedup']}x faster**"
        if first
        else "metafew does not reach learn2learn's accuracy within the budget"
    )
    return (
        "\n".join(lines) + f"\n\n{verdict}. Episodes: {doc['episodes']}. Peer: {doc['peer_script']}. {doc['machine']}, "
        f"{doc['date']}; command: `{doc['command']}`\n"
    )


def alignment_sweep_table(doc: dict[str, Any]) -> str:
    """``benchmarks/align.py`` over several K: balanced accuracy unaligned, and each alignment's paired change."""
    m = doc["meta"]
    aligns = [a for a in str(m["aligns"]).split(",") if a != "none"]
    lines = [
        "| dataset | backbone | K | balanced accuracy, unaligned | "
        + " | ".join(f"{a}: change" for a in aligns)
        + " | AUC, unaligned |",
        "|---|---|---|---|" + "---|" * len(aligns) + "---|",
    ]
    cells: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in doc["rows"]:
        cells.setdefault((r["dataset"], r["backbone"], r["shots"]), {})[r["align"]] = r
    for (dataset, backbone, k), by in sorted(cells.items()):
        none = by.get("none")
        base = f"{none['balanced_accuracy']:.3f} ± {none['balanced_accuracy_ci95']:.3f}" if none else ""
        changes = []
        for a in aligns:
            d = ((by.get(a) or {}).get("difference_vs_none") or {}).get("balanced_accuracy")
            mark = " **" if d and abs(d["mean"]) > d["ci95"] else ""
            changes.append(f"{mark.strip()}{d['mean']:+.3f} ± {d['ci95']:.3f}{mark.strip()}" if d else "")
        auc = f"{none['auc']:.3f} ± {none['auc_ci95']:.3f}" if none and none.get("auc") is not None else ""
        lines.append(f"| {dataset} | {backbone} | {k} | {base} | " + " | ".join(changes) + f" | {auc} |")
    meta = (
        f"{m['draws']} support draws per cell (seed {m['seed']}), each scored on the whole official test split; "
        f"change: aligned minus unaligned on the same draws, mean ± 95% CI (bold: the interval excludes 0); "
        f"{m['steps']} alignment steps; {m['machine']}, {m['threads']} thread, torch {m['torch']}, {m['date']}; "
        f"command: `python {m['command']}`"
    )
    return "\n".join(lines) + f"\n\n{meta}\n"


def decode_table(doc: dict[str, Any]) -> str:
    """``benchmarks/mmap_storage.py --decode-peak``: peak memory of decoding into a map vs into memory."""
    d = doc["decode_peak"]
    lines = [
        "| storage | images | decoded size | peak allocation (tracemalloc) | anonymous RSS growth | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['storage']} | {r['images']:,} x {'x'.join(map(str, r['shape']))} | {r['decoded_mib']:.0f} MiB | "
            f"{r['tracemalloc_peak_mib']:.1f} MiB | {r['rss_anon_peak_over_start_mib']:.0f} MiB | {r['seconds']:.0f} |"
        )
    meta = (
        f"{d['dataset']} at {d['image_size']}x{d['image_size']}, {d['decode_workers']} decode worker; "
        f"{_machine(doc['machine'])}; command: `{doc['command']}`"
    )
    return "\n".join(lines) + f"\n\n{meta}\n"


def python_matrix_table(doc: dict[str, Any]) -> str:
    """``.ci/python-matrix``: each Python version's install from the clone and its smoke tests."""
    lines = ["| Python | torch | smoke tests | install | tests | date |", "|---|---|---|---|---|---|"]
    for v in doc["versions"]:
        lines.append(
            f"| {v['python_full']} | {v['torch']} | {v['status']}: {v['passed']} passed, {v['failed']} failed | "
            f"{v['install_seconds']:.0f} s | {v['seconds']:.0f} s | {v['date']} |"
        )
    machine = doc["versions"][0]["machine"] if doc["versions"] else ""
    return "\n".join(lines) + f"\n\n{machine}; command: `{doc['command']}`\n"


def pretrain_seeds_table(doc: dict[str, Any]) -> str:
    """``benchmarks/pretrain_seeds.py``: a row's figure per pretraining seed, and over seeds."""
    seeds = sorted({s for r in doc["rows"] for s in r["per_seed"]}, key=int)
    lines = [
        "| row | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | over seeds (95% t) | published |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for r in doc["rows"]:
        per = [r["per_seed"].get(s) for s in seeds]
        shown = [f"{x['accuracy_mean']:.2f} ± {x['accuracy_ci95']:.2f}" if x else "" for x in per]
        o = r["over_seeds"]
        over = f"{o['mean']:.2f}" + (f" ± {o['ci95']:.2f}" if o["ci95"] is not None else "")
        setting = f"{r['n_way']}-way {r['k_shot']}-shot"
        lines.append(f"| {r['name']} | {setting} | " + " | ".join(shown) + f" | {over} | {r.get('published') or ''} |")
    return "\n".join(lines) + f"\n\n{doc['machine']}, {doc['date']}; command: `{doc['command']}`\n"


def renderer(doc: dict[str, Any]) -> Any:
    """The table writer for a results file, told apart by the keys its benchmark writes."""
    if "meta" in doc and all("align" in r for r in doc["rows"]):
        several_k = len({r.get("shots", doc["meta"].get("shots")) for r in doc["rows"]}) > 1
        return alignment_sweep_table if several_k else alignment_table
    if "limit_gflops" in doc:
        return roofline_table
    if "decode_peak" in doc:
        return decode_table
    if doc.get("format") == "metafew-python-matrix":
        return python_matrix_table
    if doc.get("benchmark") == "pretrain-seeds":
        return pretrain_seeds_table
    if isinstance(doc.get("table"), str):
        return mmap_table
    if doc.get("benchmark") == "learn2learn-equal-time":
        return equal_time_table
    if doc.get("benchmark") == "channels-last":
        return channels_last_table
    if str(doc.get("benchmark", "")).startswith("distributed"):
        return distributed_table
    return table


def render(text: str, base: Path) -> str:
    """``text`` with every marked table regenerated from its JSON file (paths relative to ``base``)."""

    def fill(m: re.Match[str]) -> str:
        doc = json.loads((base / m["file"]).read_text())
        return m.group(1) + renderer(doc)(doc) + m.group(4)

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
