"""What the README says of the quick suite (`make bench`), `metafew train --suite` and the help texts.

* The quick suite has no validation split (``val_subset = "none"``), so its rows keep
  ``last.safetensors`` only, no ``best.safetensors``.
* Its published figures are labelled as full-training figures in ``quick.md`` and in the
  legend of ``quick.png`` (the label comes from the suite file's ``published_label``).
* ``metafew train --suite S --row R`` trains into ``runs/R`` by default.
* The help texts name the run folders as the README does (``runs/protonet-5w1s``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from metafew.bench.report import markdown_table, write_plot
from metafew.bench.suite import SUITES_DIR, load_suite
from metafew.cli.main import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
QUICK = load_suite("quick")
COMMITTED = json.loads((REPO / "benchmarks" / "results" / "quick.json").read_text(encoding="utf-8"))["rows"]


def test_quick_suite_is_the_shipped_one_and_has_no_validation_split() -> None:
    assert QUICK.path is not None and QUICK.path.resolve() == (SUITES_DIR / "quick.toml").resolve()
    doc = tomllib.loads(QUICK.path.read_text(encoding="utf-8"))
    assert doc["defaults"]["val_subset"] == "none"
    assert not [r["name"] for r in doc["rows"] if "val_subset" in r]  # no row brings one back
    assert QUICK.rows and all(r.config.val_subset is None for r in QUICK.rows)  # "none": no validation
    assert "quick suite has no validation split" in README and "`last.safetensors` only" in README


def test_quick_suite_labels_its_published_figures_as_full_training() -> None:
    assert "full training" in QUICK.published_label, QUICK.published_label
    assert any(r.published is not None for r in QUICK.rows)


def test_quick_md_names_the_published_figures_with_that_label() -> None:
    text = markdown_table(QUICK, COMMITTED)
    header = next(line for line in text.splitlines() if line.startswith("| Row "))
    assert QUICK.published_label.capitalize() in header, header
    assert f"Δ = ours − {QUICK.published_label}" in text
    assert "| Published |" not in text  # never the bare word, which reads as a comparable figure


def test_quick_png_legend_uses_that_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: list[list[str]] = []
    close = plt.close

    def record(fig: Any = None) -> None:
        for ax in getattr(fig, "axes", []):
            legend = ax.get_legend()
            seen.append([t.get_text() for t in legend.get_texts()] if legend else [])
        close(fig)

    monkeypatch.setattr(plt, "close", record)
    path = write_plot(QUICK, COMMITTED, tmp_path / "quick.png")
    assert path.is_file() and path.stat().st_size > 0
    assert seen and QUICK.published_label in seen[0], seen


def test_train_suite_row_defaults_to_runs_row_and_writes_no_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], data_root: Path
) -> None:
    """A quick-suite row, as `metafew train --suite quick --row R` runs it (2 steps): into runs/R, last only."""
    assert "`metafew train --suite omniglot --row protonet-5w1s`" in README
    assert "(into `runs/protonet-5w1s` by default)" in README
    monkeypatch.chdir(tmp_path)
    row = QUICK.rows[0].name
    argv = ["train", "--suite", "quick", "--row", row, "--steps", "2", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "runs" / row
    assert f"-> runs/{row}" in capsys.readouterr().out
    assert (out / "last.safetensors").is_file()
    assert not (out / "best.safetensors").exists(), sorted(p.name for p in out.iterdir())


def test_help_texts_name_run_folders_as_the_readme_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert "runs/protonet-5w1s" in README and "runs/proto-5w1s" not in README
    stale = [
        str(p.relative_to(REPO)) for p in sorted((REPO / "metafew").rglob("*.py")) if "runs/proto-5w1s" in p.read_text()
    ]
    assert not stale, stale
    for command in ([], ["train"], ["eval"], ["export-backbone"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "runs/protonet-5w1s" in capsys.readouterr().out, command
