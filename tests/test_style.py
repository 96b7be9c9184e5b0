"""The code passes its static checks, as configured in pyproject.toml.

``ruff check`` and ``ruff format --check`` over the package, the tests and the benchmarks,
and ``mypy`` over the package (``[tool.mypy] files``). Both tools are dev dependencies
(``pip install -e '.[dev]'``); a test is skipped only where its tool is not installed.
mypy keeps its cache in ``.mypy_cache`` at the repository root: about 30 s cold, under 2 s warm.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("metafew", "tests", "benchmarks")


def run_tool(tool: str, *args: str) -> None:
    """Run ``python -m tool args`` from the repository root; fail with its output unless it exits 0."""
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (a dev dependency: pip install -e '.[dev]')")
    proc = subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    command = " ".join([tool, *args])
    assert proc.returncode == 0, f"`{command}` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_ruff_check() -> None:
    run_tool("ruff", "check", *PATHS)


def test_ruff_format() -> None:
    run_tool("ruff", "format", "--check", "--diff", *PATHS)


def test_mypy() -> None:
    run_tool("mypy")  # files, options and python_version from [tool.mypy]
