"""`metafew bench` says what it will do and how long it should take, and which rows it reuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metafew.bench import load_suite
from metafew.bench.runner import run_suite
from metafew.errors import ConfigError

SUITE = """
name = "tiny"
published_label = "published (full training)"

[defaults]
dataset = "omniglot"
backbone_checkpoint = "omniglot-conv4"
val_subset = "none"
n_query = 2
eval_episodes = 4
steps = 2
learner = "protonet"
k_shot = 1

[[rows]]
name = "a"
n_way = 5
published = 98.8
expected_seconds = 30

[[rows]]
name = "b"
n_way = 3
expected_seconds = 90
"""


@pytest.fixture()
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    return path


def test_bench_states_its_plan_then_reuses_finished_rows(suite_file: Path, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "results" / "tiny.json"
    lines: list[str] = []
    run_suite(load_suite(suite_file), out, data_root=data_root, device="cpu", progress=False, log=lines.append)
    assert lines[0] == "plan: 2 of 2 rows to train and test, about 2 min"
    assert any(line.endswith("left]") and "about" in line for line in lines)  # the ETA after the first row
    assert "(published (full training) 98.8)" in "\n".join(lines)

    again: list[str] = []
    run_suite(load_suite(suite_file), out, data_root=data_root, device="cpu", progress=False, log=again.append)
    work = tmp_path / "results" / "runs" / "tiny"
    assert again[0] == f"plan: 0 of 2 rows to train and test; 2 finished and reused from {work}"
    reused = [line for line in again if "[reused from " in line]
    assert len(reused) == 2 and all(str(work) in line for line in reused)
    assert "Published (full training)" in out.with_suffix(".md").read_text()
    assert json.loads(out.read_text())["rows"][0]["published"] == 98.8


def test_a_bad_estimate_or_label_is_refused(suite_file: Path) -> None:
    suite_file.write_text(SUITE.replace("expected_seconds = 30", "expected_seconds = -1"))
    with pytest.raises(ConfigError, match="expected_seconds must be a number >= 0"):
        load_suite(suite_file)
    suite_file.write_text(SUITE.replace('published_label = "published (full training)"', "published_label = 3"))
    with pytest.raises(ConfigError, match="published_label must be a non-empty string"):
        load_suite(suite_file)
