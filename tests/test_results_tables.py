"""RESULTS.md's generated tables are those of the committed JSON (numbers and prose cannot drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_results_tables_match_the_committed_json():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tables.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


def test_every_table_mark_names_a_committed_json():
    import re

    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    files = re.findall(r"<!-- table: ([^ ]+) -->", text)
    assert files, "RESULTS.md has no generated table"
    for f in files:
        assert (REPO / "benchmarks" / f).is_file(), f


def test_a_seed_copy_of_a_suite_changes_only_the_pretraining_seed():
    import tomllib

    seeds = load_benchmark("pretrain_seeds")
    text = (REPO / "benchmarks" / "suites" / "omniglot-pretrained.toml").read_text()
    original, copy = tomllib.loads(text), tomllib.loads(seeds.with_pretrain_seed(text, 2))
    assert copy["pretrain"] == {**original["pretrain"], "seed": 2}
    assert copy["rows"] == original["rows"] and copy["defaults"] == original["defaults"]
    assert copy["name"] == "omniglot-pretrained-pretrain-seed2"


def test_the_interval_over_seeds_is_student_t():
    seeds = load_benchmark("pretrain_seeds")
    got = seeds.summary([97.0, 98.0, 99.0])  # mean 98, sd 1, t(0.975, 2) = 4.303
    assert got["mean"] == 98.0 and abs(got["ci95"] - 4.303 / 3**0.5) < 1e-9
    assert seeds.summary([97.5]) == {"mean": 97.5, "ci95": None}


def test_the_alignment_sweep_table_bolds_only_changes_whose_interval_excludes_zero():
    tables = load_benchmark("tables")
    row = {
        "dataset": "breastmnist",
        "backbone": "b",
        "shots": 1,
        "balanced_accuracy": 0.6,
        "balanced_accuracy_ci95": 0.01,
    }
    doc = {
        "meta": {"aligns": "none,mmd,dann", "draws": 100, "seed": 0, "steps": 200, "machine": "m", "threads": 1,
                 "torch": "t", "date": "d", "command": "align.py"},
        "rows": [
            {**row, "align": "none", "auc": 0.7, "auc_ci95": 0.01},
            {**row, "align": "mmd", "difference_vs_none": {"balanced_accuracy": {"mean": 0.02, "ci95": 0.01}}},
            {**row, "align": "dann", "difference_vs_none": {"balanced_accuracy": {"mean": -0.005, "ci95": 0.01}}},
            {**row, "shots": 5, "align": "none", "auc": 0.8, "auc_ci95": 0.01},
        ],
    }  # fmt: skip
    assert tables.renderer(doc) is tables.alignment_sweep_table
    text = tables.alignment_sweep_table(doc)
    assert "| breastmnist | b | 1 | 0.600 ± 0.010 | **+0.020 ± 0.010** | -0.005 ± 0.010 | 0.700 ± 0.010 |" in text
