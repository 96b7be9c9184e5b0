"""Run a benchmark suite: train each row (or reuse its checkpoint), test it, report.

For each row the runner builds the backbone and learner, meta-trains it with
:func:`metafew.engine.train` in ``<work_dir>/<row name>-<hash of the training
settings>/`` (``resume=True``: an interrupted or finished run is picked up where it
stopped), loads the best validation weights, evaluates on fixed test episodes (the
same episodes for every learner of a setting, so rows are paired) and caches the
result there. After every row the JSON rows, a Markdown table and a PNG plot are
rewritten, so a long suite can be watched and resumed.

All figures in the outputs are percentages.
"""

from __future__ import annotations

import inspect
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import learners
from ..backbones import create as create_backbone
from ..checkpoint import load_backbone, read_backbone_record
from ..data import EpisodeSampler, EpisodeSet, FewShotDataset, lake_runs, load_dataset
from ..device import resolve_device
from ..engine.evaluate import EvalResult, evaluate
from ..engine.train import TrainResult, load_weights, train
from ..errors import ConfigError
from .report import write_markdown, write_plot
from .suite import RowSpec, Suite

# Keys of every JSON row, in order (more may follow: name, metric, error_rate...).
ROW_KEYS = (
    "dataset", "learner", "backbone", "n_way", "k_shot", "n_query", "episodes", "accuracy_mean", "accuracy_ci95",
    "train_steps", "train_seconds", "device", "published", "source",
)


