"""One home for seeds: named, independent random streams derived from a run's seed.

>>> from metafew.seeding import derive_seed
>>> derive_seed(0, "train") == derive_seed(0, "train") != derive_seed(0, "fixed")
True
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named random stream of a run, independent of its other streams."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for the named stream (CPU, so every device sees the same draws)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run with torch's global RNG (CPU, and ``device`` when it is CUDA) seeded, restoring it afterwards."""
    device = torch.device(device)
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
