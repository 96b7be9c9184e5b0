"""Every command, a set of bad inputs: exit status 2, one line, never a Python traceback."""

from __future__ import annotations

import pytest
from cli_helpers import run_cli

BAD = [
    ["data", "info", "nope"], ["data", "info", "folder:/nonexistent/x"], ["data", "inf", "omniglot"],
    ["pretrain", "--out", "{dir}"], ["pretrain", "--dataset", "nope", "--out", "b"], ["pretrain", "--epochs", "-3", "--out", "b"],
    ["pretrain", "--out", "{file}/b"], ["pretrain", "--backbone", "nope", "--out", "b"],
    ["train", "--out", "{file}"], ["train", "--dataset", "nope", "--out", "r"], ["train", "--suite", "nope", "--row", "x"],
    ["train", "--suite", "quick"], ["train", "--resume", "--out", "{dir}/none"], ["train", "--option", "x", "--out", "r"],
    ["eval", "--checkpoint", "missing.safetensors"], ["eval", "--checkpoint", "{dir}"], ["eval", "--checkpoint", "{file}"],
    ["eval", "--checkpoint", "omniglot-conv4", "--json", "{dir}"], ["eval", "--checkpoint", "omniglot-conv4", "--dataset", "nope"],
    ["bench", "--suite", "nope"], ["bench", "--suite", "{file}"], ["bench", "--suite", "quick", "--row", "nope"],
    ["bench", "--out", "{json}"], ["bench", "--work-dir", "{file}", "--out", "r.json"],
    ["adapt", "--data", "nope", "--backbone", "omniglot-conv4", "--out", "m"],
    ["adapt", "--data", "breastmnist", "--backbone", "{file}", "--out", "m"],
    ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", "{file}"],
    ["adapt", "--data", "breastmnist", "--backbone", "omniglot-conv4", "--out", "m", "--shots", "abc"],
    ["predict", "--model", "{file}", "x.png"], ["predict", "--model", "omniglot-conv4", "x.png"],
    ["predict", "--model", "missing", "x.png"], ["nonsense"],
]  # fmt: skip


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "user.txt"
    user.write_text("the user's file\n")
    js = tmp_path / "user.json"
    js.write_text('{"mine": true}')
    argv = [a.replace("{dir}", str(tmp_path)).replace("{file}", str(user)).replace("{json}", str(js)) for a in argv]
    if argv[0] in ("pretrain", "train", "eval", "adapt"):
        argv += ["--device", "cpu", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err + out
    assert sum("error: " in line for line in err.splitlines()) == 1, err
    assert user.read_text() == "the user's file\n" and js.read_text() == '{"mine": true}'
