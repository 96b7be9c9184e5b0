"""Rule 5: write errors are one line naming the path, checked before the work where possible."""

from __future__ import annotations

import errno

import pytest
from cli_helpers import TRAIN, assert_one_line_error, run_cli

from metafew.outputs import OutputError, guard_output, write_error


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
        (errno.EISDIR, "folder"),
    ],
)
def test_os_errors_become_one_line(code, words, tmp_path):
    e = write_error(tmp_path / "x.json", OSError(code, "boom"))
    assert isinstance(e, OutputError) and words in str(e) and "x.json" in str(e) and "\n" not in str(e)


def test_output_under_a_file_is_refused_before_the_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (
        ["eval", "--checkpoint", "omniglot-conv4", "--json", blocker / "r.json"],
        ["pretrain", "--dataset", "breastmnist", "--out", blocker / "b.safetensors"],
        [*TRAIN, "--steps", "2", "--out", blocker / "run"],
        ["bench", "--suite", "quick", "--out", blocker / "r.json"],
        ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", blocker / "m"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(blocker))
    with pytest.raises(OutputError, match="is a file"):
        guard_output(blocker / "x.json", "evaluation")


def test_a_full_disk_while_saving_is_one_line(capsys, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "disk is full", "last.safetensors")
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_interrupted_says_where_the_checkpoint_is(capsys, tmp_path, monkeypatch):
    from metafew.data import EpisodeSampler

    real = EpisodeSampler.sample_batch
    calls = {"n": 0}

    def interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            import signal

            signal.raise_signal(signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(EpisodeSampler, "sample_batch", interrupt)
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "5", "--out", tmp_path / "run")
    assert code == 130
    assert "interrupted" in err and str(tmp_path / "run") in err and "Traceback" not in err


def test_data_info_on_an_empty_folder_fails(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "info", f"folder:{tmp_path}")
    assert_one_line_error(code, err, "no images")
