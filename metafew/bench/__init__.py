"""Benchmark suites (TOML) and the runner that trains, tests and reports them."""

from .runner import ROW_KEYS, build_learner, run_row, run_suite, train_row
from .suite import RowSpec, Suite, load_suite, resolve_suite

__all__ = ["ROW_KEYS", "RowSpec", "Suite", "build_learner", "load_suite", "resolve_suite", "run_row", "run_suite", "train_row"]
