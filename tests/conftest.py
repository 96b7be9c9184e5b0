"""Shared fixtures: where the real datasets are, and a cache that never touches ~/.cache.

* ``data_root``: ``$METAFEW_DATA``, else the folder metafew's own rule finds
  (:func:`metafew.paths.data_roots`, as ``make test`` does: the development data
  ``../shared/data`` beside a checkout when there is one, else the user data dir that
  ``make data`` / ``metafew data download`` fill). Tests on real data fail (not skip)
  when it is missing, so a broken data setup cannot pass CI.
* ``METAFEW_CACHE``: kept when set (a warm cache makes the suite fast); otherwise one
  temporary cache for the whole session, shared by the pytest-xdist workers so the
  datasets are decoded once per session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per process: `make test` runs one xdist worker per core, and two
    threads per worker on two cores made the small CPU models several times slower."""
    import torch

    torch.set_num_threads(1)


def default_data() -> Path:
    """The data folder without ``$METAFEW_DATA``: the last of metafew's data roots, as ``make test`` picks it.

    Read before the session's ``METAFEW_CACHE`` is set, since the user data dir lives in the
    user's cache dir.
    """
    from metafew.paths import data_roots

    return data_roots()[-1]


@pytest.fixture(scope="session", autouse=True)
def _metafew_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point METAFEW_CACHE at a session temp dir (unless set) and METAFEW_DATA at the data (unless set)."""
    mp = pytest.MonkeyPatch()
    if not os.environ.get("METAFEW_DATA"):
        mp.setenv("METAFEW_DATA", str(default_data()))
    if not os.environ.get("METAFEW_CACHE"):
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent  # shared by all workers of this session
        mp.setenv("METAFEW_CACHE", str(base / "metafew-cache"))
    for var in ("METAFEW_DATA", "METAFEW_CACHE"):  # absolute, for kernels and subprocesses run elsewhere
        mp.setenv(var, str(Path(os.environ[var]).expanduser().resolve()))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def data_root(_metafew_env: None) -> Path:
    """The folder holding the real datasets (omniglot/, medmnist/, caltech101/)."""
    root = Path(os.environ["METAFEW_DATA"]).expanduser()
    if not root.is_dir():
        pytest.fail(f"real datasets not found at {root}: set METAFEW_DATA to the shared data folder")
    return root


@pytest.fixture(scope="session")
def omniglot_train(data_root: Path):
    from metafew.data import Omniglot

    return Omniglot("train", root=data_root)


@pytest.fixture(scope="session")
def omniglot_val(data_root: Path):
    from metafew.data import Omniglot

    return Omniglot("val", root=data_root)


@pytest.fixture(scope="session")
def omniglot_test(data_root: Path):
    from metafew.data import Omniglot

    return Omniglot("test", root=data_root)