def describe_device(device: torch.device) -> str:
    """A readable name of the device results were measured on."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"


def _accepts(learner: str, option: str) -> bool:
    """Whether the named learner takes a keyword ``option`` (e.g. ``n_way``)."""
    return learners.accepts(learner, option)


def build_learner(spec: RowSpec, dataset: FewShotDataset, device: torch.device) -> nn.Module:
    """Backbone (new, or the row's pretrained checkpoint) and learner for a row, seeded by ``spec.seed``."""
    torch.manual_seed(spec.seed)
    if spec.backbone_checkpoint:
        backbone, _ = load_backbone(
            spec.backbone_checkpoint, in_channels=dataset.channels, image_size=dataset.image_size, arch=spec.backbone
        )
        backbone.train()
    else:
        try:
            backbone = create_backbone(
                spec.backbone or "conv4", in_channels=dataset.channels, image_size=dataset.image_size, **spec.backbone_options
            )
        except TypeError as e:  # an option the architecture does not take
            raise ConfigError(f"backbone {spec.backbone or 'conv4'}: {e}") from e
    options = dict(spec.learner_options)
    if "n_way" not in options and _accepts(spec.learner, "n_way"):
        options["n_way"] = spec.train_setting[0]
    return learners.create(spec.learner, backbone, **options).to(device)


def train_row(
    spec: RowSpec,
    row_dir: Path | None,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = True,
    resume: bool = True,
) -> tuple[nn.Module, TrainResult | None]:
    """Meta-train a row's learner (resuming in ``row_dir``) and load its best weights."""
    dev = resolve_device(device)
    train_ds = load_dataset(spec.dataset, spec.train_subset, root=data_root)
    learner = build_learner(spec, train_ds, dev)
    if spec.steps == 0:
        return learner, None
    way, shot, query = spec.train_setting
    sampler = EpisodeSampler(train_ds, way, shot, query, seed=spec.seed, device=dev)
    val = None
    if spec.val_subset and spec.val_episodes > 0:
        val_ds = load_dataset(spec.dataset, spec.val_subset, root=data_root)
        val = EpisodeSampler(val_ds, spec.n_way, spec.k_shot, spec.n_query, seed=spec.seed, device=dev).fixed(spec.val_episodes)
    config = run_config(spec, learner, train_ds)
    result = train(
        learner, sampler, steps=spec.steps, meta_batch_size=spec.meta_batch_size, optimizer=spec.optimizer, lr=spec.lr,
        schedule=spec.schedule, step_size=spec.step_size, gamma=spec.gamma, val_episodes=val, val_every=spec.val_every,
        val_batch_size=spec.eval_batch_size, log_every=spec.log_every, out_dir=row_dir,
        checkpoint_every=spec.checkpoint_every, resume=resume, amp=amp, grad_clip=spec.grad_clip,
        progress=progress, seed=spec.seed, config=config,
    )
    if result.checkpoint is not None and result.checkpoint.name == "best.safetensors":
        load_weights(learner, result.checkpoint, dev)
    return learner, result


def run_config(spec: RowSpec, learner: nn.Module, dataset: FewShotDataset) -> dict[str, Any]:
    """What a checkpoint records to rebuild its learner without the row's files (pretrained backbone included)."""
    config = spec.to_dict()
    if spec.backbone_checkpoint:
        rec = read_backbone_record(spec.backbone_checkpoint)
        config.update(backbone=rec.arch, backbone_options=rec.options, backbone_checkpoint=None,
                      pretrained_backbone=str(spec.backbone_checkpoint))
    config.update(backbone=config["backbone"] or "conv4", in_channels=dataset.channels, image_size=list(dataset.image_size))
    return config


def fixed_test_episodes(spec: RowSpec, *, data_root: str | Path | None = None, device: str | torch.device = "auto") -> EpisodeSet:
    """The row's fixed test episodes: ``eval_episodes`` sampled with ``seed``, or Lake's 20 runs."""
    if spec.test == "lake":
        return lake_runs(data_root)
    test_ds = load_dataset(spec.dataset, spec.test_subset, root=data_root)
    return EpisodeSampler(test_ds, spec.n_way, spec.k_shot, spec.n_query, seed=spec.seed, device=device).fixed(spec.eval_episodes)


def result_row(spec: RowSpec, ev: EvalResult, tr: TrainResult | None, device: str) -> dict[str, Any]:
    """The JSON row of a finished benchmark row (percentages)."""
    row: dict[str, Any] = {
        "dataset": spec.dataset,
        "learner": spec.learner,
        "backbone": (spec.backbone or "conv4") if not spec.backbone_checkpoint else f"pretrained {Path(spec.backbone_checkpoint).name}",
        "n_way": ev.n_way,
        "k_shot": ev.k_shot,
        "n_query": ev.n_query,
        "episodes": ev.episodes,
        "accuracy_mean": round(100 * ev.accuracy_mean, 3),
        "accuracy_ci95": round(100 * ev.accuracy_ci95, 3),
        "train_steps": tr.steps if tr else 0,
        "train_seconds": round(tr.seconds, 1) if tr else 0.0,
        "device": device,
        "published": spec.published,
        "source": spec.source,
        "name": spec.name,
        "metric": spec.metric,
        "train_way": spec.train_setting[0],
        "train_shot": spec.train_setting[1],
        "train_query": spec.train_setting[2],
        "best_val_accuracy": None if tr is None or tr.best_val_acc is None else round(100 * tr.best_val_acc, 3),
        "eval_seconds": round(ev.seconds, 1),
    }
    if spec.metric == "error":
        row["error_rate"] = round(100 - row["accuracy_mean"], 3)
        row["error_ci95"] = row["accuracy_ci95"]
    if ev.auc_mean is not None:
        row["auc_mean"], row["auc_ci95"] = round(ev.auc_mean, 4), round(ev.auc_ci95 or 0.0, 4)
    return row


def run_row(
    spec: RowSpec,
    work_dir: Path,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume, or reuse) and test one row; the test result is cached in its folder."""
    dev = resolve_device(device)
    row_dir = work_dir / f"{spec.name}-{spec.train_key()}"
    cache = row_dir / "result.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("spec") == json.loads(json.dumps(spec.to_dict())):
            return cached["row"]
    learner, tr = train_row(spec, row_dir, data_root=data_root, device=dev, amp=amp, progress=progress)
    episodes = fixed_test_episodes(spec, data_root=data_root, device=dev)
    ev = evaluate(learner, episodes, batch_size=spec.eval_batch_size, progress=progress)
    row = result_row(spec, ev, tr, describe_device(dev))
    row_dir.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec.to_dict(), "row": row, "accuracies": ev.accuracies.tolist()}
    cache.write_text(json.dumps(payload) + "\n")
    return row


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
    results: list[dict[str, Any]] = []
    for i, spec in enumerate(rows, 1):
        log(f"[{i}/{len(rows)}] {spec.name}: {spec.dataset} {spec.n_way}-way {spec.k_shot}-shot, {spec.learner}, {spec.steps} steps")
        start = time.perf_counter()
        row = run_row(spec, work, data_root=data_root, device=dev, amp=amp, progress=progress)
        results.append(row)
        shown = f"error {row['error_rate']:.2f}%" if spec.metric == "error" else f"{row['accuracy_mean']:.2f}%"
        pub = f" (published {spec.published})" if spec.published is not None else ""
        log(f"    {shown} ± {row['accuracy_ci95']:.2f}{pub} [{time.perf_counter() - start:.0f} s]")
        write_outputs(suite, results, out)
    return results


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
        "units": "percent",
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    write_markdown(suite, rows, md)
    write_plot(suite, rows, png)
    return out, md, png
