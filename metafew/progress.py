"""The one progress bar of metafew: tqdm on a terminal, periodic plain lines otherwise.

On a terminal, :func:`progress` is a tqdm bar with the project's defaults (transient,
``leave=False``). When stderr is not a terminal (output sent to a file, a CI log, a
pipe), carriage-return bars would fill the file with one redrawn line per update, so
:func:`progress` instead prints a plain line now and then (:class:`ProgressLines`)::

    estimate: 40/100 draws, 12 s elapsed, ~18 s left

one each time another 10% is done or 30 s have passed, and none at all for work that
finishes within its first 2 s. ``enable=False`` shows nothing anywhere.
tqdm is imported on first use, which keeps ``import metafew`` cheap.

Code written for tqdm switches with one import: ``from metafew.progress import tqdm``
takes tqdm's own keywords (``disable=``, ``leave=``, ``dynamic_ncols=``...) and has
``tqdm.write``.

>>> from metafew.progress import progress
>>> sum(progress(range(4), desc="adding", enable=False))
6
>>> with progress(total=3, desc="steps", enable=False) as bar:
...     bar.update(3)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

__all__ = ["ProgressLines", "progress", "tqdm"]

EVERY_FRACTION = 0.1  # a plain line each time another 10% is done...
EVERY_SECONDS = 30.0  # ...or this long after the last one
DELAY_SECONDS = 2.0  # nothing for work that is done sooner


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class ProgressLines:
    """A progress reporter for output that is not a terminal: a plain line now and then.

    Has the parts of tqdm's interface that metafew uses (``update``, ``close``,
    ``set_postfix``, ``set_description``, iteration, ``with``), so it stands in for a bar.

    Args:
        iterable: what to iterate; None for a reporter advanced by hand.
        total: the expected count (``len(iterable)`` by default where it has one).
        desc: the label that starts each line.
        unit: what one step counts (``"draws"``, ``"step"``).
        initial: the count already done (a resumed run).
        every_fraction: a line each time this fraction of ``total`` more is done.
        every_seconds: a line when this long has passed since the last one.
        delay: no line before this many seconds have passed.
        file: where lines go (default: ``sys.stderr`` at each line).
        clock: the time source (``time.monotonic``; tests pass their own).
        unit_scale, unit_divisor: show counts as 1.5M / 12.3k (tqdm's keywords; bytes: divisor 1024).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: float | None = None,
        desc: str | None = None,
        unit: str = "it",
        *,
        initial: float = 0,
        every_fraction: float = EVERY_FRACTION,
        every_seconds: float = EVERY_SECONDS,
        delay: float = DELAY_SECONDS,
        file: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit_scale: bool = False,
        unit_divisor: int = 1000,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc or "progress"
        self.unit = unit
        self.n = initial
        self.every_fraction = every_fraction
        self.every_seconds = every_seconds
        self.delay = delay
        self.file = file
        self.clock = clock
        self.postfix = ""
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.start = clock()
        self._initial = initial
        self._last_line: float | None = None  # clock time of the last line printed
        self._last_n = initial  # the count it showed
        self._last_bucket = self._bucket(initial)
        self.closed = False

    def _bucket(self, n: float) -> int:
        if not self.total or self.every_fraction <= 0:
            return 0
        return int(n / self.total / self.every_fraction + 1e-9)

    def line(self) -> str:
        """The current line: ``"estimate: 40/100 draws, 12 s elapsed, ~18 s left"``."""
        elapsed = self.clock() - self.start
        num = self._format
        done = f"{num(self.n)}/{num(self.total)}" if self.total else num(self.n)
        text = f"{self.desc}: {done} {self.unit}, {elapsed:.0f} s elapsed"
        rate_n = self.n - self._initial
        if self.total and rate_n > 0 and self.n < self.total:
            text += f", ~{elapsed / rate_n * (self.total - self.n):.0f} s left"
        if self.postfix:
            text += f" ({self.postfix})"
        return text

    def _format(self, x: float | None) -> str:
        if not self.unit_scale or x is None or abs(x) < self.unit_divisor:
            return _num(x)
        prefixes = "kMGTP"
        step = 0
        while step < len(prefixes) - 1 and abs(x) >= self.unit_divisor ** (step + 2):
            step += 1
        return f"{x / self.unit_divisor ** (step + 1):.1f}{prefixes[step]}"

    def _emit(self) -> None:
        print(self.line(), file=self.file if self.file is not None else sys.stderr, flush=True)
        self._last_line = self.clock()
        self._last_n = self.n

    def update(self, n: float = 1) -> None:
        """Count ``n`` more steps done; prints a line when one is due."""
        self.n += n
        now = self.clock()
        if now - self.start < self.delay:
            return
        bucket = self._bucket(self.n)
        since = now - (self._last_line if self._last_line is not None else self.start)
        if bucket > self._last_bucket or since >= self.every_seconds:
            self._last_bucket = bucket
            self._emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown at the end of the next line (as tqdm's ``set_postfix``)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text shown at the end of the next line."""
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """The label that starts each line."""
        self.desc = desc or self.desc

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed when due."""

    def close(self) -> None:
        """A last line, if any was printed before and the final count has not been shown."""
        if self.closed:
            return
        self.closed = True
        if self._last_line is not None and self._last_n != self.n:
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress reporter has no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def write(s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """Print a message (as ``tqdm.write``)."""
        print(s, file=file if file is not None else sys.stderr, end=end, flush=True)


class _Disabled(ProgressLines):
    """Shows nothing (``enable=False``), whatever the output is."""

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress(
    iterable: Iterable[Any] | None = None,
    total: float | None = None,
    desc: str | None = None,
    enable: bool = True,
    unit: str = "it",
    **options: Any,
) -> Any:
    """A progress bar over ``iterable`` (or a manual one: ``.update(n)``, ``.close()``).

    A tqdm bar when stderr is a terminal; periodic plain lines (:class:`ProgressLines`)
    when it is not; nothing with ``enable=False``.

    Args:
        iterable: what to iterate; None for a bar advanced by hand.
        total: the expected count (``len(iterable)`` by default where it has one).
        desc: the label shown before the bar.
        enable: False never shows it.
        unit: what one step counts (``"img"``, ``"B"``, ``"step"``).
        options: further tqdm keywords (e.g. ``unit_scale=True``, ``leave=True``;
            ``disable=True`` as ``enable=False``); ``initial`` is honoured by both kinds.
    """
    disable = options.pop("disable", False)
    if disable:  # tqdm's disable=None means "off when not a terminal": plain lines then
        enable = False
    file = options.get("file")
    if not enable:
        return _Disabled(iterable, total, desc, unit, initial=options.get("initial", 0))
    if not _is_terminal(file if file is not None else sys.stderr):
        return ProgressLines(
            iterable, total, desc, unit, initial=options.get("initial", 0), file=file,
            unit_scale=bool(options.get("unit_scale", False)), unit_divisor=int(options.get("unit_divisor", 1000)),
        )  # fmt: skip
    from tqdm.auto import tqdm as _tqdm

    options.setdefault("leave", False)
    return _tqdm(iterable, total=total, desc=desc, unit=unit, **options)


class _TqdmCompatible:
    """``tqdm(...)``/``tqdm.write(...)`` with :func:`progress`'s choice of bar or plain lines."""

    def __call__(self, iterable: Iterable[Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        if args:  # tqdm's positional order: iterable, desc, total
            kwargs.setdefault("desc", args[0])
            if len(args) > 1:
                kwargs.setdefault("total", args[1])
        return progress(iterable, **kwargs)

    @staticmethod
    def write(s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """Print a message without breaking a bar on the terminal (tqdm's ``write``)."""
        if _is_terminal(file if file is not None else sys.stderr):
            from tqdm.auto import tqdm as _tqdm

            _tqdm.write(s, file=file, end=end)
        else:
            ProgressLines.write(s, file=file, end=end)


tqdm = _TqdmCompatible()
"""Drop-in for ``from tqdm.auto import tqdm``: ``from metafew.progress import tqdm``."""


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"
