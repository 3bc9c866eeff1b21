"""The stream loop behind `dpa run` and `dpa demo`: source -> flow -> stage graphs -> mask -> overlay -> sink.

Torch-free. Files and image folders use the offline policy by default (the paper's references over the whole
clip, found in a first pass; forward flow t->t+1, looking one frame ahead) and process every frame. Live
sources use the uniform policy and the backward flow -flow(t->t-1), and drop frames rather than fall behind
(the source's appsink keeps only the newest frame). Statistics are printed periodically and summarised as JSON.
Errors and Ctrl-C end the run cleanly: the outputs are finalised (playable) before the error is reported.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpa import stop
from dpa.errors import DpaError
from dpa.files import write_text_atomically
from dpa.images import MAX_FRAME_SIDE, MIN_FRAME_SIDE, write_image
from dpa.outputs import FILE, FOLDER, FirstFailure, Output, claim_outputs
from dpa.progress import Bar
from dpa.runtime.chain import StageChain
from dpa.runtime.flow import flow_size_estimator, live_flow, offline_flow
from dpa.runtime.memory import OfflinePolicy, UniformPolicy
from dpa.runtime.overlay import draw_overlay
from dpa.runtime.segmenter import FrameResult, Segmenter
from dpa.runtime.stats import StageStats

log = logging.getLogger(__name__)

FLOW_DIRECTIONS = {
    "offline": "offline: forward flow t->t+1 (the last frame -flow(t->t-1)), as in training",
    "live": "live: -flow(t->t-1), anchored on frame t; the first frame (and the first after a size change) zero flow",
}


@dataclass
class RunSettings:
    """What `dpa run` was asked to do (see `dpa run --help` for each option)."""

    source: str
    sink: str = "null://"
    policy: str = "auto"  # auto (offline for files and folders, uniform for live sources), uniform, offline
    memory: int | None = None  # slots used (<= the graphs' capacity); None: all
    horizon: int = 32  # uniform policy: frames the memory spans
    min_confidence: float | None = None  # uniform policy: admission gate on mask confidence
    flow_preset: str = "fast"
    flow_size: int | None = None  # DIS working size; None: the model's input size S; 0: the frame's own
    masks: str | None = None  # folder for mask PNGs
    stats_json: str | None = None
    stats_interval: float = 5.0  # seconds between console lines; 0: none
    max_frames: int | None = None
    read_timeout: float = 10.0  # seconds a source may stay silent
    overlay_text: bool = True
    fps: float | None = None  # output frame rate; None: the source's
    overwrite: bool = False  # replace outputs that exist already (a mask folder is emptied first)


@dataclass
class RunOutcome:
    """The JSON summary of a run and the exit status it implies."""

    summary: dict
    error: str | None = None
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM, SIGHUP)
    results: list[FrameResult] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal is not None else (1 if self.error else 0)


class MaskWriter:
    """Writes mask PNGs (0/255, one channel) from a background thread so the loop never waits on the disk.

    Each file is written whole or not at all (`write_image`); the first write that fails stops the writer
    and is the error reported (by the next `write` or by `close`), naming its file and reason."""

    def __init__(self, folder: str | Path, depth: int = 64):
        self.folder = Path(folder)
        self.written = 0
        self.failure = FirstFailure()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name="dpa-mask-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, mask: np.ndarray) -> None:
        self.failure.raise_if_failed()
        self._queue.put((name, mask.astype(np.uint8) * 255))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.failure.message is not None:
                continue  # keep draining so that write() and close() never block
            name, image = item
            try:
                write_image(self.folder / f"{name}.png", image)
                self.written += 1
            except DpaError as error:
                self.failure.record(f"mask output: {error}")

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)
        self.failure.raise_if_failed()


class AdmissionLog:
    """How many frames the memory admitted, and the last 64 of them (bounded for endless live runs)."""

    def __init__(self, keep: int = 64):
        self.count = 0
        self.recent: deque[int] = deque(maxlen=keep)

    def add(self, frame: int) -> None:
        self.count += 1
        self.recent.append(frame)


def choose_policy(settings: RunSettings, live: bool) -> str:
    """The policy name for a source: `settings.policy`, or offline for files/folders and uniform for live."""
    if settings.policy == "auto":
        return "uniform" if live else "offline"
    if settings.policy == "offline" and live:
        raise DpaError("the offline policy needs the whole video in advance; a live source can only use uniform")
    if settings.policy not in ("uniform", "offline"):
        raise DpaError(f"unknown memory policy {settings.policy!r}; choose auto, uniform or offline")
    return settings.policy


def _slots(chain: StageChain, settings: RunSettings) -> int:
    capacity = chain.memory.capacity
    slots = settings.memory or capacity
    if not 1 <= slots <= capacity:
        raise DpaError(f"--memory {slots}: the graphs hold at most {capacity} reference frames (re-export with "
                       f"`dpa export --memory {slots}` for more)")
    return slots


class StreamRunner:
    """Runs one source through `chain` into one sink. `video` is the GStreamer I/O module (dpa.runtime.video).

    chain: the graphs (a `StageChain`), or a model on a server (`dpa.runtime.triton.client.TritonModel`): what it
    needs is `manifest`, `memory` and `segmenter(policy)`, which makes the frame-by-frame segmenter.
    """

    def __init__(self, chain: StageChain, settings: RunSettings, engine_info: dict | None = None,
                 keep_results: bool = False, say: Callable[[str], None] | None = None):
        from dpa.runtime import video

        self.video = video
        self.chain = chain
        self.settings = settings
        self.engine_info = engine_info or {}
        self.keep_results = keep_results
        self.say = say or log.info
        self.estimator = flow_size_estimator(settings.flow_size, chain.manifest.size, settings.flow_preset)
        self.stats = StageStats()
        self.source_spec = video.parse_source(settings.source)
        self.live = self.source_spec.live
        self.policy_name = choose_policy(settings, self.live) if chain.memory else "none"
        self.offline_policy: OfflinePolicy | None = None  # set by the first pass of an offline run
        self.prime_seconds: dict[str, float] = {}

    @property
    def uses_live_flow(self) -> bool:
        """Whether frames get the live flow -flow(t->t-1) (uniform policy, or a live source without memory)."""
        return self.policy_name == "uniform" or (self.live and self.policy_name == "none")

    @property
    def flow_direction(self) -> str:
        return FLOW_DIRECTIONS["live" if self.uses_live_flow else "offline"]

    def outputs(self) -> list[Output]:
        """Every file or folder the run writes: the sink (a file or an image folder), the masks, the statistics."""
        outputs = []
        sink = self.video.parse_sink(self.settings.sink)
        if sink.kind == "file":
            outputs.append(Output(Path(sink.location), FILE, "video"))
        elif sink.kind == "folder":
            outputs.append(Output(Path(sink.location), FOLDER, "image folder"))
        if self.settings.masks:
            outputs.append(Output(Path(self.settings.masks), FOLDER, "mask folder"))
        if self.settings.stats_json:
            outputs.append(Output(Path(self.settings.stats_json), FILE, "statistics file"))
        return outputs

    def run(self) -> RunOutcome:
        """Process the whole source (or until an error, a signal or --max-frames); the outputs are claimed before
        anything starts (`dpa.outputs`) and finalised in every case: the video and masks hold every frame written,
        the statistics say how the run ended."""
        with claim_outputs(self.outputs(), self.settings.overwrite):
            return self._run()

    def _run(self) -> RunOutcome:
        """The frame loop and the one `finally` that finalises every output on any ending (signal, error, disk
        full). Long on purpose (~60 lines): the order of writes and their clean-up read best in one place."""
        outcome = RunOutcome(summary={})
        output = masks = source = bar = segmenter = None
        admissions = AdmissionLog()
        last_print = time.perf_counter()
        try:
            masks = MaskWriter(self.settings.masks) if self.settings.masks else None
            references = self._offline_references() if self.policy_name == "offline" else None
            segmenter = self._segmenter()
            if references is not None:
                self.prime_seconds = segmenter.prime(references)
            source = self.video.VideoSource(self.source_spec)
            source.open()
            total = self.offline_policy.length if self.offline_policy else self.settings.max_frames
            bar = Bar(total, "run", "frame", enabled=not self.live or total is not None)
            start_time = None
            for index, frame, flow, flow_seconds, restarted in self._frames(source):
                if restarted:
                    segmenter.reset()
                result = segmenter.segment(frame.image, flow, index)
                result.seconds["flow"] += flow_seconds  # estimation + rendering
                started = time.perf_counter()
                if output is None:
                    output = self._open_output(frame.image, source)
                    start_time = frame.timestamp
                lines = self.stats.overlay_lines() if self.settings.overlay_text else []
                # Frames keep their time at the source (live: the capture time), so the recording lasts as long
                # as the source did, dropped frames or not.
                at = frame.timestamp - start_time
                if masks is not None:  # first: a failed mask write stops the run before the frame is counted
                    masks.write(frame.name, result.mask)
                output.write(draw_overlay(frame.image, result.mask, lines), timestamp=at)
                result.seconds["output"] = time.perf_counter() - started
                self.stats.add(result.seconds)
                if result.admitted is not None:
                    admissions.add(index)
                if self.keep_results:
                    outcome.results.append(result)
                if self.settings.stats_interval and time.perf_counter() - last_print >= self.settings.stats_interval:
                    self.say(self.stats.line(source.dropped))
                    last_print = time.perf_counter()
                if self.settings.max_frames and self.stats.frames >= self.settings.max_frames:
                    break
                bar.advance()  # a pending stop request ends the run here, between two frames
        except stop.Stopped as stopped:
            outcome.signal = stopped.signum
        except KeyboardInterrupt:  # SIGINT where `dpa.stop` is not installed (the loop used as a library)
            outcome.signal = signal.SIGINT
        except DpaError as error:
            outcome.error = str(error)
        finally:
            if bar is not None:
                bar.close()
            outcome.error = self._close(outcome.error, source, output, masks, segmenter)
            outcome.summary = self._summary(source, output, masks, admissions, outcome)
            if self.settings.stats_json:
                try:
                    _write_json(self.settings.stats_json, outcome.summary)
                except DpaError as error:  # the first failure stays the one reported
                    outcome.error = outcome.error or str(error)
                    log.error("%s", error)
        return outcome

    @staticmethod
    def _close(error: str | None, *closers) -> str | None:
        """Close the source, the sink, the mask writer and a server's stream (each even when another fails); the
        run's error, else the first closing error."""
        closing_errors = []
        for closer in closers:
            if getattr(closer, "close", None) is None:
                continue
            try:
                closer.close()
            except DpaError as problem:
                closing_errors.append(str(problem))
        return error or (closing_errors[0] if closing_errors else None)

    def _segmenter(self):
        """The frame-by-frame segmenter: local (a `Segmenter` over the chain) or the chain's own (a server's)."""
        make = getattr(self.chain, "segmenter", None)
        if make is not None:
            return make(self._policy())
        return Segmenter(self.chain, self._policy(), keep_values=False)

    def _policy(self) -> UniformPolicy | OfflinePolicy | None:
        if not self.chain.memory:
            return None
        if self.policy_name == "offline":
            return self.offline_policy
        return UniformPolicy(_slots(self.chain, self.settings), self.settings.horizon, self.settings.min_confidence)

    def _offline_references(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """First pass over a file: count its frames, then decode the reference frames and their neighbours."""
        length, size = 0, None
        with self.video.VideoSource(self.source_spec) as counter, Bar(None, "count frames", "frame") as bar:
            while (frame := counter.read(self.settings.read_timeout)) is not None:
                bar.advance()  # stops here on a signal
                if size is None:
                    size = check_frame_size(frame.image, self.settings.source)
                elif frame.image.shape != size:
                    raise DpaError(f"{self.settings.source}: the frame size changes at frame {frame.index} (from "
                                   f"{size[1]}x{size[0]} to {frame.image.shape[1]}x{frame.image.shape[0]}); the "
                                   "offline policy needs one frame size: run it with --policy uniform, or scale the "
                                   "frames with ?width=&height=")
                length += 1
                if self.settings.max_frames and length >= self.settings.max_frames:
                    break
        if length == 0:
            raise DpaError(f"{self.settings.source} has no frames")
        capacity = self.chain.memory.capacity
        slots = _slots(self.chain, self.settings)
        self.offline_policy = OfflinePolicy(length, capacity)
        if slots < capacity:
            raise DpaError("--memory smaller than the graphs' capacity is for the uniform policy; the offline policy "
                           "uses the paper's N references: re-export with --memory N")
        wanted = set(self.offline_policy.references)
        needed = wanted | {i + 1 for i in wanted if i + 1 < length} | {i - 1 for i in wanted if i == length - 1 > 0}
        frames: dict[int, np.ndarray] = {}
        with self.video.VideoSource(self.source_spec) as reader, Bar(max(needed) + 1, "read references",
                                                                      "frame") as bar:
            for index in range(max(needed) + 1):
                bar.advance()  # stops here on a signal
                frame = reader.read(self.settings.read_timeout)
                if frame is None:
                    raise DpaError(f"{self.settings.source} ended after {index} frames in the second pass "
                                   f"(the first counted {length})")
                if index in needed:
                    frames[index] = frame.image
        references = {}
        for index in wanted:
            before = [frames[index - 1]] if index == length - 1 and index > 0 else []
            after = [frames[index + 1]] if index + 1 < length else []
            neighbours = before + [frames[index]] + after
            references[index] = (frames[index], offline_flow(neighbours, len(before), self.estimator))
        return references

    def _frames(self, source):
        """Yield (index, frame, flow field (H, W, 2), flow seconds, restarted) in order, with the policy's flow
        direction; `restarted` says the memory must be emptied (the frame size changed)."""
        if self.uses_live_flow:
            yield from self._frames_live(source)
        else:
            yield from self._frames_offline(source)

    def _frames_live(self, source):
        previous = None
        while (frame := source.read(self.settings.read_timeout)) is not None:
            restarted = previous is not None and previous.shape != frame.image.shape
            if previous is None or restarted:
                check_frame_size(frame.image, self.settings.source)
            if restarted:
                self.say(f"frame size changed from {previous.shape[1]}x{previous.shape[0]} to "
                         f"{frame.image.shape[1]}x{frame.image.shape[0]}: memory and flow restart")
                previous = None
            started = time.perf_counter()
            flow = live_flow(previous, frame.image, self.estimator)
            yield frame.index, frame, flow, time.perf_counter() - started, restarted
            previous = frame.image

    def _frames_offline(self, source):
        previous, current, index = None, source.read(self.settings.read_timeout), 0
        while current is not None:
            following = None
            if not (self.settings.max_frames and index + 1 >= self.settings.max_frames):
                following = source.read(self.settings.read_timeout)
            if following is not None and following.image.shape != current.image.shape:
                raise DpaError(f"{self.settings.source}: the frame size changes at frame {index + 1}; "
                               "offline processing needs one frame size")
            neighbours = [f.image for f in (previous, current, following) if f is not None]
            started = time.perf_counter()
            flow = offline_flow(neighbours, 0 if previous is None else 1, self.estimator)
            yield index, current, flow, time.perf_counter() - started, False
            previous, current, index = current, following, index + 1

    def _open_output(self, image: np.ndarray, source):
        height, width = image.shape[:2]
        fps = self.settings.fps or getattr(source, "fps", None) or 30.0
        output = self.video.VideoOutput(self.settings.sink, width, height, fps)
        output.open()
        return output

    def _summary(self, source, output, masks, admissions, outcome) -> dict:
        summary = {
            "source": self.settings.source,
            "sink": self.settings.sink,
            "live": self.live,
            "flow": self.flow_direction,
            "flow_estimator": repr(self.estimator),
            "memory": {"policy": self.policy_name, "admitted_frames": list(admissions.recent),
                       "admissions": admissions.count},
            "engine": self.engine_info,
            **self.stats.summary(),
            "produced": getattr(source, "produced", None),
            "dropped": getattr(source, "dropped", 0) if source is not None else 0,
            "frames_written": getattr(output, "frames_written", 0) if output is not None else 0,
            "masks_written": masks.written if masks is not None else 0,
            "skipped_frames": getattr(source, "skipped", 0) if source is not None else 0,
            "source_warnings": list(getattr(source, "warnings", [])) if source is not None else [],
            "interrupted": outcome.interrupted,
            "signal": signal.Signals(outcome.signal).name if outcome.signal is not None else None,
            "error": outcome.error,
            "outputs": [str(output.path) for output in self.outputs()],
        }
        if self.offline_policy is not None:
            summary["memory"].update(self.offline_policy.describe())
            summary["memory"]["prime_seconds"] = self.prime_seconds
        return summary


def _write_json(path: str | Path, payload: dict) -> None:
    """The statistics file, written whole or not at all."""
    path = Path(path)
    try:
        write_text_atomically(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")
    except OSError as error:
        raise DpaError(f"cannot write the statistics to {path}: {error.strerror or error}") from error


def check_frame_size(image: np.ndarray, source: str) -> tuple[int, ...]:
    """The frame's shape, or DpaError when it is outside what the pipeline handles (before anything is written)."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_FRAME_SIDE or max(height, width) > MAX_FRAME_SIDE:
        raise DpaError(f"{source}: frames of {width}x{height} are outside {MIN_FRAME_SIDE} to {MAX_FRAME_SIDE} pixels "
                       "a side; scale them with ?width=&height= on the source")
    return image.shape


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
