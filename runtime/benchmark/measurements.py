"""The runtime's measurements for `dpa bench` (torch-free): the benchmark clip and its live flow, the segmenter on
pre-decoded frames, and the GStreamer live loop.

Every measurement processes the same pre-decoded synthetic clip (`dpa.synthetic.generate_clip`, S x S frames) with
the flow the runtime uses live (DIS at the model's input size, -flow(t->t-1), the first frame zero); stage names
are the runtime's (`flow` = estimation + rendering the colour image, `pre`, the graphs, `post`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from dpa import stop
from dpa.errors import DpaError
from dpa.runtime.benchmark.timers import (
    Samples,
    Timer,
    TimingSettings,
    advance,
    per_frame_means,
)
from dpa.runtime.chain import StageChain
from dpa.runtime.flow import live_flow, model_flow_estimator
from dpa.runtime.memory import OfflinePolicy, UniformPolicy
from dpa.runtime.segmenter import Segmenter
from dpa.runtime.stats import StageStats

log = logging.getLogger(__name__)


GRAPH_STAGES = ("encoder", "ima", "ifa_memory", "decoder")


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
            advance(bar)
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
            advance(bar)
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
            raise stop.Stopped(outcome.signal)
        if outcome.error:
            raise DpaError(f"the live loop on {uri} failed: {outcome.error}")
        stages = per_frame_means(clock.frame_seconds[warmup:warmup + settings.frames], settings.frames)
        samples.add_repeat(_steady_per_frame(clock.frame_ends, warmup, settings.frames), stages)
        samples.info["dropped"] += int(outcome.summary.get("dropped") or 0)
        bar.advance(warmup + settings.frames)

    return Timer(samples, repeat, warmup + settings.frames)

