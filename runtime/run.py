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
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.runtime.chain import StageChain
from dpa.runtime.flow import DISFlow, live_flow, model_flow_estimator, offline_flow
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


@dataclass
class RunOutcome:
    """The JSON summary of a run and the exit status it implies."""

    summary: dict
    error: str | None = None
    interrupted: bool = False
    results: list[FrameResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.error else 0)


class MaskWriter:
    """Writes mask PNGs (0/255, one channel) from a background thread so the loop never waits on the disk."""

    def __init__(self, folder: str | Path, depth: int = 64):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DpaError(f"cannot create the mask folder {self.folder}: {error}") from error
        probe = self.folder / ".dpa-write-test"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise DpaError(f"mask folder {self.folder} is not writable: {error}") from error
        self.written = 0
        self._error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name="dpa-mask-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, mask: np.ndarray) -> None:
        if self._error:
            raise DpaError(self._error)
        self._queue.put((name, mask.astype(np.uint8) * 255))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, image = item
            path = self.folder / f"{name}.png"
            if cv2.imwrite(str(path), image):
                self.written += 1
            else:
                self._error = f"cannot write mask {path}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)
        if self._error:
            raise DpaError(self._error)


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
    """Runs one source through `chain` into one sink. `video` is the GStreamer I/O module (dpa.runtime.video)."""

    def __init__(self, chain: StageChain, settings: RunSettings, engine_info: dict | None = None,
                 keep_results: bool = False, say: Callable[[str], None] | None = None):
        from dpa.runtime import video

        self.video = video
        self.chain = chain
        self.settings = settings
        self.engine_info = engine_info or {}
        self.keep_results = keep_results
        self.say = say or log.info
        if settings.flow_size == 0:
            self.estimator = DISFlow(settings.flow_preset)
        else:
            self.estimator = model_flow_estimator(settings.flow_size or chain.manifest.size, settings.flow_preset)
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

    def run(self) -> RunOutcome:
        """Process the whole source (or until an error / Ctrl-C); the outputs are finalised in every case."""
        outcome = RunOutcome(summary={})
        output = masks = source = None
        admissions = AdmissionLog()
        last_print = time.perf_counter()
        try:
            masks = MaskWriter(self.settings.masks) if self.settings.masks else None
            references = self._offline_references() if self.policy_name == "offline" else None
            segmenter = Segmenter(self.chain, self._policy(), keep_values=False)
            if references is not None:
                self.prime_seconds = segmenter.prime(references)
            source = self.video.VideoSource(self.source_spec)
            source.open()
            frames = self._frames(source)
            for index, frame, flow, flow_seconds, restarted in frames:
                if restarted:
                    segmenter.reset()
                result = segmenter.segment(frame.image, flow, index)
                result.seconds["flow"] += flow_seconds  # estimation + rendering
                started = time.perf_counter()
                if output is None:
                    output = self._open_output(frame.image, source)
                lines = self.stats.overlay_lines() if self.settings.overlay_text else []
                output.write(draw_overlay(frame.image, result.mask, lines))
                if masks is not None:
                    masks.write(frame.name, result.mask)
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
        except KeyboardInterrupt:
            outcome.interrupted = True
        except DpaError as error:
            outcome.error = str(error)
        finally:
            closing_errors = []
            for closer in (source, output, masks):
                if closer is None:
                    continue
                try:
                    closer.close()
                except DpaError as error:
                    closing_errors.append(str(error))
            if closing_errors and not outcome.error:
                outcome.error = "; ".join(closing_errors)
            outcome.summary = self._summary(source, output, masks, admissions, outcome)
            if self.settings.stats_json:
                _write_json(self.settings.stats_json, outcome.summary)
        return outcome

    def _policy(self) -> UniformPolicy | OfflinePolicy | None:
        if not self.chain.memory:
            return None
        if self.policy_name == "offline":
            return self.offline_policy
        return UniformPolicy(_slots(self.chain, self.settings), self.settings.horizon, self.settings.min_confidence)

    def _offline_references(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """First pass over a file: count its frames, then decode the reference frames and their neighbours."""
        length = 0
        with self.video.VideoSource(self.source_spec) as counter:
            while counter.read(self.settings.read_timeout) is not None:
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
        with self.video.VideoSource(self.source_spec) as reader:
            for index in range(max(needed) + 1):
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
            "interrupted": outcome.interrupted,
            "error": outcome.error,
        }
        if self.offline_policy is not None:
            summary["memory"].update(self.offline_policy.describe())
            summary["memory"]["prime_seconds"] = self.prime_seconds
        return summary


def _write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    except OSError as error:
        raise DpaError(f"cannot write the statistics to {path}: {error}") from error


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
