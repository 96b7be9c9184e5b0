"""Benchmark reports: a Markdown table and a PNG plot, each row beside its published figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .suite import Suite


def _value(row: dict[str, Any]) -> float:
    """The row's figure in its own metric: accuracy, or error rate (both in %)."""
    return row["error_rate"] if row.get("metric") == "error" else row["accuracy_mean"]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def markdown_table(suite: Suite, rows: list[dict[str, Any]]) -> str:
    """The suite's results as Markdown, one line per row, the published figure beside ours."""
    devices = sorted({r["device"] for r in rows})
    lines = [
        f"# Benchmark suite `{suite.name}`",
        "",
        *([suite.description, ""] if suite.description else []),
        f"Device: {', '.join(devices)}. Figures in %: mean over the fixed test episodes ± 95% CI "
        f"(1.96·std/√n); `err` marks an error rate. Δ = ours − {suite.published_label}.",
        "",
        f"| Row | Dataset | Learner | Backbone | Setting | Train (N/K/Q) | Ours | {suite.published_label.capitalize()} "
        "| Δ | Steps | Train time | Source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r.get("metric") == "error"
        ours = f"{'err ' if err else ''}{_value(r):.2f} ± {r['accuracy_ci95']:.2f}"
        pub = "" if r["published"] is None else f"{'err ' if err else ''}{r['published']:.2f}"
        delta = "" if r["published"] is None else f"{_value(r) - r['published']:+.2f}"
        setting = f"{r['n_way']}-way {r['k_shot']}-shot ({r['episodes']} ep.)"
        train = f"{r.get('train_way', '')}/{r.get('train_shot', '')}/{r.get('train_query', '')}"
        lines.append(
            f"| {r.get('name', '')} | {r['dataset']} | {r['learner']} | {r['backbone']} | {setting} | {train} | {ours} | "
            f"{pub} | {delta} | {r['train_steps']} | {_duration(r['train_seconds'])} | {r['source']} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(suite: Suite, rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text(markdown_table(suite, rows))
    return path


def write_plot(suite: Suite, rows: list[dict[str, Any]], path: Path) -> Path:
    """Our figure with its 95% CI error bar per row, the published figure beside it (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 4.2))
    try:
        ax.errorbar(
            [i - 0.1 for i in x],
            [_value(r) for r in rows],
            yerr=[r["accuracy_ci95"] for r in rows],
            fmt="o",
            capsize=4,
            label="metafew (95% CI)",
        )
        pub = [(i + 0.1, r["published"]) for i, r in zip(x, rows) if r["published"] is not None]
        if pub:
            ax.scatter(
                [p[0] for p in pub], [p[1] for p in pub], marker="x", color="C3", zorder=3, label=suite.published_label
            )
        metrics = {r.get("metric", "accuracy") for r in rows}
        ax.set_ylabel(
            {"accuracy": "accuracy (%)", "error": "error rate (%)"}.get(metrics.pop(), "%")
            if len(metrics) == 1
            else "accuracy / error (%)"
        )
        ax.set_xticks(x)
        ax.set_xticklabels(
            [r.get("name") or f"{r['learner']} {r['n_way']}w{r['k_shot']}s" for r in rows], rotation=30, ha="right"
        )
        ax.set_title(f"metafew benchmark: {suite.name}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
