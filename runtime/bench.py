"""`dpa bench`: per-stage latency, frames per second and peak memory of the runtime, side by side with the PyTorch
model; `dpa bench --targets` measures the speed targets as ratios of per-frame times in one run.

Torch-free: the PyTorch timers (`dpa.training.bench_torch`) and the export of benchmark models are imported only
by the functions that need them.

Every measurement processes the same pre-decoded synthetic clip (`dpa.synthetic.generate_clip`, S x S
frames) with the flow the runtime uses live (DIS, -flow(t->t-1), the first frame zero); stage names are the
runtime's (`flow` = estimation + rendering the colour image, `pre`, the graphs, `post`). Each repeat runs
`warmup` untimed frames, then `frames` timed ones; a repeat gives one sample per quantity (seconds per timed
frame, averaged over that repeat's timed frames); the JSON reports the median, the quartiles and min/max over
the repeats, in milliseconds. Measurements that are compared alternate repeat by repeat (`interleave`), so the
background load of a shared machine falls on all of them alike. Ratios are ratios of medians, numerator first.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dpa.errors import DpaError
from dpa.manifest import Manifest
from dpa.runtime.chain import StageChain
from dpa.runtime.flow import live_flow, model_flow_estimator
from dpa.runtime.memory import OfflinePolicy, UniformPolicy
from dpa.runtime.segmenter import Segmenter
from dpa.runtime.stats import StageStats

log = logging.getLogger(__name__)

SCHEMA = "dpa-bench/1"
GRAPH_STAGES = ("encoder", "ima", "ifa_memory", "decoder")
BENCH_CACHE = "bench"  # under $DPA_CACHE or ~/.cache/dpa
# /proc/cpuinfo flags that decide fp32 and int8 kernel speed (reported with the machine).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm")


# ---- statistics -------------------------------------------------------------------------------------------


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
            "stages_ms": {stage: summarize(self.stages[stage]) for stage in sorted(self.stages, key=_stage_order)},
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


# ---- memory -----------------------------------------------------------------------------------------------


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
                if bar is not None:
                    bar.set_description(timer.samples.name)
                with PeakMemory() as memory:
                    timer.repeat(bar)
                samples = timer.samples
                if samples.rss_before is None:
                    samples.rss_before = memory.before
                if memory.peak is not None:
                    samples.peak_rss = max(samples.peak_rss or 0, memory.peak)
    finally:
        _close(bar)


def run_timer(timer: Timer, repeats: int, progress: bool = True) -> Samples:
    """One measurement on its own: `repeats` repeats of `timer`; returns its Samples."""
    interleave([timer], repeats, progress)
    return timer.samples


# ---- the machine ------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gstreamer_version() -> str | None:
    """The GStreamer version: from PyGObject when this process has loaded GStreamer, else from `gst-launch-1.0
    --version`. GStreamer is not loaded just for this: with OpenCV also loaded, it makes the ONNX exporter abort
    in onnx.defs.get_schema (an uncaught C++ exception), and exports and `dpa calibrate` may follow."""
    loaded = sys.modules.get("gi.repository.Gst")
    if loaded is not None:
        return ".".join(str(part) for part in loaded.version()[:3])
    tool = shutil.which("gst-launch-1.0")
    if tool is None:
        return None
    try:
        output = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"GStreamer (\d+\.\d+\.\d+)", output)
    return match.group(1) if match else None


def machine_info() -> dict:
    """The machine a report was measured on: CPU model, cores, memory, OS, Python and package versions, load.

    Reads /proc/cpuinfo and /proc/meminfo where present; package versions come from their metadata (torch is
    not imported).
    """
    cpu, physical, flags, identity = platform.processor() or None, set(), [], {}
    try:
        current: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = (part.strip() for part in line.partition(":"))
            if not key:
                if "core id" in current:
                    physical.add((current.get("physical id", "0"), current["core id"]))
                current = {}
            else:
                current[key] = value
                if key == "model name" and cpu in (None, "", platform.machine()):
                    cpu = value
                if key in ("vendor_id", "cpu family", "model", "stepping") and key not in identity:
                    identity[key] = value
                if key == "flags" and not flags:
                    flags = [flag for flag in value.split() if flag in SIMD_FLAGS]
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    from dpa.runtime.engines import visible_gpus

    gpus = visible_gpus()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "cpu_id": identity or None,
        "simd": flags,
        "usable_cores": usable_cores(),
        "memory_gib": memory,
        "gpus_visible": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {
            "numpy": _package_version("numpy"),
            "opencv": _package_version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
            "onnxruntime": _package_version("onnxruntime", "onnxruntime-gpu"),
            "torch": _package_version("torch"),
            "tensorrt": _package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
            "gstreamer": _gstreamer_version(),
        },
        "load_average": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---- settings, frames, engines ----------------------------------------------------------------------------


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


@dataclass
class EngineOptions:
    """What `open_engine` is asked for (see `dpa.runtime.engines.open_engine`); threads come from TimingSettings."""

    backend: str = "onnxruntime"
    device: str = "auto"
    providers: list[str] | None = None
    cache: str | None = None
    plugins: str | None = None


def open_bench_engine(export_dir: str | Path, precision: str, options: EngineOptions, threads: int | None):
    """The engine for one export directory and precision (the only place the harness opens engines)."""
    from dpa.runtime.engines import open_engine

    return open_engine(export_dir, backend=options.backend, precision=precision, device=options.device,
                       threads=threads, providers=options.providers, cache_dir=options.cache,
                       plugin_library=options.plugins)


def bench_clip(size: int, length: int, seed: int) -> list[np.ndarray]:
    """The benchmark clip: `length` uint8 (S, S, 3) RGB frames of `generate_clip` (numpy and OpenCV only)."""
    from dpa.synthetic import generate_clip

    frames, _ = generate_clip(np.random.default_rng(seed), length, size)
    return frames


def live_flows(frames: Sequence[np.ndarray], size: int, preset: str = "fast") -> list[np.ndarray]:
    """The live-direction flow field (S, S, 2) float32 of every frame for a model of input size S, as the runtime
    computes it."""
    estimator = model_flow_estimator(size, preset)
    return [live_flow(frames[i - 1] if i else None, frame, estimator) for i, frame in enumerate(frames)]


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar over `total` frames (None when progress is off)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="frame", leave=False, dynamic_ncols=True)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


# ---- runtime measurements ---------------------------------------------------------------------------------


def runtime_timer(chain: StageChain, frames: Sequence[np.ndarray], flows: Sequence[np.ndarray],
                  settings: TimingSettings, name: str = "runtime") -> Timer:
    """The runtime on pre-decoded frames with cached memory: `Segmenter.segment` per frame, flow timed alongside.

    Each repeat starts a fresh Segmenter whose memory holds the paper's N references over the clip
    (`OfflinePolicy`, `Segmenter.prime`, entries from `flows`, untimed; their ifa_memory seconds per entry go to
    `memory_entry`), so no frame computes a memory entry, like the eager model with cached memory. Per timed
    frame, with the runtime's stage names: `flow` = the DIS live flow, estimated inline, + its rendering as the
    colour image (which `segment()` times as its own `flow`); per_frame = the rest of `segment()` (pre + graphs +
    post); extra `with_flow` = the whole frame, flow included; `graphs` = the graphs' own seconds.
    """
    samples = Samples(name, "dpa.runtime Segmenter per frame on pre-decoded frames, cached memory (N references "
                      "primed once): pre-processing + stage graphs + post-processing; flow (DIS live flow + its "
                      "rendering) timed separately", settings.frames, settings.warmup)
    estimator = model_flow_estimator(chain.manifest.size, settings.flow_preset)

    def repeat(bar) -> None:
        policy = OfflinePolicy(len(frames), chain.memory.capacity) if chain.memory else None
        segmenter = Segmenter(chain, policy)
        if policy is not None:
            references = sorted(set(policy.references))
            primed = segmenter.prime({i: (frames[i], flows[i]) for i in references})
            samples.memory_entry.append(primed.get("ifa_memory", 0.0) / len(references))
        records, whole, with_flow = [], 0.0, 0.0
        for index, frame in enumerate(frames):
            started = time.perf_counter()
            flow = live_flow(frames[index - 1] if index else None, frame, estimator)
            flowed = time.perf_counter()
            result = segmenter.segment(frame, flow, index)
            ended = time.perf_counter()
            _tick(bar)
            if index < settings.warmup:
                continue
            rendering = result.seconds.get("flow", 0.0)  # the Segmenter's own flow stage: rendering the field
            whole += ended - flowed - rendering
            with_flow += ended - started
            records.append({**result.seconds, "flow": flowed - started + rendering})
        stages = per_frame_means(records, settings.frames)
        graphs = sum(stages.get(stage, 0.0) for stage in GRAPH_STAGES)
        samples.add_repeat(whole / settings.frames, stages, with_flow=with_flow / settings.frames, graphs=graphs)

    return Timer(samples, repeat, len(frames))


class _FrameClock(StageStats):
    """StageStats that also keeps every frame's end time and stage seconds (for the live loop's timing)."""

    def __init__(self):
        super().__init__()
        self.frame_ends: list[float] = []
        self.frame_seconds: list[dict[str, float]] = []

    def add(self, seconds: dict[str, float]) -> None:
        super().add(seconds)
        self.frame_ends.append(self._clock())
        self.frame_seconds.append(dict(seconds))


def _steady_per_frame(frame_ends: Sequence[float], warmup: int, frames: int) -> float:
    """Seconds per frame from the end of the last warm-up frame to the end of the last timed frame."""
    if len(frame_ends) < warmup + frames:
        raise DpaError(f"the loop processed {len(frame_ends)} frames, the measurement needs {warmup + frames}")
    return (frame_ends[warmup + frames - 1] - frame_ends[warmup - 1]) / frames


def synthetic_source_uri(size: int, frames: int, seed: int) -> str:
    """The non-live GStreamer source of the benchmark clip: `test://synthetic` delivers every frame of
    generate_clip(seed) through an appsrc, pixel-identical to `bench_clip(size, frames, seed)`."""
    return f"test://synthetic?size={size}&frames={frames}&seed={seed}&live=0"


def decode_source(uri: str, count: int, timeout: float = 30.0) -> list[np.ndarray]:
    """The first `count` frames of a source URI, decoded into memory (uint8 RGB); DpaError when it has fewer."""
    from dpa.runtime.video import VideoSource

    frames = []
    with VideoSource(uri) as source:
        while len(frames) < count and (frame := source.read(timeout)) is not None:
            frames.append(frame.image)
    if len(frames) < count:
        raise DpaError(f"{uri} gave {len(frames)} frames, the measurement needs {count}")
    return frames


def segmenter_live_timer(chain: StageChain, frames: Sequence[np.ndarray], settings: TimingSettings) -> Timer:
    """The live loop's work without GStreamer: DIS live flow + `Segmenter.segment` with the uniform policy (as
    `dpa run` on a live source), frame after frame on pre-decoded frames; timed like `live_loop_timer` (frame end
    to frame end after the warm-up, so warmup >= 1)."""
    warmup = max(settings.warmup, 1)
    samples = Samples("segmenter_live", "DIS live flow + Segmenter (uniform policy, horizon "
                      f"{settings.horizon}) on the pre-decoded frames of the live loop's source, no GStreamer",
                      settings.frames, warmup)
    estimator = model_flow_estimator(chain.manifest.size, settings.flow_preset)
    capacity = chain.memory.capacity if chain.memory else None
    frames = list(frames[: warmup + settings.frames])

    def repeat(bar) -> None:
        segmenter = Segmenter(chain, UniformPolicy(capacity, settings.horizon) if capacity else None)
        ends, records = [], []
        for index, frame in enumerate(frames):
            started = time.perf_counter()
            flow = live_flow(frames[index - 1] if index else None, frame, estimator)
            flow_seconds = time.perf_counter() - started
            result = segmenter.segment(frame, flow, index)
            ends.append(time.perf_counter())
            records.append({**result.seconds, "flow": flow_seconds + result.seconds.get("flow", 0.0)})
            _tick(bar)
        stages = per_frame_means(records[warmup:], settings.frames)
        samples.add_repeat(_steady_per_frame(ends, warmup, settings.frames), stages)

    return Timer(samples, repeat, len(frames))


def live_loop_timer(chain: StageChain, uri: str, settings: TimingSettings, engine_info: dict | None = None) -> Timer:
    """The GStreamer live loop (`dpa.runtime.run.StreamRunner`, as `dpa run`) from `uri` to `null://`.

    Uniform policy and live flow (as on a live camera), overlay drawn, every frame processed (the source must
    not be live, or it would drop frames). Seconds per frame from the end of the last warm-up frame to the end
    of the last timed frame, so pipeline start-up and shut-down are left out, as they are from
    `segmenter_live_timer`.
    """
    from dpa.runtime.run import RunSettings, StreamRunner

    warmup = max(settings.warmup, 1)
    samples = Samples("live_loop", f"StreamRunner (dpa run's loop): {uri} -> DIS live flow -> Segmenter (uniform "
                      f"policy, horizon {settings.horizon}) -> overlay -> null://", settings.frames, warmup)
    samples.info["dropped"] = 0

    def repeat(bar) -> None:
        run_settings = RunSettings(source=uri, sink="null://", policy="uniform", horizon=settings.horizon,
                                   flow_preset=settings.flow_preset, stats_interval=0,
                                   max_frames=warmup + settings.frames)
        runner = StreamRunner(chain, run_settings, engine_info=engine_info, say=lambda line: None)
        if runner.live:
            raise DpaError(f"{uri} is a live source: it drops frames when the loop is slower; benchmark with a "
                           "source that delivers every frame (add live=0)")
        clock = _FrameClock()
        runner.stats = clock
        outcome = runner.run()
        if outcome.interrupted:
            raise KeyboardInterrupt
        if outcome.error:
            raise DpaError(f"the live loop on {uri} failed: {outcome.error}")
        stages = per_frame_means(clock.frame_seconds[warmup:warmup + settings.frames], settings.frames)
        samples.add_repeat(_steady_per_frame(clock.frame_ends, warmup, settings.frames), stages)
        samples.info["dropped"] += int(outcome.summary.get("dropped") or 0)
        if bar is not None:
            bar.update(warmup + settings.frames)

    return Timer(samples, repeat, warmup + settings.frames)


# ---- benchmark models -------------------------------------------------------------------------------------


def bench_cache_root(override: str | Path | None = None) -> Path:
    """Where automatic benchmark exports go: `override`, else $DPA_CACHE/bench, else ~/.cache/dpa/bench."""
    if override is not None:
        return Path(override)
    root = os.environ.get("DPA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dpa") / BENCH_CACHE


def bench_export(config_name: str, size: int | None, memory: int | None, width: float | None = None,
                 cache_root: str | Path | None = None) -> Path:
    """An export of the `config_name` preset at S, N (and width) with calibrated untrained weights (`dpa export
    --init calibrated`), in `cache_root/<config>-<S>-<N>[-w<width>]`; reused while its manifest matches.

    Timings do not depend on the weights; the calibrated initialisation keeps the activations in a trained
    network's range. Needs torch (the export); reusing a cached export does not.
    """
    from dpa.training.config import get_config

    config = get_config(config_name, size=size, memory=memory, width=width)
    name = f"{config.name}-{config.size}-{config.memory}" + (f"-w{config.width:g}" if width is not None else "")
    directory = bench_cache_root(cache_root) / name
    if (directory / "manifest.json").is_file():
        try:
            manifest = Manifest.load(directory)
        except DpaError:
            manifest = None
        if manifest and dict(manifest.model.config) == config.to_dict() and "functions" in manifest.forms:
            log.info("benchmark model %s: reusing %s", name, directory)
            return directory
    log.info("benchmark model %s: exporting %s (calibrated untrained weights) to %s", name, config.name, directory)
    from dpa.export.exporter import export_stage_graphs, model_for_export

    model, weights = model_for_export(None, config_name, size, memory, init="calibrated", out=directory, width=width)
    export_stage_graphs(model, directory, weights)
    return directory


# ---- reports ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """A ratio of two reported medians: `numerator` / `denominator`, each "measurement.quantity" with quantity
    per_frame_ms, with_flow_ms, graphs_ms or stages_ms.<stage>. bound: the target (value <= bound), None when
    the ratio is only reported."""

    name: str
    numerator: str
    denominator: str
    bound: float | None
    meaning: str


TARGET_RATIOS = (
    Ratio("runtime_vs_eager", "runtime.per_frame_ms", "eager.per_frame_ms", 0.85,
          "runtime per frame (pre + graphs + post) / PyTorch eager per frame (encode + ima_block5 + decode), both "
          "with cached memory"),
    Ratio("runtime_vs_reference_code", "runtime.per_frame_ms", "reference_code.per_frame_ms", 0.30,
          "runtime per frame / the public reference code's per-frame cost re-enacted in PyTorch (the N references "
          "re-encoded through both encoders for every query frame)"),
    Ratio("ifa_marginal", "runtime.per_frame_ms", "runtime_paper_ii.per_frame_ms", 1.10,
          "runtime per frame of paper-iv (IMA + IFA) / of paper-ii (IMA only); the paper's Table 2 has 2.26"),
    Ratio("live_overhead", "live_loop.per_frame_ms", "segmenter_live.per_frame_ms", 1.05,
          "GStreamer live loop per frame / the same work (flow + segmenter, uniform policy) on pre-decoded frames"),
    Ratio("flow_share", "runtime.stages_ms.flow", "runtime.with_flow_ms", 0.10,
          "flow per frame (DIS estimation + rendering the colour image) / whole frame (flow + pre + graphs + post)"),
    Ratio("int8_vs_fp32", "runtime_int8.per_frame_ms", "runtime.per_frame_ms", None,
          "runtime per frame with the int8 (Q/DQ) graphs / with the fp32 graphs; below 1 is a speed-up"),
)
SUPPLEMENTARY_RATIOS = (
    Ratio("graphs_vs_eager", "runtime.graphs_ms", "eager.per_frame_ms", None,
          "the stage graphs alone (no pre/post-processing) / PyTorch eager per frame"),
    Ratio("ifa_marginal_eager", "eager.per_frame_ms", "eager_paper_ii.per_frame_ms", None,
          "PyTorch eager per frame, paper-iv / paper-ii (cached memory)"),
    Ratio("ifa_marginal_reference_code", "reference_code.per_frame_ms", "eager_paper_ii.per_frame_ms", None,
          "the reference code's paper-iv per frame / paper-ii per frame: the analogue of the paper's 2.26"),
)


def quantity(measurements: Mapping[str, dict], path: str) -> float | None:
    """The median of "measurement.quantity" (e.g. "runtime.stages_ms.flow") in milliseconds, None when absent."""
    name, _, key = path.partition(".")
    value = measurements.get(name)
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value.get("median") if isinstance(value, Mapping) else None


def evaluate_ratios(measurements: Mapping[str, dict], ratios: Sequence[Ratio],
                    skipped: Mapping[str, str] | None = None) -> tuple[dict[str, float | None], dict[str, dict]]:
    """(name -> value, name -> {numerator, denominator, value, target, met, meaning, reason}) from the medians.

    A ratio is None when either median is missing; `reason` then says why (from `skipped`: measurement ->
    reason).
    """
    skipped = skipped or {}
    values, details = {}, {}
    for ratio in ratios:
        numerator, denominator = quantity(measurements, ratio.numerator), quantity(measurements, ratio.denominator)
        value = numerator / denominator if numerator is not None and denominator else None
        reason = None
        if value is None:
            missing = [path.split(".")[0] for path, v in ((ratio.numerator, numerator),
                                                          (ratio.denominator, denominator)) if v is None]
            reason = "; ".join(f"{name}: {skipped.get(name, 'not measured')}" for name in dict.fromkeys(missing))
        values[ratio.name] = value
        details[ratio.name] = {
            "value": value,
            "numerator": ratio.numerator,
            "denominator": ratio.denominator,
            "numerator_ms": numerator,
            "denominator_ms": denominator,
            "target": None if ratio.bound is None else f"<= {ratio.bound:g}",
            "met": None if ratio.bound is None or value is None else value <= ratio.bound,
            "meaning": ratio.meaning,
            "reason": reason,
        }
    return values, details


def _stage_order(stage: str) -> int:
    order = ("flow", "pre", "references", "reference_memory", "encoder", "ima", "ifa_memory", "decoder", "post",
             "output")
    return order.index(stage) if stage in order else len(order)


def _ms(summary: Mapping | None, spread: bool = True) -> str:
    if not summary:
        return "-"
    text = f"{summary['median']:.1f}"
    return f"{text} [{summary['q1']:.1f}–{summary['q3']:.1f}]" if spread else text


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def measurement_rows(measurements: Mapping[str, dict]) -> list[tuple[str, ...]]:
    """Rows (name, ms per frame median [IQR], min–max, fps, ms with flow, peak RSS MiB) for the report tables."""
    rows = [("measurement", "ms/frame median [IQR]", "min–max", "fps", "ms/frame with flow", "peak RSS MiB")]
    for name, entry in measurements.items():
        per_frame = entry["per_frame_ms"]
        rows.append((name, _ms(per_frame), f"{per_frame['min']:.1f}–{per_frame['max']:.1f}",
                     f"{entry['fps']:.2f}" if entry.get("fps") else "-", _ms(entry.get("with_flow_ms")),
                     f"{entry['peak_rss_mib']:.0f}" if entry.get("peak_rss_mib") is not None else "-"))
    return rows


def stage_rows(measurements: Mapping[str, dict]) -> list[tuple[str, ...]]:
    """Rows (measurement, then the median ms per frame of every stage) for the report tables."""
    stages = sorted({stage for entry in measurements.values() for stage in entry["stages_ms"]}, key=_stage_order)
    rows = [("measurement", *stages, "memory entry")]
    for name, entry in measurements.items():
        rows.append((name, *(_ms(entry["stages_ms"].get(stage), spread=False) for stage in stages),
                     _ms(entry.get("memory_entry_ms"), spread=False)))
    return rows


def ratio_rows(details: Mapping[str, dict]) -> list[tuple[str, ...]]:
    rows = [("ratio", "value", "target", "met", "numerator / denominator (median ms)")]
    for name, detail in details.items():
        met = "-" if detail["met"] is None else ("yes" if detail["met"] else "NO")
        if detail["value"] is None:
            fraction = detail["reason"] or "-"
        else:
            fraction = (f"{detail['numerator']} {detail['numerator_ms']:.1f} / {detail['denominator']} "
                        f"{detail['denominator_ms']:.1f}")
        rows.append((name, _ratio(detail["value"]), detail["target"] or "reported", met, fraction))
    return rows


def _text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def format_report(report: dict, markdown: bool = False) -> str:
    """The report's tables (measurements, stages, ratios) as console text or Markdown."""
    table = _markdown_table if markdown else _text_table
    machine, config = report["machine"], report["config"]
    heading = "### " if markdown else ""
    lines = [
        f"{heading}{report['kind']}: {config.get('description', '')}",
        f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, load {machine['load_average']}; "
        f"threads {config['timing']['threads']}; {config['timing']['repeats']} repeats x "
        f"{config['timing']['frames']} frames after {config['timing']['warmup']} warm-up",
        "",
        table(measurement_rows(report["measurements"])),
        "",
        "median ms per frame and stage:" if not markdown else "Median ms per frame and stage:",
        "",
        table(stage_rows(report["measurements"])),
    ]
    if report.get("targets"):
        lines += ["", table(ratio_rows(report["targets"]))]
    if report.get("supplementary"):
        lines += ["", table(ratio_rows(report["supplementary"]))]
    if report.get("skipped"):
        lines += ["", "not measured:"] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    if report.get("warnings"):
        lines += ["", "warnings:"] + [f"- {message}" for message in report["warnings"]]
    return "\n".join(lines)


