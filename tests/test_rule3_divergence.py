"""Rule 3: a run that diverges stops with one line naming the step; non-finite weights are never saved or loaded."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import TRAIN, assert_one_line_error, run_cli

from metafew.checkpoint import load_backbone, load_state, save_backbone, save_state
from metafew.errors import CheckpointError


def strict(text: str) -> list[dict]:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("lr", ["1e30", "1e300"])
@pytest.mark.parametrize("extra", [[], ["--learner", "maml", "--option", "inner_lr=1e30"]])
def test_train_diverging_stops_and_saves_nothing_non_finite(lr, extra, capsys, tmp_path):
    run = tmp_path / "run"
    argv = [*TRAIN, "--steps", "6", "--checkpoint-every", "1", "--lr", lr, "--out", run, *extra]
    code, _, err = run_cli(capsys, *argv)
    line = assert_one_line_error(code, err, "diverged", "step", "learning rate")
    assert "Traceback" not in err and line
    for name in ("last.safetensors", "best.safetensors"):
        if (run / name).exists():
            load_state(run / name)  # loads: its weights are finite
    strict((run / "log.jsonl").read_text())


def test_pretrain_diverging_stops_and_writes_no_backbone(capsys, tmp_path):
    out = tmp_path / "b.safetensors"
    code, _, err = run_cli(
        capsys, "pretrain", "--dataset", "breastmnist", "--epochs", "2", "--lr", "1e30", "--out", out,
        "--device", "cpu", "--no-progress", "--backbone-option", "hidden=8",
    )  # fmt: skip
    assert_one_line_error(code, err, "pretraining diverged", "step", "epoch 1")
    assert not out.exists()
    strict((tmp_path / "b.log.jsonl").read_text())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_neither_saved_nor_loaded(value, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from metafew.backbones import create

    net = create("conv4", in_channels=1, image_size=28, hidden=8)
    good = save_backbone(net, tmp_path / "good.safetensors", mean=[0.5], std=[0.5])
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = value
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_backbone(net, tmp_path / "bad.safetensors", mean=[0.5], std=[0.5])
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_state({"w": torch.tensor([1.0, value])}, tmp_path / "s.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "s.safetensors").exists()
    with safe_open(str(good), "pt") as f:  # a file written elsewhere with a NaN inside: refused on load
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone().fill_(value)
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(poisoned), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_backbone(poisoned)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_state(poisoned)


def test_eval_and_adapt_refuse_a_nan_backbone(capsys, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from metafew.backbones.weights import shipped_path

    src = shipped_path("omniglot-conv4")
    assert src is not None
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    for t in tensors.values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", bad, "--device", "cpu", "--no-progress", "--episodes", "2")
    assert_one_line_error(code, err, "NaN or infinite", "nan.safetensors")
    code, _, err = run_cli(
        capsys, "adapt", "--data", "breastmnist", "--backbone", bad, "--out", tmp_path / "m", "--device", "cpu"
    )
    assert_one_line_error(code, err, "NaN or infinite")
    assert not (tmp_path / "m.safetensors").exists()
