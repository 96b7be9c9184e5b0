"""``metafew pretrain --resume``: Ctrl-C or a crash keeps what was done, and resuming gives the same weights.

Real Omniglot (20 characters of the training split, 400 drawings; 5-way few-shot checks on
10 validation characters) and a Conv-4 of width 8: a 2-epoch run takes well under a second.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

import metafew
from metafew.checkpoint import load_state
from metafew.data import FewShotDataset, FlipCrop
from metafew.engine.pretrain import resume_path
from metafew.errors import ConfigError
from metafew.outputs import OutputError

EPOCHS, STEPS = 2, 8  # 400 images in batches of 50


@pytest.fixture(scope="module")
def data(omniglot_train: FewShotDataset, omniglot_val: FewShotDataset) -> tuple[FewShotDataset, FewShotDataset]:
    return omniglot_train.subset(range(0, 80, 4)), omniglot_val.subset(range(0, 40, 4))


def recipe(data: tuple[FewShotDataset, FewShotDataset], **kw: Any) -> dict[str, Any]:
    """The run of these tests: augmented (the batch-order generator is also the augmentation's), best epoch kept."""
    train, val = data
    return {
        "backbone": "conv4",
        "dataset": train,
        "epochs": EPOCHS,
        "batch_size": 50,
        "device": "cpu",
        "progress": False,
        "backbone_options": {"hidden": 8},
        "augment": FlipCrop(padding=2, flip=False),
        "val": val,
        "val_episodes": 20,
        "keep": "best",
        **kw,
    }


class SigintAt:
    """FlipCrop that sends the process a Ctrl-C at its ``at``-th batch (the same recipe: the same repr)."""

    def __init__(self, at: int) -> None:
        self.inner, self.at, self.calls = FlipCrop(padding=2, flip=False), at, 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return self.inner(x, generator)

    def __repr__(self) -> str:
        return repr(self.inner)


def figures(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # all but the timings


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # exact, tensor by tensor


@pytest.fixture(scope="module")
def whole(
    data: tuple[FewShotDataset, FewShotDataset], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]]]:
    """The uninterrupted run: its backbone file and its log rows."""
    out = tmp_path_factory.mktemp("whole") / "conv4.safetensors"
    backbone = metafew.pretrain(**recipe(data), out=out)
    assert not resume_path(out).exists()  # finished: nothing left to resume
    return out, backbone.pretrain_history


@pytest.mark.parametrize("at", [STEPS + 3, STEPS], ids=["mid-epoch", "last-step-of-an-epoch"])
def test_ctrl_c_then_resume_gives_bit_identical_weights(data, whole, tmp_path: Path, at: int) -> None:
    out = tmp_path / "conv4.safetensors"
    with pytest.raises(KeyboardInterrupt) as stopped:
        metafew.pretrain(**recipe(data, augment=SigintAt(at)), out=out, log=tmp_path / "log.jsonl")
    message = str(stopped.value)
    assert f"interrupted at step {at} of {EPOCHS * STEPS}" in message
    assert f"checkpoint saved in {resume_path(out)}" in message and "--resume" in message
    assert not out.exists() and resume_path(out).is_file()
    _, record = load_state(resume_path(out))
    assert (record["epoch"], record["step"]) == ((2, 3) if at > STEPS else (2, 0))  # where the next step starts
    assert len(record["history"]) == 1  # epoch 1 was logged, and is kept

    backbone = metafew.pretrain(**recipe(data), out=out, log=tmp_path / "log.jsonl", resume=True)
    assert_same_weights(whole[0], out)
    assert figures(backbone.pretrain_history) == figures(whole[1])  # losses, accuracies, lr: exactly equal
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # the log continues, with no row twice
    assert not resume_path(out).exists()


def test_a_crash_resumes_from_the_last_periodic_checkpoint(data, whole, tmp_path: Path) -> None:
    """No Ctrl-C: the run dies; ``checkpoint_every`` steps had saved it mid-epoch."""
    out = tmp_path / "conv4.safetensors"

    def power_cut(entry: dict[str, Any]) -> None:
        raise RuntimeError("power cut")  # at the end of epoch 1, before its checkpoint

    with pytest.raises(RuntimeError, match="power cut"):
        metafew.pretrain(**recipe(data), out=out, log=power_cut, checkpoint_every=3)
    _, record = load_state(resume_path(out))
    assert (record["epoch"], record["step"], record["history"]) == (1, 6, [])

    entries: list[dict[str, Any]] = []
    metafew.pretrain(**recipe(data), out=out, log=entries.append, checkpoint_every=3, resume=True)
    assert figures(entries) == figures(whole[1])
    assert_same_weights(whole[0], out)


