"""Benchmark suites (TOML rows: a RunConfig plus the published figure) and their reports."""

from .runner import ROW_KEYS, run_row, run_suite
from .suite import BenchRow, Suite, load_suite, resolve_suite

__all__ = ["ROW_KEYS", "BenchRow", "Suite", "load_suite", "resolve_suite", "run_row", "run_suite"]
