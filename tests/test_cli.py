"""The ``metafew`` command line: help, one-line errors with exit status 2, train/eval and bench end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metafew.bench import ROW_KEYS
from metafew.cli.main import COMMANDS, main

COMMAND_NAMES = ["data", "pretrain", "train", "eval", "bench", "export-backbone", "adapt", "predict"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metafew: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_every_command_is_registered():
    assert len(COMMANDS) == len(COMMAND_NAMES)


@pytest.mark.parametrize("command", [None, *COMMAND_NAMES])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: metafew" in out
    if command:
        honoured = {"data": {"--data-root"}, "export-backbone": {"--data-root"}, "predict": {"--device"}}.get(
            command, set(COMMON_FLAGS)
        )
        shown = {flag for flag in COMMON_FLAGS if flag in out}
        assert shown == honoured, f"{command} shows {sorted(shown)}, honours {sorted(honoured)}"
        if command != "data":
            assert "examples:" in out or command in ("adapt", "predict")


COMMON_FLAGS = ("--device", "--seed", "--data-root", "--amp", "--no-progress")


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "info", "omniglot", "--seed", "3"],
        ["data", "info", "omniglot", "--amp", "bf16"],
        ["predict", "--model", "x.model", "y/", "--data-root", "z"],
    ],
)
def test_a_command_refuses_options_it_would_ignore(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0 and "commands:" in out and "bench" in out


TRAIN = ["train", "--device", "cpu", "--no-progress", "--learner", "protonet", "--backbone-option", "hidden=8"]


def test_unknown_dataset(capsys, tmp_path):
    code, _, err = run_cli(capsys, *TRAIN, "--dataset", "nope", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown dataset 'nope'")


def test_more_ways_than_classes(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, *TRAIN, "--train-subset", "val", "--n-way", "5000", "--steps", "1", "--out", str(tmp_path / "r")
    )
    assert_one_line_error(code, err, "5000")


def test_missing_data_root(capsys, tmp_path):
    nowhere = ["--data-root", str(tmp_path / "nowhere"), "--no-download"]  # never the internet from a test
    code, _, err = run_cli(capsys, *TRAIN, *nowhere, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "not found")


def test_bad_option_and_unknown_learner(capsys, tmp_path):
    code, _, err = run_cli(capsys, *TRAIN, "--option", "nonsense", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "KEY=VALUE")
    code, _, err = run_cli(capsys, "train", "--learner", "nope", "--no-progress", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown learner")


def test_train_then_eval_and_wrong_architecture(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        *TRAIN,
        "--n-way",
        "5",
        "--k-shot",
        "1",
        "--n-query",
        "3",
        "--steps",
        "3",
        "--val-episodes",
        "4",
        "--val-every",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert (out / "best.safetensors").is_file() and (out / "last.safetensors").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) >= 2

    # the same run folder again without --resume: refused
    code, _, err = run_cli(capsys, *TRAIN, "--steps", "3", "--out", str(out))
    assert_one_line_error(code, err, "--resume")

    js = tmp_path / "eval.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "best.safetensors"),
        "--device",
        "cpu",
        "--no-progress",
        "--episodes",
        "6",
        "--n-query",
        "3",
        "--json",
        str(js),
    )
    assert code == 0, err
    assert "5-way 1-shot" in stdout
    doc = json.loads(js.read_text())
    assert doc["episodes"] == 6 and len(doc["accuracies"]) == 6

    # Lake et al.'s 20 official runs, as an error rate
    code, stdout, err = run_cli(
        capsys, "eval", "--checkpoint", str(out / "best.safetensors"), "--lake", "--device", "cpu", "--no-progress"
    )
    assert code == 0, err
    assert "error rate" in stdout and "20 runs" in stdout

    # a checkpoint of another architecture: one line, exit 2
    code, _, err = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "best.safetensors"),
        "--backbone",
        "resnet12",
        "--device",
        "cpu",
        "--no-progress",
        "--episodes",
        "2",
    )
    assert_one_line_error(code, err, "best.safetensors")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "missing.safetensors"), "--no-progress")
    assert_one_line_error(code, err, "not found")


SUITE = """
name = "tiny"
[defaults]
dataset = "omniglot"
val_subset = "none"
backbone_options = { hidden = 8 }
n_way = 5
k_shot = 1
n_query = 3
eval_episodes = 20
log_every = 10
[[rows]]
learner = "protonet"
train_way = 10
steps = 20
published = 98.8
source = "Snell et al. 2017"
[[rows]]
learner = "fomaml"
learner_options = { inner_lr = 0.4, inner_steps = 1, test_inner_steps = 1 }
train_query = 1
steps = 20
meta_batch_size = 2
"""


def test_bench_writes_json_markdown_and_plot(capsys, tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE)
    out = tmp_path / "results" / "tiny.json"
    code, _, err = run_cli(
        capsys, "bench", "--suite", str(suite), "--out", str(out), "--device", "cpu", "--no-progress"
    )
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["suite"] == "tiny" and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert set(ROW_KEYS) <= set(row)
        assert row["episodes"] == 20 and row["train_steps"] == 20 and 0 <= row["accuracy_mean"] <= 100
    assert doc["rows"][0]["published"] == 98.8 and doc["rows"][1]["published"] is None
    md = out.with_suffix(".md").read_text()
    assert "| protonet-5w1s |" in md and "98.80" in md and "Snell et al. 2017" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run to the same OUT is refused without --overwrite, and reuses the trained and tested rows with it
    code, _, err = run_cli(
        capsys, "bench", "--suite", str(suite), "--out", str(out), "--device", "cpu", "--no-progress"
    )
    assert_one_line_error(code, err, "--overwrite", "tiny.json")
    code, _, err = run_cli(
        capsys, "bench", "--suite", str(suite), "--out", str(out), "--device", "cpu", "--no-progress", "--overwrite"
    )
    assert code == 0 and json.loads(out.read_text())["rows"] == doc["rows"]


def test_bench_bad_suite(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--suite", "no-such-suite")
    assert_one_line_error(code, err, "no-such-suite")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rows]]\nlearner = "protonet"\nn_way = 5\nk_shot = 1\nstepz = 3\n')
    code, _, err = run_cli(capsys, "bench", "--suite", str(bad))
    assert_one_line_error(code, err, "stepz")


def test_shipped_suites_load():
    from metafew.bench import load_suite

    for name in ("quick", "omniglot", "lake"):
        suite = load_suite(name)
        # every row has its paper's figure, or says in its notes why it has none
        assert suite.rows and all((r.published is not None and r.source) or r.notes for r in suite.rows)
    assert len(load_suite("omniglot").rows) == 16


def test_console_script_one_line_error_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("metafew")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "metafew.cli.main"]
    bad = subprocess.run(
        [*cmd, "train", "--dataset", "nope", "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("metafew: error: ")
