"""Progress of the data tools: tqdm's bar on a terminal, plain lines in a piped log.

A bar redraws itself with carriage returns, which a log file keeps as one long line of `\\r`-joined frames. When
the stream is not a terminal (the trainer checks the same: fastross.train passes `progress=sys.stdout.isatty()`),
`progress` writes one line every `every` items instead, and one at the end:

    convert: 2000/9000 rec (22%), 310.4 rec/s, 6 s, eta 23 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

LINES = 10  # plain lines per run when `every` is not given (one per tenth of the total)


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Lines:
    """tqdm's part that the data tools use (iteration, update, close, a context manager), as plain lines."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        every: int = 0,
        stream: TextIO | None = None,
    ):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream or sys.stderr
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = every or (max(1, -(-self.total // LINES)) if self.total else 1000)
        self.n = self._said = 0
        self._t0 = time.perf_counter()
        self._closed = False

    def line(self) -> str:
        dt = time.perf_counter() - self._t0
        rate = self.n / dt if dt > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            eta = f", eta {(self.total - self.n) / rate:.0f} s" if rate > 0 and self.n < self.total else ""
            return (
                f"{head}{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {rate:.1f} "
                f"{self.unit}/s, {dt:.0f} s{eta}"
            )
        return f"{head}{self.n} {self.unit}, {rate:.1f} {self.unit}/s, {dt:.0f} s"

    def _say(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._said = self.n

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += n
        if self.n // self.every > before // self.every:
            self._say()

    def close(self) -> None:
        if not self._closed and self.n != self._said:
            self._say()
        self._closed = True

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    every: int = 0,
    stream: TextIO | None = None,
):
    """A tqdm bar on `stream` (stderr by default) when it is a terminal, else `Lines` every `every` items (0: ten
    lines per run, or every 1000 when the total is unknown); nothing when `disable`."""
    stream = stream or sys.stderr
    if not disable and not is_tty(stream):
        return Lines(iterable, total, desc, unit, every, stream)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream)
