"""The one progress bar of metafew: a thin wrapper over tqdm with the project's defaults.

Bars are transient (``leave=False``) and switch themselves off when output is not a
terminal, so logs and CI output stay clean; ``enable=False`` switches them off always.
tqdm is imported on first use, which keeps ``import metafew`` cheap.

>>> from metafew.progress import progress
>>> sum(progress(range(4), desc="adding", enable=False))
6
>>> with progress(total=3, desc="steps", enable=False) as bar:
...     bar.update(3)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["progress"]


def progress(
    iterable: Iterable[Any] | None = None,
    total: float | None = None,
    desc: str | None = None,
    enable: bool = True,
    unit: str = "it",
    **options: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one: ``.update(n)``, ``.close()``).

    Args:
        iterable: what to iterate; None for a bar advanced by hand.
        total: the expected count (``len(iterable)`` by default where it has one).
        desc: the label shown before the bar.
        enable: False never shows it; True shows it only on a terminal.
        unit: what one step counts (``"img"``, ``"B"``, ``"step"``).
        options: further tqdm keywords (e.g. ``unit_scale=True``, ``leave=True``).
    """
    from tqdm.auto import tqdm

    options.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enable else True, **options)
