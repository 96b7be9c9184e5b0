"""RESULTS.md's generated tables are those of the committed JSON (numbers and prose cannot drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