def _base_report(kind: str, config: dict) -> dict:
    return {"schema": SCHEMA, "kind": kind, "machine": machine_info(), "config": config, "measurements": {},
            "skipped": {}}


def oversubscription_warning(machine: Mapping, threads: int | None = None) -> str | None:
    """A warning when the 1-minute load average, at the start or the end of the run, exceeded the usable cores."""
    loads = [values[0] for values in (machine.get("load_average"), machine.get("load_average_end")) if values]
    cores = machine.get("usable_cores") or 1
    if not loads or max(loads) <= cores:
        return None
    load = f"the machine was oversubscribed (1-minute load {max(loads):.1f} on {cores} usable cores)"
    if threads == 1:
        return (f"{load}: absolute times are slower and noisier than on a quiet machine; the ratios, measured "
                "interleaved, are the numbers to use")
    return (f"{load}: multi-threaded timings are unreliable, PyTorch's most (its OpenMP barriers stall whenever one "
            "of its threads is preempted); re-run on a quiet machine, or compare with --threads 1")


def _finish_report(report: dict) -> dict:
    report["machine"]["load_average_end"] = (
        [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    report["peak_rss_mib_process"] = lifetime_peak_rss_bytes() / 2**20
    warning = oversubscription_warning(report["machine"], report["config"]["timing"]["threads"])
    report["warnings"] = [warning] if warning else []
    for message in report["warnings"]:
        log.warning("%s", message)
    return report


# ---- dpa bench --------------------------------------------------------------------------------------------


def _engine_json(engine) -> dict:
    description = engine.describe()
    return {key: description[key] for key in ("backend", "precision", "device", "providers", "form", "directory",
                                               "versions") if key in description}


def _torch_device(engine_device: str, requested: str) -> str:
    """The PyTorch device next to an engine: cuda where the engine (or the request) is on a GPU, else cpu."""
    if requested.startswith("cuda"):
        return requested
    return "cuda" if str(engine_device).startswith("cuda") else "cpu"


def _check_torch_device(requested: str) -> None:
    """Fail before the long work when the PyTorch side is asked for CUDA that it cannot use."""
    if requested.startswith("cuda"):
        from dpa.training.bench_torch import torch_device

        torch_device(requested)


def _frame_description(settings: TimingSettings, size: int) -> dict:
    return {"frames": f"generate_clip(seed {settings.seed}), {settings.clip_length} frames of {size}x{size} px, "
                      "pre-decoded",
            "flow": f"DIS ({settings.flow_preset}) at the model's input size, live direction -flow(t->t-1)"}


def run_bench(export_dir: str | Path, settings: TimingSettings, engine_options: EngineOptions | None = None,
              precision: str = "fp32", baselines: Sequence[str] = ()) -> dict:
    """`dpa bench`: the runtime on one export (backend, precision, size from the export) and, on request, the
    PyTorch baselines ("eager", "reference-code") of the same weights, interleaved repeat by repeat. Returns the
    report (see the module docstring): per measurement the per-frame and per-stage medians, spread, fps, peak
    RSS."""
    engine_options = engine_options or EngineOptions()
    unknown = sorted(set(baselines) - {"eager", "reference-code"})
    if unknown:
        raise DpaError(f"unknown baseline {', '.join(unknown)}; choose eager or reference-code")
    if baselines:
        _check_torch_device(engine_options.device)
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    frames = bench_clip(manifest.size, settings.clip_length, settings.seed)
    flows = live_flows(frames, manifest.size, settings.flow_preset)
    with open_bench_engine(export_dir, precision, engine_options, settings.threads) as engine:
        config = {
            "description": f"{manifest.config_name} S={manifest.size} N={manifest.memory}, "
                           f"{engine.backend} {engine.precision} on {engine.device}",
            "model": dict(manifest.model.config), "size": manifest.size, "memory": manifest.memory,
            "export": str(export_dir), "weights": manifest.checkpoint.init,
            "engine": _engine_json(engine), "timing": settings.to_json(),
            **_frame_description(settings, manifest.size),
        }
        report = _base_report("bench", config)
        chain = StageChain(engine)
        timers = [runtime_timer(chain, frames, flows, settings)]
        if baselines:
            from dpa.training import bench_torch

            device = _torch_device(engine.device, engine_options.device)
            config["pytorch"] = bench_torch.describe(device, settings.threads)
            model = bench_torch.model_of_export(export_dir)
            if "eager" in baselines:
                timers.append(bench_torch.eager_timer(model, frames, flows, settings, device))
            if "reference-code" in baselines:
                timers.append(bench_torch.reference_code_timer(model, frames, flows, settings, device))
        interleave(timers, settings.repeats, settings.progress)
    report["measurements"] = {timer.samples.name: timer.samples.to_json() for timer in timers}
    return _finish_report(report)


# ---- dpa bench --targets ----------------------------------------------------------------------------------


@dataclass
class TargetModels:
    """The exports `--targets` measures: paper-iv (the model under test) and paper-ii (IFA off, same S, N, width)."""

    paper_iv: Path
    paper_ii: Path


def target_models(export: str | Path | None, paper_ii_export: str | Path | None, size: int | None,
                  memory: int | None, width: float | None, cache_root: str | Path | None) -> TargetModels:
    """The paper-iv export (`export`, else exported into the benchmark cache) and a paper-ii export of the same S,
    N and width (`paper_ii_export`, else exported likewise)."""
    if export is not None:
        manifest = Manifest.load(export)
        config = dict(manifest.model.config)
        if not (config["ima"] != "off" and config["ifa"] != "off"):
            raise DpaError(f"--targets measures a model with IMA and IFA (paper-iv); {export} holds {config['name']}")
        width = None if config["width"] == 1.0 else config["width"]
        paper_iv = Path(export)
    else:
        paper_iv = bench_export("paper-iv", size, memory, width, cache_root)
    iv = Manifest.load(paper_iv)
    if paper_ii_export is not None:
        paper_ii = Path(paper_ii_export)
        ii = Manifest.load(paper_ii)
        config = dict(ii.model.config)
        if config["ifa"] != "off" or config["ima"] == "off":
            raise DpaError(f"--paper-ii-export must hold a model with IMA and without IFA; {paper_ii} holds "
                           f"{config['name']}")
        if (ii.size, dict(ii.model.config)["width"]) != (iv.size, dict(iv.model.config)["width"]):
            raise DpaError(f"--paper-ii-export {paper_ii} has S {ii.size}, width {config['width']}; the paper-iv "
                           f"export has S {iv.size}, width {iv['model']['config']['width']}: they must match")
    else:
        paper_ii = bench_export("paper-ii", iv.size, iv.memory, width, cache_root)
    return TargetModels(paper_iv, paper_ii)


def int8_variant(export_dir: Path, calibration_clips: str, threads: int | None = None,
                 max_frames: int = 6) -> tuple[Path | None, str | None]:
    """The int8 variant of an export: (directory, None), or (None, why not).

    An existing EXPORT/int8 is used as is. Otherwise `dpa calibrate EXPORT --frames CLIPS --out EXPORT
    --precisions int8 --max-frames M` makes it (entropy calibration on the first M frames of each clip) where the
    calibration package is installed; without it the reason is returned.
    """
    from dpa.runtime.engines import resolve_variant

    try:
        return resolve_variant(export_dir, "int8"), None
    except DpaError as missing:
        reason = str(missing)
    from dpa.cli import main, registered_commands

    if "calibrate" not in registered_commands():
        return None, f"no int8 variant and no `dpa calibrate` in this installation ({reason})"
    command = ["calibrate", str(export_dir), "--frames", calibration_clips, "--out", str(export_dir),
               "--precisions", "int8", "--max-frames", str(max_frames)]
    if threads:
        command += ["--threads", str(threads)]
    log.info("int8: `dpa %s`", " ".join(command))
    code = main(command)
    if code != 0:
        return None, f"`dpa {' '.join(command)}` exited {code}"
    try:
        return resolve_variant(export_dir, "int8"), None
    except DpaError as error:
        return None, f"`dpa calibrate` wrote no int8 variant: {error}"


def run_targets(models: TargetModels, settings: TimingSettings, engine_options: EngineOptions | None = None,
                live_source: str | None = None, calibration_clips: str = "synthetic:0..3",
                live: bool = True, int8: bool = True) -> dict:
    """`dpa bench --targets`: every measurement the target ratios need, interleaved repeat by repeat in one run,
    and the ratios.

    Measurements (paper-iv unless named): runtime, runtime_paper_ii, runtime_int8 (the int8 variant, made by
    `dpa calibrate` when missing), eager and eager_paper_ii (PyTorch, cached memory), reference_code (the public
    code's per-frame cost re-enacted), segmenter_live and live_loop (the GStreamer loop from `live_source`,
    default the benchmark clip through `test://synthetic`, to null://). A measurement that cannot run (no int8
    variant, no GStreamer) is listed under `skipped` with the reason, and its ratios are None with that reason.
    """
    import contextlib

    engine_options = engine_options or EngineOptions()
    _check_torch_device(engine_options.device)
    iv_manifest, ii_manifest = Manifest.load(models.paper_iv), Manifest.load(models.paper_ii)
    size = iv_manifest.size
    frames = bench_clip(size, settings.clip_length, settings.seed)
    flows = live_flows(frames, size, settings.flow_preset)
    live_length = max(settings.warmup, 1) + settings.frames
    live_source = live_source or synthetic_source_uri(size, live_length, settings.seed)
    config = {
        "description": f"speed targets, {iv_manifest.config_name} S={size} N={iv_manifest.memory}",
        "paper_iv": dict(iv_manifest.model.config), "paper_ii": dict(ii_manifest.model.config),
        "size": size, "memory": iv_manifest.memory, "precision": "fp32",
        "exports": {"paper_iv": str(models.paper_iv), "paper_ii": str(models.paper_ii)},
        "weights": iv_manifest.checkpoint.init, "timing": settings.to_json(),
        **_frame_description(settings, size), "live_source": live_source if live else None,
        "schedule": "measurements interleaved: each round runs one repeat of every measurement, rotating the order",
    }
    report = _base_report("targets", config)
    skipped = report["skipped"]
    int8_directory = None
    if int8:
        int8_directory, reason = int8_variant(models.paper_iv, calibration_clips, settings.threads)
        if int8_directory is None:
            skipped["runtime_int8"] = reason
    else:
        skipped["runtime_int8"] = "left out (--no-int8)"
    source_frames = None
    if live:
        try:
            source_frames = decode_source(live_source, live_length)
        except (DpaError, ImportError) as error:
            skipped["live_loop"] = f"the GStreamer source could not be read: {error}"
    else:
        skipped["live_loop"] = "left out (--no-live)"

    from dpa.training import bench_torch

    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(open_bench_engine(models.paper_iv, "fp32", engine_options, settings.threads))
        config["engine"] = _engine_json(engine)
        chain = StageChain(engine)
        device = _torch_device(engine.device, engine_options.device)
        config["pytorch"] = bench_torch.describe(device, settings.threads)
        engine_ii = stack.enter_context(open_bench_engine(models.paper_ii, "fp32", engine_options, settings.threads))
        chain_ii = StageChain(engine_ii)
        model, model_ii = bench_torch.model_of_export(models.paper_iv), bench_torch.model_of_export(models.paper_ii)
        timers = [
            runtime_timer(chain, frames, flows, settings),
            runtime_timer(chain_ii, frames, flows, settings, name="runtime_paper_ii"),
            bench_torch.eager_timer(model, frames, flows, settings, device),
            bench_torch.eager_timer(model_ii, frames, flows, settings, device, name="eager_paper_ii"),
            bench_torch.reference_code_timer(model, frames, flows, settings, device),
        ]
        if int8_directory is not None:
            engine_int8 = stack.enter_context(open_bench_engine(models.paper_iv, "int8", engine_options,
                                                                settings.threads))
            config["engine_int8"] = _engine_json(engine_int8)
            timers.append(runtime_timer(StageChain(engine_int8), frames, flows,
                                        settings, name="runtime_int8"))
        if source_frames is not None:
            timers.append(segmenter_live_timer(chain, source_frames, settings))
            timers.append(live_loop_timer(chain, live_source, settings, config["engine"]))
        interleave(timers, settings.repeats, settings.progress)
    measurements = report["measurements"] = {timer.samples.name: timer.samples.to_json() for timer in timers}
    report["ratios"], report["targets"] = evaluate_ratios(measurements, TARGET_RATIOS, skipped)
    report["supplementary_ratios"], report["supplementary"] = evaluate_ratios(measurements, SUPPLEMENTARY_RATIOS,
                                                                              skipped)
    report["gpu"] = ("not measured: no GPU was used in this run" if not device.startswith("cuda")
                     else f"PyTorch on {device}, engine on {config['engine'].get('device')}")
    return _finish_report(report)