def test_resume_from_another_recipe_is_one_line_naming_the_difference(data, tmp_path: Path) -> None:
    out = tmp_path / "conv4"
    with pytest.raises(KeyboardInterrupt):
        metafew.pretrain(**recipe(data, augment=SigintAt(2)), out=out)
    with pytest.raises(
        ConfigError, match=r"another pretraining \(backbone_options \{'hidden': 8\} -> \{'hidden': 16\}\)"
    ):
        metafew.pretrain(**recipe(data, backbone_options={"hidden": 16}), out=out, resume=True)
    with pytest.raises(ConfigError, match=r"another pretraining \(backbone 'conv4' -> 'resnet12'"):
        metafew.pretrain(**recipe(data, backbone="resnet12", backbone_options={}), out=out, resume=True)
    with pytest.raises(ConfigError, match=r"\(lr 0\.05 -> 0\.1\); resume with the same settings, or pass --overwrite"):
        metafew.pretrain(**recipe(data, lr=0.1), out=out, resume=True)
    # neither continued nor replaced silently
    with pytest.raises(OutputError, match=r"holds an interrupted pretraining of conv4\.safetensors; pass --resume"):
        metafew.pretrain(**recipe(data), out=out)
    with pytest.raises(ConfigError, match="pass one of them"):
        metafew.pretrain(**recipe(data), out=out, resume=True, overwrite=True)
    assert resume_path(out).is_file()
    metafew.pretrain(**recipe(data, epochs=1), out=out, overwrite=True)  # another recipe: start afresh
    assert not resume_path(out).exists() and (tmp_path / "conv4.safetensors").is_file()
    with pytest.raises(OutputError, match="is a finished pretraining"):
        metafew.pretrain(**recipe(data, epochs=1), out=out, resume=True)


FAST = [
    "pretrain", "--dataset", "breastmnist", "--device", "cpu", "--no-progress", "--epochs", "2",
    "--batch-size", "128", "--backbone-option", "hidden=8",
]  # fmt: skip


def test_cli_ctrl_c_exits_130_and_resume_matches_the_whole_run(capsys, tmp_path: Path, monkeypatch) -> None:
    code, _, err = run_cli(capsys, *FAST, "--out", tmp_path / "whole")
    assert code == 0, err

    from metafew.engine.pretrain import _DeviceBatches

    calls = {"n": 0}
    get = _DeviceBatches.get

    def sigint_at_step_3(self, idx):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return get(self, idx)

    with monkeypatch.context() as m:
        m.setattr(_DeviceBatches, "get", sigint_at_step_3)
        code, _, err = run_cli(capsys, *FAST, "--out", tmp_path / "part")
    assert code == 130, err
    state = tmp_path / "part.resume.safetensors"
    assert f"metafew: interrupted: interrupted at step 3 of 8 (in epoch 1); checkpoint saved in {state}" in err
    assert "--resume" in err and "Traceback" not in err

    code, _, err = run_cli(capsys, *FAST, "--out", tmp_path / "part")  # neither resumed nor replaced
    assert_one_line_error(code, err, "holds an interrupted pretraining", "--resume", "--overwrite")
    code, stdout, err = run_cli(capsys, *FAST, "--out", tmp_path / "part", "--resume")
    assert code == 0, err
    assert "resuming" in stdout
    assert_same_weights(tmp_path / "whole.safetensors", tmp_path / "part.safetensors")
    rows = [json.loads(line) for line in (tmp_path / "part.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]

    code, _, err = run_cli(capsys, *FAST, "--out", tmp_path / "none", "--resume")
    assert_one_line_error(code, err, "--resume: there is no interrupted pretraining to continue")
    code, _, err = run_cli(capsys, *FAST, "--out", tmp_path / "whole", "--resume")
    assert_one_line_error(code, err, "whole.safetensors is a finished pretraining", "--overwrite")
