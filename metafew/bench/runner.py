"""Run a benchmark suite: train each row (or reuse its checkpoint), test it, report.

For each row (a :class:`~metafew.config.RunConfig` plus its published figure) the
runner meta-trains with :func:`metafew.config.train_run` in ``<work_dir>/<row name>-<hash of the training
settings>/`` (``resume=True``: an interrupted or finished run is picked up where it
stopped), loads the best validation weights, evaluates on fixed test episodes (the
same episodes for every learner of a setting, so rows are paired) and caches the
result there. After every row the JSON rows, a Markdown table and a PNG plot are
rewritten, so a long suite can be watched and resumed.

All figures in the outputs are percentages.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..config import test_episodes, train_run
from ..device import describe_device, resolve_device
from ..engine.evaluate import EvalResult, evaluate
from ..engine.train import TrainResult
from ..errors import ConfigError
from ..paths import atomic_write
from .report import write_markdown, write_plot
from .suite import BenchRow, Suite

# Keys of every JSON row, in order (more may follow: name, metric, error_rate...).
ROW_KEYS = (
    "dataset",
    "learner",
    "backbone",
    "n_way",
    "k_shot",
    "n_query",
    "episodes",
    "accuracy_mean",
    "accuracy_ci95",
    "train_steps",
    "train_seconds",
    "device",
    "published",
    "source",
)


def result_row(bench: BenchRow, ev: EvalResult, tr: TrainResult | None, device: str) -> dict[str, Any]:
    """The JSON row of a finished benchmark row (percentages)."""
    spec = bench.config
    row: dict[str, Any] = {
        "dataset": spec.dataset,
        "learner": spec.learner,
        "backbone": (spec.backbone or "conv4")
        if not spec.backbone_checkpoint
        else f"pretrained {Path(spec.backbone_checkpoint).name}",
        "n_way": ev.n_way,
        "k_shot": ev.k_shot,
        "n_query": ev.n_query,
        "episodes": ev.episodes,
        "accuracy_mean": round(100 * ev.accuracy_mean, 3),
        "accuracy_ci95": round(100 * ev.accuracy_ci95, 3),
        "train_steps": tr.steps if tr else 0,
        "train_seconds": round(tr.seconds, 1) if tr else 0.0,
        "device": device,
        "threads": torch.get_num_threads(),
        "recipe": "pretrained backbone" if spec.backbone_checkpoint else "from scratch",
        "published": bench.published,
        "source": bench.source,
        "name": spec.name,
        "metric": bench.metric,
        "train_way": spec.train_setting[0],
        "train_shot": spec.train_setting[1],
        "train_query": spec.train_setting[2],
        "best_val_accuracy": None if tr is None or tr.best_val_acc is None else round(100 * tr.best_val_acc, 3),
        "eval_seconds": round(ev.seconds, 1),
    }
    if bench.metric == "error":
        row["error_rate"] = round(100 - row["accuracy_mean"], 3)
        row["error_ci95"] = row["accuracy_ci95"]
    if ev.auc_mean is not None:
        row["auc_mean"], row["auc_ci95"] = round(ev.auc_mean, 4), round(ev.auc_ci95 or 0.0, 4)
    return row


def run_row(
    bench: BenchRow,
    work_dir: Path,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume, or reuse) and test one row; the test result is cached in its folder."""
    dev = resolve_device(device)
    spec = bench.config
    if amp is not None:
        spec.amp = amp
    row_dir = work_dir / f"{spec.name}-{spec.train_key()}"
    cache = row_dir / "result.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if _same_row(cached.get("spec"), bench.to_dict()):
            return cached["row"]
    learner, tr = train_run(spec, row_dir, data_root=data_root, device=dev, progress=progress)
    episodes = test_episodes(spec, data_root=data_root, device=dev)
    ev = evaluate(learner, episodes, batch_size=spec.eval_batch_size, progress=progress)
    row = result_row(bench, ev, tr, describe_device(dev))
    row_dir.mkdir(parents=True, exist_ok=True)
    payload = {"spec": bench.to_dict(), "row": row, "accuracies": ev.accuracies.tolist()}
    cache.write_text(json.dumps(payload) + "\n")
    return row


