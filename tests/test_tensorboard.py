"""``--tensorboard``: the JSON-lines log's rows as TensorBoard scalars, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import TRAIN, assert_one_line_error, run_cli

import metafew
from metafew.data import EpisodeSampler, FewShotDataset
from metafew.engine import tensorboard as tb

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason='tensorboard is not installed (pip install -e ".[tensorboard]")',
)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def column(rows: list[dict[str, Any]], key: str, step: str = "step") -> list[tuple[int, float]]:
    """A log column as TensorBoard stores it (float32)."""
    return [(r[step], float(np.float32(r[key]))) for r in rows if r.get(key) is not None]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_tensorboard
def test_train_tensorboard_holds_the_values_of_log_jsonl(capsys, tmp_path: Path) -> None:
    run = tmp_path / "run"
    validation = ["--val-episodes", "4", "--val-every", "2"]
    code, _, err = run_cli(capsys, *TRAIN, *validation, "--steps", "4", "--out", run, "--tensorboard")
    assert code == 0, err
    rows = read_rows(run / "log.jsonl")
    got = scalars(run / "tensorboard")
    assert got["train/loss"] == column(rows, "loss") and [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert got["train/accuracy"] == column(rows, "acc")
    assert got["train/lr"] == column(rows, "lr")
    assert got["val/accuracy"] == column(rows, "val_acc") and [s for s, _ in got["val/accuracy"]] == [0, 2, 4]
    assert got["val/accuracy_ci95"] == column(rows, "val_acc_ci95")
    low = [(r["step"], float(np.float32(r["val_acc"] - r["val_acc_ci95"]))) for r in rows if "val_acc" in r]
    assert got["val/accuracy_low"] == low
    assert [s for s, _ in got["time/seconds_per_step"]] == [2, 3, 4] and all(
        v > 0 for _, v in got["time/seconds_per_step"]
    )


class InterruptAt(EpisodeSampler):
    """A sampler that sends the process a Ctrl-C while drawing its ``at``-th meta-batch."""

    def __init__(self, *args: Any, at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.calls = at, 0

    def sample_batch(self, batch_size: int, reuse: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return super().sample_batch(batch_size, reuse)


@needs_tensorboard
def test_ctrl_c_flushes_the_events_and_a_resumed_run_logs_each_step_once(
    tmp_path: Path, omniglot_train: FewShotDataset
) -> None:
    def learner() -> Any:
        import torch

        torch.manual_seed(0)
        backbone = metafew.create_backbone("conv4", in_channels=1, image_size=28, hidden=8)
        return metafew.ProtoNet(backbone)

    def run(sampler: EpisodeSampler, steps: int = 5, **kw: Any) -> Any:
        return metafew.train(
            learner(), sampler, steps=steps, log_every=1, checkpoint_every=2, out_dir=tmp_path / "run",
            progress=False, tensorboard=True, **kw,
        )  # fmt: skip

    events = tmp_path / "run" / "tensorboard"  # tensorboard=True: inside the run folder
    with pytest.raises(KeyboardInterrupt):
        run(InterruptAt(omniglot_train, 5, 1, 2, seed=0, device="cpu", at=3))
    assert [s for s, _ in scalars(events)["train/loss"]] == [1, 2, 3]  # on disk when the run stopped
    result = run(EpisodeSampler(omniglot_train, 5, 1, 2, seed=0, device="cpu"), resume=True)  # the folder is a run's
    assert scalars(events)["train/loss"] == column(result.history, "loss")
    assert [s for s, _ in scalars(events)["train/loss"]] == [1, 2, 3, 4, 5]  # each step once
    run(EpisodeSampler(omniglot_train, 5, 1, 2, seed=0, device="cpu"), steps=2, overwrite=True)
    assert len(list(events.iterdir())) == 1  # a run started afresh: the replaced run's events are gone
    assert [s for s, _ in scalars(events)["train/loss"]] == [1, 2]


@needs_tensorboard
def test_pretrain_config_tensorboard_holds_the_epoch_rows(tmp_path: Path) -> None:
    from metafew.config import PretrainConfig, run_pretrain

    recipe = PretrainConfig(
        dataset="breastmnist", val_subset="val", epochs=2, batch_size=128, backbone_options={"hidden": 8},
        tensorboard=True,
    )  # fmt: skip
    out = run_pretrain(recipe, tmp_path / "conv4-breast", device="cpu", progress=False)
    rows = read_rows(out.with_suffix(".log.jsonl"))
    got = scalars(tmp_path / "conv4-breast.tensorboard")
    assert got["train/loss"] == column(rows, "loss", "epoch") and [s for s, _ in got["train/loss"]] == [1, 2]
    assert got["val/accuracy"] == column(rows, "val_acc", "epoch")
    assert got["val/loss"] == column(rows, "val_loss", "epoch")
    assert [s for s, _ in got["time/seconds_per_step"]] == [1, 2]
    assert recipe.key() == PretrainConfig(**{**recipe.to_dict(), "tensorboard": None}).key()  # not the recipe


def test_without_the_package_tensorboard_is_a_one_line_error(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an environment without it gives
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "run", "--tensorboard")
    assert_one_line_error(
        code,
        err,
        "TensorBoard logging needs the tensorboard package",
        'pip install -e ".[tensorboard]" from a metafew clone',
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, _, err = run_cli(
        capsys, "pretrain", "--dataset", "breastmnist", "--out", tmp_path / "b", "--tensorboard", tmp_path / "tb"
    )
    assert_one_line_error(code, err, 'pip install -e ".[tensorboard]"')
    assert not list(tmp_path.iterdir())


def test_only_rank_0_writes_and_true_needs_a_run_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tb.distributed, "is_main", lambda: False)
    with tb.tensorboard_log(tmp_path / "tb", step_key="step") as log:
        assert log is None
    assert not (tmp_path / "tb").exists()
    with pytest.raises(metafew.errors.ConfigError, match="tensorboard=True writes into the run's folder"):
        tb.tensorboard_folder(True, None)
    with pytest.raises(metafew.errors.ConfigError, match="tensorboard must be true, false or a folder"):
        metafew.RunConfig(tensorboard=3)  # type: ignore[arg-type]
