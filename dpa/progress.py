"""Progress of long work (torch-free): one bar with the total, rate and ETA, and a stop check at every step.

Every long loop of a command goes through `progress` (or calls `Bar.advance`), which makes it interruptible at
that point (`dpa.stop`): a signal ends the loop between two steps, never in the middle of one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from dpa import stop

T = TypeVar("T")
log = logging.getLogger(__name__)
PLAIN_INTERVAL = 60.0  # seconds between plain progress lines when stderr is not a terminal


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Bar:
    """A progress bar over `total` units (None: unknown), drawn on stderr when it is a terminal and `enabled`;
    where stderr is not a terminal (a log file, nohup) a plain line every `PLAIN_INTERVAL` seconds says the same.

    Use as a context manager; `advance(n)` checks for a stop request first, unless `check` is False (a loop that
    handles stop requests itself, as training does to save a resumable checkpoint and keep processes in step).
    """

    def __init__(self, total: int | None, description: str, unit: str = "it", enabled: bool = True,
                 check: bool = True):
        from tqdm import tqdm

        self._check = check
        terminal = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False,
                         disable=not enabled or not terminal)
        self._plain = enabled and not terminal
        self._total, self._description, self._unit = total, description, unit
        self._done, self._note = 0, None
        self._started = self._last_line = time.monotonic()

    def advance(self, count: int = 1, note: str | None = None) -> None:
        if self._check:
            stop.check()
        self._bar.update(count)
        if note is not None:
            self._bar.set_postfix_str(note, refresh=False)
        self._done += count
        self._note = note if note is not None else self._note
        if self._plain and time.monotonic() - self._last_line >= PLAIN_INTERVAL:
            self._last_line = time.monotonic()
            log.info("%s", self.line())

    def describe(self, description: str) -> None:
        """Change the bar's label (the measurement, sequence … now under way)."""
        self._description = description
        self._bar.set_description_str(description, refresh=False)

    def line(self) -> str:
        """The bar as one plain line: done/total (percent), rate, ETA, note."""
        elapsed = time.monotonic() - self._started
        rate = elapsed / self._done if self._done else None
        parts = [f"{self._description}: {self._done}" + (f"/{self._total}" if self._total else "")
                 + f" {self._unit}s"]
        if self._total:
            parts[0] += f" ({100 * self._done / self._total:.0f}%)"
        if rate is not None:
            parts.append(f"{rate:.2f} s/{self._unit}")
            if self._total:
                parts.append(f"ETA {_clock(rate * (self._total - self._done))}")
        if self._note:
            parts.append(self._note)
        return ", ".join(parts)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "it",
             enabled: bool = True) -> Iterator[T]:
    """Iterate over `items` with a bar (total from len() when not given) and a stop check before each item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Bar(total, description, unit, enabled) as bar:
        for item in items:
            stop.check()
            yield item
            bar.advance()