def pretrained_backbone(
    suite: Suite, work: Path, *, data_root: str | Path | None, device: torch.device, progress: bool, log: Any
) -> Path:
    """The suite's ``[pretrain]`` backbone in ``work``: made once, then reused (keyed by recipe and versions)."""
    from ..config import run_pretrain

    recipe = suite.pretrain
    assert recipe is not None
    path = work / f"pretrain-{recipe.backbone}-{recipe.dataset}-{recipe.key()}.safetensors"
    if path.is_file():
        log(f"pretrained backbone: {path} (reused)")
        return path
    log(f"pretraining {recipe.backbone} on {recipe.dataset}/{recipe.subset} ({recipe.epochs} epochs) -> {path}")
    start = time.perf_counter()
    run_pretrain(recipe, path, data_root=data_root, device=device, progress=progress)
    log(f"    pretrained in {time.perf_counter() - start:.0f} s")
    return path


def _same_row(cached: Any, current: dict[str, Any]) -> bool:
    """Whether a cached result is of this row; keys 0.1.0 did not record count only when set."""
    if not isinstance(cached, dict):
        return False
    current = json.loads(json.dumps(current))
    new_keys = ("amp", "in_channels", "image_size")
    return all(cached.get(k) == v for k, v in current.items() if not (k in new_keys and v is None and k not in cached))


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    work_dir: str | Path | None = None,
    only: list[str] | None = None,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = True,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Run every row (or those named in ``only``); write ``out`` (JSON), ``.md`` and ``.png`` beside it."""
    out = Path(out).expanduser()
    if out.suffix != ".json":
        out = out.with_suffix(".json")
    work = Path(work_dir).expanduser() if work_dir is not None else out.parent / "runs" / suite.name
    rows = suite.rows
    if only:
        unknown = [n for n in only if n not in {r.name for r in rows}]
        if unknown:
            raise ConfigError(f"suite {suite.name} has no row {unknown[0]!r}; rows: {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in only]
    dev = resolve_device(device)
    if suite.pretrain is not None:
        backbone = pretrained_backbone(suite, work, data_root=data_root, device=dev, progress=progress, log=log)
        for bench in rows:
            bench.config.backbone_checkpoint = bench.config.backbone_checkpoint or str(backbone)
    results: list[dict[str, Any]] = []
    for i, bench in enumerate(rows, 1):
        spec = bench.config
        log(
            f"[{i}/{len(rows)}] {spec.name}: {spec.dataset} {spec.n_way}-way {spec.k_shot}-shot, {spec.learner}, {spec.steps} steps"
        )
        start = time.perf_counter()
        row = run_row(bench, work, data_root=data_root, device=dev, amp=amp, progress=progress)
        results.append(row)
        shown = f"error {row['error_rate']:.2f}%" if bench.metric == "error" else f"{row['accuracy_mean']:.2f}%"
        pub = f" (published {bench.published})" if bench.published is not None else ""
        log(f"    {shown} ± {row['accuracy_ci95']:.2f}{pub} [{time.perf_counter() - start:.0f} s]")
        write_outputs(suite, results, out)
    return results


def _git_commit() -> str | None:
    """The commit of the metafew source tree these results came from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_outputs(suite: Suite, rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path, Path]:
    """Write ``out`` (JSON), ``out.md`` and ``out.png``; returns the three paths."""
    from .. import __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "suite": suite.name,
        "description": suite.description,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metafew_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "command": " ".join(["metafew", *sys.argv[1:]]) if Path(sys.argv[0]).name == "metafew" else None,
        "pretrain": suite.pretrain.to_dict() if suite.pretrain is not None else None,
        "units": "percent",
        "rows": rows,
    }
    text = json.dumps(doc, indent=2) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(out, write)
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    write_markdown(suite, rows, md)
    write_plot(suite, rows, png)
    return out, md, png
