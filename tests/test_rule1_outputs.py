"""Rule 1: metafew never overwrites or deletes what it did not write; its own files only with --overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import TRAIN, assert_one_line_error, run_cli

from metafew.checkpoint import save_backbone, save_state
from metafew.outputs import OutputError, guard_output, guard_run_dir, is_metafew_file
from metafew.paths import atomic_write

USER_BYTES = b"the user's own data\n"


def user_file(path: Path, data: bytes = USER_BYTES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "kind", ["model", "backbone", "state", "report", "png", "predictions", "evaluation", "bench", "pretrain-log"]
)
@pytest.mark.parametrize("content", [USER_BYTES, b"", b"{}", b'{"format": "something-else"}', b"\x89PNG\r\n\x1a\n"])
def test_guard_refuses_every_foreign_file(kind, content, tmp_path):
    p = user_file(tmp_path / "out.any", content)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="refusing to overwrite"):
            guard_output(p, kind, overwrite=overwrite)
    assert p.read_bytes() == content


def test_guard_own_file_needs_overwrite_and_folders_and_links_are_refused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"format": "metafew-evaluation"}))
    with pytest.raises(OutputError, match="--overwrite"):
        guard_output(p, "evaluation")
    assert guard_output(p, "evaluation", overwrite=True) == p
    with pytest.raises(OutputError, match="not a metafew benchmark"):  # another kind of metafew file
        guard_output(p, "bench", overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        guard_output(tmp_path, "evaluation", overwrite=True)
    link = tmp_path / "link.json"
    link.symlink_to(p)
    with pytest.raises(OutputError):
        guard_output(link, "evaluation", overwrite=True)
    assert guard_output(tmp_path / "new" / "deeper" / "x.json", "evaluation") == tmp_path / "new" / "deeper" / "x.json"


def test_checkpoint_save_refuses_foreign_files_and_other_kinds(tmp_path):
    from metafew.backbones import create

    p = user_file(tmp_path / "mine.safetensors")
    with pytest.raises(OutputError, match="not a metafew checkpoint"):
        save_state({"w": torch.ones(2)}, p)
    assert p.read_bytes() == USER_BYTES
    state = save_state({"w": torch.ones(2)}, tmp_path / "state.safetensors")
    before = state.read_bytes()
    with pytest.raises(OutputError, match="state checkpoint, not a backbone"):
        save_backbone(create("conv4", in_channels=1, image_size=28, hidden=8), state, mean=[0.5], std=[0.5])
    assert state.read_bytes() == before
    assert is_metafew_file(state, "state") and not is_metafew_file(state, "backbone")


def test_stale_tmp_files_are_cleaned_on_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "x.json"
    stale = user_file(tmp_path / f".x.json.{pid}.abcd.tmp")
    old = user_file(tmp_path / ".x.json.oldstyle.tmp")
    os.utime(old, (0, 0))
    mine = user_file(tmp_path / f".x.json.{os.getpid()}.live.tmp")  # a write of this (live) process: kept
    other = user_file(tmp_path / f".y.json.{pid}.abcd.tmp")  # another file's: kept
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert not stale.exists() and not old.exists() and mine.exists() and other.exists()
    assert target.read_text() == "{}"


def test_run_folder_guard(tmp_path):
    run = tmp_path / "run"
    user_file(run / "notes.txt")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        guard_run_dir(run, resume=False, overwrite=True)
    fake = tmp_path / "fake"
    user_file(fake / "best.safetensors")  # a metafew name, not metafew content
    with pytest.raises(OutputError, match=r"best\.safetensors"):
        guard_run_dir(fake, resume=True, overwrite=True)
    assert (fake / "best.safetensors").read_bytes() == USER_BYTES
    with pytest.raises(OutputError, match="is a file"):
        guard_run_dir(user_file(tmp_path / "f"), resume=False, overwrite=False)


def test_train_never_deletes_a_users_files(capsys, tmp_path):
    run = tmp_path / "run"
    user_file(run / "best.safetensors")
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--overwrite")
    assert_one_line_error(code, err, "best.safetensors", "did not write")
    assert (run / "best.safetensors").read_bytes() == USER_BYTES
    user_file(run / "best.safetensors").unlink()
    user_file(run / "log.jsonl", b"my own log\n")
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert_one_line_error(code, err, "log.jsonl")
    assert (run / "log.jsonl").read_bytes() == b"my own log\n"


def test_train_overwrite_replaces_its_own_run_and_an_interrupted_one_leaves_no_old_weights(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert code == 0, err
    assert (run / "last.safetensors").is_file()
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert_one_line_error(code, err, "--overwrite")

    from metafew.config import RunConfig, train_run

    class Boom(RuntimeError):
        pass

    config = RunConfig(learner="protonet", backbone_options={"hidden": 8}, n_query=2, val_episodes=0, steps=2)
    from metafew.data import EpisodeSampler

    def explode(self, *a, **k):
        raise Boom

    mp = pytest.MonkeyPatch()
    mp.setattr(EpisodeSampler, "sample_batch", explode)
    try:
        with pytest.raises(Boom):
            train_run(config, run, device="cpu", progress=False, resume=False, overwrite=True)
    finally:
        mp.undo()
    assert not (run / "last.safetensors").exists() and not (run / "best.safetensors").exists()
    assert not (run / ".metafew.lock").exists()  # released


def test_eval_json_pretrain_out_and_logs_are_guarded(capsys, tmp_path):
    js = user_file(tmp_path / "results.json", b'{"mine": 1}')
    code, _, err = run_cli(capsys, "eval", "--checkpoint", "omniglot-conv4", "--json", js, "--device", "cpu")
    assert_one_line_error(code, err, "refusing to overwrite", "results.json")
    assert js.read_bytes() == b'{"mine": 1}'

    out = user_file(tmp_path / "b.safetensors")
    code, _, err = run_cli(capsys, "pretrain", "--dataset", "breastmnist", "--epochs", "1", "--out", out)
    assert_one_line_error(code, err, "refusing to overwrite", "b.safetensors")
    assert out.read_bytes() == USER_BYTES
    log = user_file(tmp_path / "c.log.jsonl", b'{"my": "log"}\n')
    code, _, err = run_cli(capsys, "pretrain", "--dataset", "breastmnist", "--epochs", "1", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "c.log.jsonl")
    assert log.read_bytes() == b'{"my": "log"}\n' and not (tmp_path / "c.safetensors").exists()


def test_pretrain_replaces_its_own_backbone_only_with_overwrite_and_starts_a_fresh_log(capsys, tmp_path):
    argv = ["pretrain", "--dataset", "breastmnist", "--epochs", "1", "--device", "cpu", "--no-progress"]
    out = tmp_path / "b.safetensors"
    code, _, err = run_cli(capsys, *argv, "--out", out, "--backbone-option", "hidden=8")
    assert code == 0, err
    code, _, err = run_cli(capsys, *argv, "--out", out, "--backbone-option", "hidden=8")
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli(capsys, *argv, "--out", out, "--backbone-option", "hidden=8", "--overwrite")
    assert code == 0, err
    rows = (tmp_path / "b.log.jsonl").read_text().splitlines()
    assert len(rows) == 1  # a fresh log, not appended to the first run's


@pytest.mark.parametrize("suffix", [".json", ".md", ".png"])
def test_bench_refuses_foreign_reports(suffix, capsys, tmp_path):
    out = tmp_path / "res.json"
    mine = user_file(out.with_suffix(suffix))
    code, _, err = run_cli(capsys, "bench", "--suite", "quick", "--out", out, "--device", "cpu")
    assert_one_line_error(code, err, "refusing to overwrite", mine.name)
    assert mine.read_bytes() == USER_BYTES
