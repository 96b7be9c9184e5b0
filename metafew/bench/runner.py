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


def ensure_data(
    dataset: str,
    subset: str,
    *,
    data_root: str | Path | None = None,
    options: dict[str, Any] | None = None,
    lake: bool = False,
    download: bool = True,
    log: Any = print,
) -> None:
    """Make sure ``dataset`` (and Lake's runs when ``lake``) is there, fetching it on first use.

    The shared first-use rule (:func:`metafew.data.download.ensure_dataset`): a dataset with
    an official source that is not found is downloaded (md5-checked, resumable, with a line
    saying what, from where, how big and where to) unless ``download`` is False or
    ``$METAFEW_OFFLINE`` is set: then its "not found" error is raised, saying where it
    looked and how to point at a copy instead.
    """
    from ..data.download import ensure_dataset, fetch_on_first_use
    from ..data.lake import locate_lake_runs

    ensure_dataset(dataset, subset, root=data_root, download=download, log=log, **(options or {}))
    if lake:
        fetch_on_first_use(
            "Lake's one-shot runs",
            lambda dl: locate_lake_runs(data_root, download=dl),
            download=download,
            root=data_root,
            log=log,
        )


def run_row(
    bench: BenchRow,
    work_dir: Path,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = True,
    download: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Train (or resume, or reuse) and test one row; the test result is cached in its folder.

    With ``download``, a missing dataset with an official source is fetched first (:func:`ensure_data`).
    """
    dev = resolve_device(device)
    spec = bench.config
    if amp is not None:
        spec.amp = amp
    row_dir = row_folder(bench, work_dir)
    cache = row_dir / "result.json"
    cached = cached_row(bench, work_dir)
    if cached is not None:
        return cached
    ensure_data(
        spec.dataset,
        spec.train_subset,
        data_root=data_root,
        options=spec.dataset_options(),
        lake=spec.test == "lake",
        download=download,
        log=log,
    )
    learner, tr = train_run(spec, row_dir, data_root=data_root, device=dev, progress=progress)
    episodes = test_episodes(spec, data_root=data_root, device=dev)
    ev = evaluate(learner, episodes, batch_size=spec.eval_batch_size, progress=progress)
    row = result_row(bench, ev, tr, describe_device(dev))
    row_dir.mkdir(parents=True, exist_ok=True)
    payload = {"spec": bench.to_dict(), "row": row, "accuracies": ev.accuracies.tolist()}
    cache.write_text(json.dumps(payload) + "\n")
    return row


def row_folder(bench: BenchRow, work_dir: Path) -> Path:
    """Where a row trains: ``<work_dir>/<row name>-<hash of what determines its weights>``."""
    return work_dir / f"{bench.config.name}-{bench.config.train_key()}"


def cached_row(bench: BenchRow, work_dir: Path) -> dict[str, Any] | None:
    """The finished result of this very row in ``work_dir``, or None (then it is trained or resumed)."""
    cache = row_folder(bench, work_dir) / "result.json"
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    return report_keys(cached["row"], bench) if same_row(cached.get("spec"), bench.to_dict()) else None


def report_keys(row: dict[str, Any], bench: BenchRow) -> dict[str, Any]:
    """A cached result row with the row's current name, published figure and source (these never retrain it)."""
    return {**row, "name": bench.name, "published": bench.published, "source": bench.source}


def _plan(rows: list[BenchRow], work: Path, log: Any) -> float | None:
    """Say what will run and for how long (the rows' ``expected_seconds``); returns the seconds expected."""
    todo = [b for b in rows if cached_row(b, work) is None]
    known = [b.expected_seconds for b in todo if b.expected_seconds is not None]
    eta = f", about {_minutes(sum(known))}" if known and len(known) == len(todo) else ""
    if todo and known and len(known) < len(todo):
        eta = f", at least {_minutes(sum(known))} ({len(todo) - len(known)} without an estimate)"
    reused = f"; {len(rows) - len(todo)} finished and reused from {work}" if len(todo) < len(rows) else ""
    log(f"plan: {len(todo)} of {len(rows)} rows to train and test{eta}{reused}")
    return sum(known) if todo and len(known) == len(todo) else None


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def pretrained_backbone(
    suite: Suite,
    work: Path,
    *,
    data_root: str | Path | None,
    device: torch.device,
    progress: bool,
    log: Any,
    download: bool = False,
) -> Path:
    """The suite's ``[pretrain]`` backbone in ``work``: made once, then reused while what made it holds.

    Keyed by the recipe, metafew's and torch's versions, the code that computes the weights
    and a fingerprint of the training data (:mod:`metafew.bench.provenance`).
    """
    from ..config import run_pretrain
    from .provenance import changes, pretrain_provenance, provenance_key, read_provenance, write_provenance

    recipe = suite.pretrain
    assert recipe is not None
    stem = f"pretrain-{recipe.backbone}-{recipe.dataset}-{recipe.key()}"
    current = pretrain_provenance(recipe, data_root)
    path = work / f"{stem}-{provenance_key(current)}.safetensors"
    if path.is_file():
        log(f"pretrained backbone: {path} (reused)")
        return path
    legacy = work / f"{stem}.safetensors"  # cached before provenance was recorded
    if legacy.is_file():
        recorded = read_provenance(legacy)
        if recorded is None:
            write_provenance(legacy, {**current, "adopted": True})
            log(f"pretrained backbone: {legacy} (reused: same recipe and versions; its code and data are recorded now)")
            return legacy
        if not changes(recorded, current):
            log(f"pretrained backbone: {legacy} (reused)")
            return legacy
    earlier = [read_provenance(p) for p in sorted(work.glob(f"{stem}*.safetensors"), key=lambda p: p.stat().st_mtime)]
    known = [r for r in earlier if r is not None]
    if known:
        log(f"pretrained backbone of this recipe is stale ({', '.join(changes(known[-1], current))} changed)")
    ensure_data(
        recipe.dataset, recipe.subset, data_root=data_root, options=recipe.dataset_options, download=download, log=log
    )
    log(f"pretraining {recipe.backbone} on {recipe.dataset}/{recipe.subset} ({recipe.epochs} epochs) -> {path}")
    start = time.perf_counter()
    # an interrupted pretraining of this recipe (its .resume.safetensors) is continued
    run_pretrain(recipe, path, data_root=data_root, device=device, progress=progress, resume=True)
    write_provenance(path, current)
    log(f"    pretrained in {time.perf_counter() - start:.0f} s")
    return path


def same_row(cached: Any, current: dict[str, Any]) -> bool:
    """Whether a cached result is of this row; keys 0.1.0 did not record count only when set."""
    if not isinstance(cached, dict):
        return False
    current = json.loads(json.dumps(current))
    for key in ("name", *BenchRow.REPORT_KEYS):  # naming and reporting: not part of what is trained and tested
        if key != "metric":
            current.pop(key, None)
    new_keys = {"amp": None, "in_channels": None, "image_size": None, "skip_bad": False}  # and their defaults
    return all(
        cached.get(k) == v for k, v in current.items() if not (k in new_keys and v == new_keys[k] and k not in cached)
    )


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
    download: bool = False,
) -> list[dict[str, Any]]:
    """Run every row (or those named in ``only``); write ``out`` (JSON), ``.md`` and ``.png`` beside it.

    With ``download`` (``metafew bench`` sets it unless ``--no-download``), a dataset a row needs
    is fetched from its official source on first use (:func:`ensure_data`).
    """
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
        backbone = pretrained_backbone(
            suite, work, data_root=data_root, device=dev, progress=progress, log=log, download=download
        )
        for bench in rows:
            bench.config.backbone_checkpoint = bench.config.backbone_checkpoint or str(backbone)
    if amp is not None:
        for bench in rows:
            bench.config.amp = amp
    expected = _plan(rows, work, log)
    results: list[dict[str, Any]] = []
    began, spent_expected = time.perf_counter(), 0.0
    for i, bench in enumerate(rows, 1):
        spec = bench.config
        log(
            f"[{i}/{len(rows)}] {spec.name}: {spec.dataset} {spec.n_way}-way {spec.k_shot}-shot, {spec.learner}, {spec.steps} steps"
        )
        start = time.perf_counter()
        reused = cached_row(bench, work) is not None
        row = run_row(
            bench, work, data_root=data_root, device=dev, amp=amp, progress=progress, download=download, log=log
        )
        results.append(row)
        shown = f"error {row['error_rate']:.2f}%" if bench.metric == "error" else f"{row['accuracy_mean']:.2f}%"
        pub = f" ({suite.published_label} {bench.published})" if bench.published is not None else ""
        took = f"reused from {row_folder(bench, work)}" if reused else f"{time.perf_counter() - start:.0f} s"
        if expected and not reused and bench.expected_seconds is not None and i < len(rows):
            spent_expected += bench.expected_seconds
            pace = (time.perf_counter() - began) / max(spent_expected, 1e-9)  # this machine vs the estimate
            took += f"; about {_minutes(pace * (expected - spent_expected))} left"
        log(f"    {shown} ± {row['accuracy_ci95']:.2f}{pub} [{took}]")
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
