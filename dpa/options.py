"""The one argument-validation layer (torch-free): argparse types for every numeric option, whose error says the
allowed range, and the option kinds the commands share (S, N, width, threads, counts, seeds).

A bad value ends the command with one line, e.g. `dpa run: error: argument --max-frames: must be an integer from 1
to 100000000, got 0` (the parser turns argparse errors into DpaError, `dpa.cli`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from dpa.constants import SIZE_MULTIPLE

MAX_SIZE = 2048  # largest model input size S: a paper-iv frame at 2048 already needs ~7 GB of activations
MAX_FRAMES = 100_000_000


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _describe(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return (f"from {_number(low)}{' (excluded)' if low_open else ''} to {_number(high)}"
                f"{' (excluded)' if high_open else ''}")
    if low is not None:
        return f"{'>' if low_open else '>='} {_number(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_number(high)}"
    return "any value"


def integer(low: int | None = None, high: int | None = None, multiple: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (either may be None), optionally a multiple of `multiple`."""

    def parse(text: str) -> int:
        kind = f"a multiple of {multiple}" if multiple else "an integer"
        where = f"{kind} {_describe(low, high)}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {where}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high) or (multiple and value % multiple):
            raise argparse.ArgumentTypeError(f"must be {where}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the range (open at an end when `*_open`)."""

    def parse(text: str) -> float:
        where = _describe(low, high, low_open, high_open)
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


# The option kinds the commands share.
SIZE = integer(SIZE_MULTIPLE, MAX_SIZE, multiple=SIZE_MULTIPLE)  # model input size S
MEMORY = integer(1, 64)  # reference frames N
WIDTH = number(0, 4, low_open=True)  # channel width multiplier
THREADS = integer(1, 1024)
COUNT = integer(1, MAX_FRAMES)  # frames, clips, steps, repeats …
COUNT_OR_ZERO = integer(0, MAX_FRAMES)  # warm-up frames, …
SEED = integer(0, 2**32 - 1)
SECONDS = number(0)  # an interval; 0 turns it off
FRACTION = number(0, 1)
POSITIVE = number(0, low_open=True)  # learning rates, weights that must not be zero
FLOW_SIZE = integer(0, 4096)  # DIS working size in pixels; 0: the frames' own size
