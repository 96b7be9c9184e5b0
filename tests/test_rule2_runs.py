"""Rule 2: one run folder, one writer, one configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import TRAIN, assert_one_line_error, run_cli

from metafew.outputs import LOCK_NAME, OutputError, run_lock


def test_lock_refuses_a_second_owner_and_takes_over_a_stale_lock(tmp_path):
    with run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputError, match="already being written"), run_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK_NAME).exists()
    import socket

    host = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    with pytest.raises(OutputError, match=f"pid {os.getppid()}"), run_lock(tmp_path):
        pass
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    for stale in (json.dumps({"pid": dead, "host": host}), "garbage"):
        (tmp_path / LOCK_NAME).write_text(stale)
        with run_lock(tmp_path) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()


def test_a_second_process_is_refused_in_one_line(capsys, tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert_one_line_error(code, err, "in use by another metafew process", str(os.getppid()))
    assert not (run / "last.safetensors").exists()


@pytest.mark.parametrize(
    "change",
    [["--n-way", "10"], ["--lr", "0.01"], ["--train-way", "7"], ["--k-shot", "2"], ["--meta-batch-size", "2"]],
)
def test_resume_with_other_settings_is_refused_unless_allowed(change, capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert code == 0, err
    before = (run / "last.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--resume", *change)
    assert_one_line_error(code, err, "other settings", "--allow-config-change")
    assert (run / "last.safetensors").read_bytes() == before
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "3", "--out", run, "--resume", *change, "--allow-config-change")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event")]
    assert len(events) == 1 and events[0]["step"] == 2 and "steps" in events[0]["changes"]


def test_resume_with_the_same_settings_and_without_a_run(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--resume")
    assert_one_line_error(code, err, "--resume", "holds no run")
    assert not (run / "last.safetensors").exists()
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run)
    assert code == 0, err
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--resume")
    assert code == 0, err
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--resume", "--overwrite")
    assert_one_line_error(code, err, "one of them")
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--allow-config-change")
    assert_one_line_error(code, err, "--resume")
