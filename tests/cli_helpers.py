"""Helpers shared by the rule tests: run the CLI in-process and check one-line errors."""

from __future__ import annotations

from metafew.cli.main import main

TRAIN = [
    "train", "--device", "cpu", "--no-progress", "--learner", "protonet", "--backbone-option", "hidden=8",
    "--n-way", "5", "--n-query", "2", "--val-episodes", "0", "--log-every", "1",
]  # fmt: skip


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error: " in line]  # argparse also prints its usage
    assert len(lines) == 1 and lines[0].startswith("metafew"), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
