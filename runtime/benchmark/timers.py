"""Timing for `dpa bench` (torch-free): samples and their statistics, timers run repeat by repeat and interleaved,
peak memory, and the settings every measurement shares.

Each repeat runs `warmup` untimed frames, then `frames` timed ones; a repeat gives one sample per quantity (seconds
per timed frame, averaged over that repeat's timed frames); the JSON reports the median, the quartiles and min/max
over the repeats, in milliseconds. Measurements that are compared alternate repeat by repeat (`interleave`), so
the background load of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dpa.errors import DpaError
from dpa.progress import Bar
from dpa.runtime.benchmark.machine import usable_cores

log = logging.getLogger(__name__)


def summarize(seconds: Sequence[float]) -> dict[str, float | int]:
    """Samples in seconds -> {median, q1, q3, iqr, min, max} in milliseconds and their count `n`.

    Quartiles interpolate linearly between order statistics (numpy's default percentile); one sample gives
    that sample for every statistic. DpaError for no samples.
    """
    values = np.asarray(seconds, np.float64) * 1e3
    if values.size == 0:
        raise DpaError("no samples to summarise: run at least one repeat")
    q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": float(values.min()),
            "max": float(values.max()), "n": int(values.size)}


def per_frame_means(records: Sequence[Mapping[str, float]], frames: int) -> dict[str, float]:
    """Per-frame stage seconds (one dict per timed frame) -> stage -> seconds per frame over `frames` frames.

    A stage missing from a frame counts 0 for it, so a stage run on some frames only (a memory admission) is
    amortised over all of them.
    """
    totals: dict[str, float] = {}
    for record in records:
        for stage, value in record.items():
            totals[stage] = totals.get(stage, 0.0) + value
    return {stage: total / frames for stage, total in totals.items()}


@dataclass
class Samples:
    """The raw timings of one measurement: one sample per repeat of each quantity, in seconds per timed frame.

    per_frame: the whole frame as the measurement defines it (see `description`); stages: stage -> seconds;
    extra: further per-frame quantities (runtime: `with_flow` = flow + frame, `graphs` = the graphs' own time);
    memory_entry: seconds per IFA memory entry (the cached memory's one-off cost per reference frame);
    rss_before / peak_rss: the process's resident memory in bytes before the first repeat and at the highest
    point of any repeat (`interleave` sets them).
    """

    name: str
    description: str
    frames: int
    warmup: int
    per_frame: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)
    memory_entry: list[float] = field(default_factory=list)
    rss_before: int | None = None
    peak_rss: int | None = None
    info: dict = field(default_factory=dict)

    def add_repeat(self, per_frame: float, stages: Mapping[str, float] | None = None, **extra: float) -> None:
        """Record one repeat: seconds per frame, stage -> seconds per frame, extra quantities (seconds per frame).

        A stage seen in some repeats only counts 0 in the others.
        """
        repeat = len(self.per_frame)
        self.per_frame.append(float(per_frame))
        for target, values in ((self.stages, stages or {}), (self.extra, extra)):
            for key in set(target) | set(values):
                series = target.setdefault(key, [0.0] * repeat)
                series.append(float(values.get(key, 0.0)))

    def to_json(self) -> dict:
        """The measurement as the report writes it (milliseconds)."""
        per_frame = summarize(self.per_frame)
        result = {
            "description": self.description,
            "frames": self.frames,
            "warmup": self.warmup,
            "repeats": len(self.per_frame),
            "per_frame_ms": per_frame,
            "fps": 1e3 / per_frame["median"] if per_frame["median"] > 0 else None,
            "stages_ms": {stage: summarize(self.stages[stage]) for stage in sorted(self.stages, key=stage_order)},
        }
        for key, values in self.extra.items():
            result[f"{key}_ms"] = summarize(values)
        if "with_flow" in self.extra:
            median = result["with_flow_ms"]["median"]
            result["fps_with_flow"] = 1e3 / median if median > 0 else None
        result["memory_entry_ms"] = summarize(self.memory_entry) if self.memory_entry else None
        result["rss_before_mib"] = _mib(self.rss_before)
        result["peak_rss_mib"] = _mib(self.peak_rss)
        result.update(self.info)
        return result


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (Linux /proc/self/statm), None where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def lifetime_peak_rss_bytes() -> int:
    """The process's peak resident set size since it started (getrusage ru_maxrss; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Samples the resident set size on a background thread while the block runs (every `interval` seconds).

    ru_maxrss is a high-water mark for the whole process and cannot be reset, so each measurement samples the
    RSS itself; `before` and `peak` are bytes (None without /proc).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.before: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = resident_bytes()
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.before = resident_bytes()
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, name="dpa-bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()


@dataclass
class Timer:
    """One measurement, run one repeat at a time so that `interleave` can alternate measurements.

    repeat(bar) runs one repeat (warm-up + timed frames, ticking `bar` per frame) and records it in `samples`;
    frames_per_repeat: frames it processes per repeat.
    """

    samples: Samples
    repeat: Callable[[object], None]
    frames_per_repeat: int


def interleave(timers: Sequence[Timer], repeats: int, progress: bool = True) -> None:
    """Run `repeats` rounds, each one repeat of every timer; each round starts one timer later than the previous.

    Measurements taken side by side on a shared machine see the same background load only when they alternate:
    a slow spell then lands in one repeat of each, not in all repeats of one. Each repeat runs under
    `PeakMemory`; a measurement's peak_rss is the highest process RSS over its repeats, rss_before the RSS before
    its first repeat.
    """
    bar = progress_bar(repeats * sum(timer.frames_per_repeat for timer in timers), "bench", progress)
    try:
        for round_index in range(repeats):
            offset = round_index % len(timers)
            for timer in list(timers[offset:]) + list(timers[:offset]):
                bar.describe(timer.samples.name)
                with PeakMemory() as memory:
                    timer.repeat(bar)
                samples = timer.samples
                if samples.rss_before is None:
                    samples.rss_before = memory.before
                if memory.peak is not None:
                    samples.peak_rss = max(samples.peak_rss or 0, memory.peak)
    finally:
        bar.close()


def run_timer(timer: Timer, repeats: int, progress: bool = True) -> Samples:
    """One measurement on its own: `repeats` repeats of `timer`; returns its Samples."""
    interleave([timer], repeats, progress)
    return timer.samples


@dataclass
class TimingSettings:
    """How every measurement runs: `warmup` untimed then `frames` timed frames per repeat, `repeats` repeats.

    seed: the synthetic clip's seed; flow_preset: the DIS preset (the runtime's default is "fast"); horizon: the
    live (uniform) policy's horizon in frames, as `dpa run --horizon`; threads: ONNX Runtime intra-op and PyTorch
    threads (None: every usable core); progress: show progress bars.
    """

    frames: int = 8
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    flow_preset: str = "fast"
    horizon: int = 32
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise DpaError(f"--frames must be at least 1, got {self.frames}")
        if self.warmup < 0:
            raise DpaError(f"--warmup must be at least 0, got {self.warmup}")
        if self.repeats < 1:
            raise DpaError(f"--repeats must be at least 1, got {self.repeats}")
        if self.threads is not None and self.threads < 1:
            raise DpaError(f"--threads must be at least 1, got {self.threads}")
        if self.threads is None:
            self.threads = usable_cores()

    @property
    def clip_length(self) -> int:
        return self.warmup + self.frames

    def to_json(self) -> dict:
        return {"frames": self.frames, "warmup": self.warmup, "repeats": self.repeats, "seed": self.seed,
                "flow_preset": self.flow_preset, "horizon": self.horizon, "threads": self.threads}


def progress_bar(total: int, description: str, enabled: bool) -> Bar:
    """A bar over `total` frames (drawn only when `enabled`); advancing it is a stop point."""
    return Bar(total, description, "frame", enabled=enabled)


def advance(bar: Bar) -> None:
    bar.advance()  # a stop request (`dpa.stop`) ends the measurement here


def stage_order(stage: str) -> int:
    """Sort key of a stage name: the order a frame goes through them, unknown stages last."""
    order = ("flow", "pre", "references", "reference_memory", "encoder", "ima", "ifa_memory", "decoder", "post",
             "output")
    return order.index(stage) if stage in order else len(order)
