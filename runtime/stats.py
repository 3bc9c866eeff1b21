"""Run statistics: per-stage latency, frames per second and dropped frames, printed periodically and summarised as JSON.

Memory is bounded however long a live run lasts: means come from running totals, percentiles from the last
`window` frames.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

# Stages in pipeline order (SPEC §4.3); "wait" is time spent waiting for the source, outside the frame time.
STAGES = ("flow", "pre", "encoder", "ima", "ifa_memory", "decoder", "post", "output")


class StageStats:
    """Per-stage seconds for every processed frame; fps over the whole run and over the last `window` frames."""

    def __init__(self, window: int = 1000, clock=time.perf_counter):
        self.window = window
        self._clock = clock
        self.started = clock()
        self.frames = 0
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.recent: dict[str, deque] = {}
        self._frame_ends: deque = deque(maxlen=window + 1)
        self._frame_ends.append(self.started)

    def add(self, seconds: dict[str, float]) -> None:
        """Record one processed frame: stage -> seconds (stages it did not run are left out)."""
        self.frames += 1
        for stage, value in seconds.items():
            self.totals[stage] = self.totals.get(stage, 0.0) + value
            self.counts[stage] = self.counts.get(stage, 0) + 1
            self.recent.setdefault(stage, deque(maxlen=self.window)).append(value)
        self._frame_ends.append(self._clock())

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def fps(self) -> float:
        """Processed frames per second since the start."""
        elapsed = self._frame_ends[-1] - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0

    def recent_fps(self) -> float:
        """Processed frames per second over the last `window` frames."""
        span = self._frame_ends[-1] - self._frame_ends[0]
        return (len(self._frame_ends) - 1) / span if span > 0 else 0.0

    def stage_ms(self) -> dict[str, dict[str, float]]:
        """stage -> {mean (whole run, per frame that ran it), median, p90 (last `window`)} in milliseconds."""
        table = {}
        for stage in sorted(self.recent, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)):
            recent = np.asarray(self.recent[stage]) * 1e3
            table[stage] = {
                "mean": 1e3 * self.totals[stage] / self.counts[stage],
                "median": float(np.median(recent)),
                "p90": float(np.percentile(recent, 90)),
            }
        return table

    def line(self, dropped: int = 0) -> str:
        """One line for the console: fps and the median time of each stage."""
        stages = " ".join(f"{stage} {value['median']:.1f}" for stage, value in self.stage_ms().items())
        return f"{self.frames} frames, {self.recent_fps():.1f} fps, dropped {dropped}; ms: {stages}"

    def overlay_lines(self) -> list[str]:
        """Two short lines for the video overlay."""
        table = self.stage_ms()
        model = sum(table[s]["median"] for s in ("encoder", "ima", "ifa_memory", "decoder") if s in table)
        flow = table.get("flow", {}).get("median", 0.0)
        return [f"{self.recent_fps():.1f} fps", f"model {model:.1f} ms  flow {flow:.1f} ms"]

    def summary(self) -> dict:
        """The JSON summary: frames, seconds, fps (whole run and recent), per-stage ms."""
        return {
            "frames": self.frames,
            "seconds": self.elapsed,
            "fps": self.fps(),
            "recent_fps": self.recent_fps(),
            "stages_ms": self.stage_ms(),
        }
