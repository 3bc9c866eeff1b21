"""The one signal path (torch-free): SIGINT, SIGTERM and SIGHUP ask every command to stop at its next safe point.

`install()` (called by `dpa.cli.main`) turns the three signals into a request; long loops call `check()` between
frames, steps or files (`dpa.progress.progress` does it for every loop it drives), which raises `Stopped` there, so
outputs are finalised by the `finally` blocks and context managers on the way out. A second signal while the
first is still being handled stops at once. The command exits with 128 + the signal number: 130 (SIGINT), 143
(SIGTERM), 129 (SIGHUP).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stop asked by a signal; a BaseException like KeyboardInterrupt, so `except Exception` does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: int | None = None


def _request(signum: int, frame) -> None:
    global _pending
    if _pending is not None:  # a second signal: the first is taking too long to finish cleanly
        raise Stopped(signum)
    _pending = signum


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to a stop request (main thread only; elsewhere nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    reset()
    for signum in SIGNALS:
        signal.signal(signum, _request)


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _pending


def check() -> None:
    """Raise `Stopped` when a stop was requested (call it between units of work)."""
    if _pending is not None:
        raise Stopped(_pending)


def reset() -> None:
    """Forget a pending request (a new command in the same process, e.g. in tests)."""
    global _pending
    _pending = None
