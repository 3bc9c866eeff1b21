"""Reading frames: `VideoSource` (a GStreamer pipeline into an appsink, or an image folder read with OpenCV)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.images import IMAGE_SUFFIXES, MAX_FRAME_SIDE, header_size, list_images, read_rgb
from dpa.runtime.video.gst import POLL_S, _Pipeline, _rgb_buffer, _sample_image
from dpa.runtime.video.pipelines import _framerate, source_description
from dpa.runtime.video.uri import SourceSpec, parse_source

logger = logging.getLogger(__name__)

FOLDER_FPS = 30.0  # image folders have no timestamps: frame i is at i / fps seconds
TRUNCATION_SLACK_S = 0.1  # a file whose frames end this much (or 2 frames) before its declared duration is damaged


def stream_frame_name(index: int) -> str:
    """The name of frame `index` of a stream (not an image folder): what its mask file is called."""
    return f"{index:05d}"


@dataclass
class Frame:
    """One frame from a VideoSource.

    image: uint8 (H, W, 3) RGB, contiguous; index: frame number at the source, 0-based, counting dropped ones;
    timestamp: seconds (the buffer's PTS; index / fps for image folders); name: the file stem for image folders,
    else `stream_frame_name(index)`.
    """

    image: np.ndarray
    index: int
    timestamp: float
    name: str


class _ImageFolderFrames:
    """The images of a folder (or of its JPEGImages/), in natural name order, read one at a time with OpenCV."""

    def __init__(self, spec: SourceSpec):
        root = Path(spec.location)
        folder = root / "JPEGImages" if (root / "JPEGImages").is_dir() else root
        self.paths = list_images(folder)
        if not self.paths:
            raise DpaError(f"video source {spec.uri}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.spec = spec
        self.position = 0
        self.skipped = 0

    def next(self) -> Frame | None:
        options = self.spec.options
        limit = min(len(self.paths), options.get("frames", len(self.paths)))
        while self.position < limit:
            index, path = self.position, self.paths[self.position]
            self.position += 1
            scaled = "width" in options or "height" in options
            try:
                with open(path, "rb") as handle:
                    header = handle.read(1 << 16)
            except OSError:
                header = b""
            size = header_size(header)
            if size is not None and max(size) > MAX_FRAME_SIDE and not scaled:
                raise DpaError(f"video source {self.spec.uri}: {path.name} is {size[0]}x{size[1]}, larger than "
                               f"{MAX_FRAME_SIDE} pixels a side; scale the frames with ?width=&height=")
            try:
                image = read_rgb(path)
            except DpaError as error:
                self.skipped += 1
                logger.warning("video source %s: skipping frame %d: %s", self.spec.uri, index, error)
                continue
            if scaled:
                size = (options.get("width", image.shape[1]), options.get("height", image.shape[0]))
                image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            return Frame(image, index, index / options.get("fps", FOLDER_FPS), path.stem)
        return None


class VideoSource:
    """Frames from a source URI (see the `dpa.runtime.video` docstring), as uint8 RGB `Frame`s.

    Use as a context manager or call open()/close(). `read()` returns the next frame or None at the end of the
    stream. Live sources keep only the newest frame (a slow consumer sees `dropped` grow, not latency);
    files, synthetic clips played not live and image folders deliver every frame.
    """

    def __init__(self, uri_or_spec: str | SourceSpec):
        self.spec = uri_or_spec if isinstance(uri_or_spec, SourceSpec) else parse_source(uri_or_spec)
        self.uri = self.spec.uri or self.spec.location
        self._pipeline: _Pipeline | None = None
        self._folder: _ImageFolderFrames | None = None
        self._feeder: threading.Thread | None = None
        self._appsink = None
        self._probe_ok = None
        self._produced = 0
        self._delivered = 0
        self._recent: deque = deque(maxlen=64)  # (PTS, index at the source) of the last buffers to reach the appsink
        self._finished = False
        self._closed = False
        self._last_timestamp: float | None = None
        self.warnings: list[str] = []  # problems met in the stream (a truncated file), each also logged
        self.width: int | None = None
        self.height: int | None = None
        self.fps: float | None = None

    @property
    def live(self) -> bool:
        return self.spec.live

    @property
    def produced(self) -> int:
        """Frames that reached the appsink (image folders: frames read)."""
        return self._folder.position - self._folder.skipped if self._folder else self._produced

    @property
    def delivered(self) -> int:
        """Frames returned by read()."""
        return self._delivered

    @property
    def dropped(self) -> int:
        """Frames dropped because the consumer was slower than a live source: produced - delivered (0 when not
        live)."""
        return self.produced - self._delivered if self.live else 0

    @property
    def skipped(self) -> int:
        """Unreadable images skipped (image folders, with a warning each)."""
        return self._folder.skipped if self._folder else 0

    @property
    def description(self) -> str:
        """The gst-launch description of the source (image folders: a sentence)."""
        if self.spec.kind == "folder":
            return f"image folder {self.spec.location} (OpenCV, natural name order)"
        return source_description(self.spec)

    def __enter__(self) -> VideoSource:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> VideoSource:
        """Start the source; DpaError when it cannot (missing file, absent plugin, camera refusing)."""
        if self._pipeline is not None or self._folder is not None:
            return self
        if self._closed:
            raise DpaError(f"video source {self.uri} was closed; open a new VideoSource")
        if self.spec.kind == "folder":
            self._folder = _ImageFolderFrames(self.spec)
            self.fps = self.spec.options.get("fps", FOLDER_FPS)
            return self
        if self.spec.kind == "file" and not Path(self.spec.location).is_file():
            raise DpaError(f"video source {self.uri}: file {self.spec.location} not found")
        frames = self._synthetic_frames() if self.spec.kind == "synthetic" else None
        pipeline = _Pipeline(source_description(self.spec), f"video source {self.uri}")
        self._appsink = pipeline.element("dpa_sink")
        self._probe_ok = pipeline.Gst.PadProbeReturn.OK
        self._appsink.get_static_pad("sink").add_probe(pipeline.Gst.PadProbeType.BUFFER, self._count)
        pipeline.start()
        self._pipeline = pipeline
        if frames is not None:
            self._feeder = threading.Thread(target=self._feed, args=(pipeline.element("dpa_frames"), frames),
                                             name="dpa-synthetic-source", daemon=True)
            self._feeder.start()
        return self

    def _synthetic_frames(self) -> list[np.ndarray]:
        from dpa.synthetic import generate_clip

        options = self.spec.options
        frames, _ = generate_clip(np.random.default_rng(options["seed"]), options["frames"], options["size"])
        return frames

    def _feed(self, appsrc, frames: list[np.ndarray]) -> None:
        """Push the synthetic frames into the appsrc (live: one every 1/fps seconds; else blocking when its queue
        is full), then EOS. Stops quietly
        when the pipeline stops (FLUSHING); a pipeline error reaches read() through the bus."""
        Gst = self._pipeline.Gst
        framerate = Fraction(_framerate(self.spec.options["fps"]))
        started = time.monotonic()
        for number, image in enumerate(frames):
            if self.spec.live:  # a camera's pace: frame n leaves at n / fps seconds
                delay = started + number / float(framerate) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if appsrc.emit("push-buffer", _rgb_buffer(Gst, image, number, framerate)) != Gst.FlowReturn.OK:
                return
        appsrc.emit("end-of-stream")

    def _count(self, pad, info):
        """Pad probe on the appsink's sink pad (streaming thread): count the buffer and remember its index."""
        self._recent.append((info.get_buffer().pts, self._produced))
        self._produced += 1
        return self._probe_ok

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """The next frame, or None at the end of the stream (or after `frames=N`).

        DpaError naming the source when its pipeline posts an error (camera unplugged, stream or decode error)
        or when no frame comes within timeout_s seconds.
        """
        if self._folder is None and self._pipeline is None:
            raise DpaError(f"video source {self.uri} is not open; call open() or use it in a with-block")
        if self._finished:
            return None
        if self._folder is not None:
            frame = self._folder.next()
            self._finished = frame is None
            if frame is not None:
                self._delivered += 1
                self.height, self.width = frame.image.shape[:2]
            return frame
        sample = self._pull(timeout_s)
        if sample is None:
            self._finished = True
            self._check_complete()
            return None
        image, fps = _sample_image(sample)
        index = self._index(sample.get_buffer().pts)
        if index >= self.spec.options.get("frames", index + 1):
            self._finished = True
            return None
        self._delivered += 1
        self.height, self.width = image.shape[:2]
        self.fps = fps or self.fps
        pts = sample.get_buffer().pts
        if pts != self._pipeline.Gst.CLOCK_TIME_NONE:
            timestamp = pts / self._pipeline.Gst.SECOND
            if self.fps is None and self._last_timestamp is not None and timestamp > self._last_timestamp:
                # caps without a frame rate (fragmented MP4): the first two frames' spacing gives it
                self.fps = round(1.0 / (timestamp - self._last_timestamp), 3)
        else:
            timestamp = index / self.fps if self.fps else 0.0
        self._last_timestamp = timestamp
        return Frame(image, index, timestamp, stream_frame_name(index))

    def _check_complete(self) -> None:
        """At the end of a file: a warning (logged, kept in `warnings`) when the frames stopped well before the
        duration the container declares, as in a truncated or damaged file, which demuxers end quietly."""
        if self.spec.kind != "file" or self._pipeline is None:
            return
        Gst = self._pipeline.Gst
        known, duration = self._pipeline.pipeline.query_duration(Gst.Format.TIME)
        if not known or duration <= 0:
            return
        declared = duration / Gst.SECOND
        frame = 1.0 / self.fps if self.fps else 0.0
        ended = (self._last_timestamp or 0.0) + frame if self._delivered else 0.0
        if declared - ended > max(2 * frame, TRUNCATION_SLACK_S):
            message = (f"video source {self.uri}: the frames end at frame {self._delivered} ({ended:.2f} s) but "
                       f"the file declares {declared:.2f} s: it is truncated or damaged; {self._delivered} frames "
                       "were used")
            self.warnings.append(message)
            logger.warning("%s", message)

    def _pull(self, timeout_s: float):
        """The next appsink sample; None at EOS. Frames already queued are delivered before an error is raised."""
        pipeline = self._pipeline
        deadline = time.monotonic() + timeout_s
        while True:
            pipeline.poll()
            wait = 0.0 if pipeline.error else max(0.0, min(POLL_S, deadline - time.monotonic()))
            sample = self._appsink.emit("try-pull-sample", int(wait * pipeline.Gst.SECOND))
            if sample is not None:
                return sample
            if pipeline.error:
                raise DpaError(f"video source {self.uri} failed: {pipeline.error}")
            if self._appsink.get_property("eos"):
                return None
            if time.monotonic() >= deadline:
                raise DpaError(f"no frame from video source {self.uri} in {timeout_s:g} s")

    def _index(self, pts: int) -> int:
        """The frame's number at the source: the delivered count when nothing is dropped; for live sources the
        count the probe gave the buffer with this PTS."""
        if not self.live:
            return self._delivered
        for buffer_pts, index in reversed(list(self._recent)):  # list(deque) copies atomically under the GIL
            if buffer_pts == pts:
                return index
        return self._produced - 1

    def close(self) -> None:
        """Stop the pipeline (state NULL) and the synthetic feeder; idempotent."""
        self._closed = True
        self._finished = True
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.stop()
        if self._feeder is not None:
            self._feeder.join(timeout=5.0)
            if self._feeder.is_alive():
                logger.warning("video source %s: the synthetic feeder did not stop within 5 s", self.uri)
            self._feeder = None
