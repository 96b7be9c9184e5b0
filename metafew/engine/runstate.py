"""Run state shared by the training and pretraining loops: RNG snapshots and a deferred Ctrl-C.

Both loops checkpoint the global RNG streams with their weights (so a resumed run draws what
the uninterrupted one would), seed ranks > 0 from the step they start at, and turn a first
Ctrl-C into a flag read at the end of a step so that the step completes and is saved.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..progress import tqdm


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The global torch seed of rank ``rank`` > 0 from ``step`` on (rank 0 keeps the run's own stream)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def rng_state() -> dict[str, Any]:
    """The global torch, Python, NumPy (and CUDA, once initialised) RNG states, for a checkpoint."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@contextlib.contextmanager
def deferred_sigint() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag read at the end of a step (a second one aborts at once).

    Under ``torchrun`` a Ctrl-C reaches each worker twice (from the terminal, then forwarded
    by the launcher, which gives workers 30 s to end): a repeat within 2 s is taken for the
    forwarded copy. SIGTERM (what the launcher sends when another worker failed) ends a
    worker at once, as it does a single process.
    """
    flag = threading.Event()
    first = [0.0]
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return
    launched = distributed.launched()

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            if launched and time.monotonic() - first[0] < 2.0:
                return  # the launcher passing the same Ctrl-C on
            raise KeyboardInterrupt
        flag.set()
        first[0] = time.monotonic()
        if not launched or distributed.is_main():
            tqdm.write("Interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["deferred_sigint", "rank_seed", "rng_state", "set_rng_state"]
