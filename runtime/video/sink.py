"""Writing frames: `VideoOutput` (an appsrc into a GStreamer sink or an RTSP server, or an image folder)."""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.images import write_image
from dpa.runtime.video.gst import _Pipeline, _rgb_buffer, _rtsp_server_module
from dpa.runtime.video.pipelines import NON_LIVE_QUEUE, _framerate, rtsp_media_description, sink_description
from dpa.runtime.video.uri import SinkSpec, parse_sink

logger = logging.getLogger(__name__)


def _check_writable_file(path: Path, uri: str) -> None:
    """Create the file's folder and the (empty) file now, so that a bad path fails before anything starts."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb"):
            pass
    except OSError as error:
        raise DpaError(f"video output {uri}: cannot write {path} ({error.strerror or error}); "
                       "choose a writable path") from error


def _check_writable_folder(folder: Path, uri: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DpaError(f"video output {uri}: cannot write into {folder} ({error.strerror or error}); "
                       "choose a writable folder") from error


class _ImageFolderWriter:
    """Writes images with OpenCV on a background thread, fed through a bounded queue; the first write error is
    raised by the next put() or by close()."""

    def __init__(self, uri: str, timeout_s: float, capacity: int = 8):
        self.uri = uri
        self.timeout_s = timeout_s
        self.queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.error: DpaError | None = None
        self.thread = threading.Thread(target=self._run, name="dpa-image-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, keep draining so that put() and close() never block
                try:
                    write_image(*item)  # whole files only: a reader never sees half an image
                except DpaError as error:
                    self.error = error

    def _raise_error(self) -> None:
        if self.error is not None:
            raise DpaError(f"video output {self.uri}: {self.error}")

    def put(self, path: Path, image: np.ndarray) -> None:
        self._raise_error()
        try:
            self.queue.put((path, image), timeout=self.timeout_s)
        except queue.Full:
            raise DpaError(f"video output {self.uri}: the image writer did not keep up for "
                           f"{self.timeout_s:g} s (disk full or very slow?)") from None

    def close(self) -> None:
        try:
            self.queue.put(None, timeout=self.timeout_s)
        except queue.Full:
            raise DpaError(f"video output {self.uri}: the image writer did not finish within "
                           f"{self.timeout_s:g} s") from None
        self.thread.join(timeout=self.timeout_s)
        if self.thread.is_alive():
            raise DpaError(f"video output {self.uri}: the image writer did not finish within {self.timeout_s:g} s")
        self._raise_error()


class _RtspServer:
    """A GstRtspServer serving one mount on its own GLib main loop (a background thread)."""

    def __init__(self, spec: SinkSpec, width: int, height: int, fps: float):
        from gi.repository import GLib

        GstRtspServer = _rtsp_server_module()
        self.uri = spec.uri
        address, port = spec.options["address"], spec.options["port"]
        self.context = GLib.MainContext.new()
        self.loop = GLib.MainLoop.new(self.context, False)
        self.server = GstRtspServer.RTSPServer.new()
        self.server.set_address(address)
        self.server.set_service(str(port))
        factory = GstRtspServer.RTSPMediaFactory.new()
        factory.set_launch(rtsp_media_description(spec, width, height, fps))
        factory.set_shared(True)
        self.server.get_mount_points().add_factory(spec.location, factory)
        self.source_id = self.server.attach(self.context)
        if self.source_id == 0:
            raise DpaError(f"video output {spec.uri}: cannot listen on {address}:{port} (in use or not allowed); "
                           "choose another port")
        self.remove_filter = lambda server, client, *unused: GstRtspServer.RTSPFilterResult.REMOVE
        self.thread = threading.Thread(target=self.loop.run, name="dpa-rtsp-server", daemon=True)
        self.thread.start()
        logger.info("serving rtsp://%s:%d%s", socket.gethostname(), port, spec.location)

    def close(self) -> None:
        """Disconnect the clients, stop listening, stop the main loop."""
        self.loop.quit()
        self.thread.join(timeout=5.0)
        self.server.client_filter(self.remove_filter)
        source = self.context.find_source_by_id(self.source_id)
        if source is not None:
            source.destroy()


class VideoOutput:
    """Writes uint8 RGB frames of a fixed size to a sink URI (see the `dpa.runtime.video` docstring).

    Use as a context manager or call open()/close(); close() finalises the output (EOS, so an .mp4 is playable)
    and is safe in a `finally` after a source error or Ctrl-C. Frames of another size are resized to the
    opened size (one warning).
    """

    def __init__(self, uri_or_spec: str | SinkSpec, width: int, height: int, fps: float, timeout_s: float = 10.0):
        self.spec = uri_or_spec if isinstance(uri_or_spec, SinkSpec) else parse_sink(uri_or_spec)
        self.uri = self.spec.uri or self.spec.location
        if width <= 0 or height <= 0:
            raise DpaError(f"video output {self.uri}: the frame size must be positive, got {width}x{height}")
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.framerate = Fraction(_framerate(self.fps))
        self.timeout_s = timeout_s
        self.frames_written = 0
        self._pipeline: _Pipeline | None = None
        self._appsrc = None
        self._writer: _ImageFolderWriter | None = None
        self._server: _RtspServer | None = None
        self._warned_resize = False
        self._closed = False
        self._last_pts: int | None = None

    @property
    def description(self) -> str:
        """The gst-launch description of the sink (image folders: a sentence)."""
        if self.spec.kind == "folder":
            return f"image folder {self.spec.location} ({self.spec.options['pattern']}, OpenCV)"
        return sink_description(self.spec, self.width, self.height, self.fps)

    def __enter__(self) -> VideoOutput:
        return self.open()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except DpaError as error:  # the exception in flight says more; this one is logged, not lost
            logger.error("%s", error)

    def open(self) -> VideoOutput:
        """Check that the output is writable and start it; DpaError when it cannot."""
        if self._pipeline is not None or self._writer is not None:
            return self
        if self._closed:
            raise DpaError(f"video output {self.uri} was closed; open a new VideoOutput")
        kind = self.spec.kind
        if kind == "display" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise DpaError(f"video output {self.uri}: there is no display (DISPLAY and WAYLAND_DISPLAY are unset); "
                           "write to a file, an image folder or rtsp://@:8554/name instead")
        if kind == "folder":
            _check_writable_folder(Path(self.spec.location), self.uri)
            self._writer = _ImageFolderWriter(self.uri, self.timeout_s)
            return self
        if kind in ("file", "rtsp") and (self.width % 2 or self.height % 2):
            raise DpaError(f"video output {self.uri}: H.264 needs an even width and height, got "
                           f"{self.width}x{self.height}")
        if kind == "file":
            _check_writable_file(Path(self.spec.location), self.uri)
        pipeline = _Pipeline(self.description, f"video output {self.uri}")
        try:
            if kind == "rtsp":
                self._server = _RtspServer(self.spec, self.width, self.height, self.fps)
            pipeline.start()
        except BaseException:
            pipeline.stop()
            self._stop_server()
            raise
        self._appsrc = pipeline.element("dpa_src")
        self._pipeline = pipeline
        return self

    def write(self, image: np.ndarray, name: str | None = None, timestamp: float | None = None) -> None:
        """Write one uint8 (H, W, 3) RGB frame. name: the file stem for image folders (default: the frame number
        in the folder's pattern); ignored by other sinks. timestamp: the frame's time in seconds from the first
        (live capture time; default frame number / fps). DpaError when the output fails or stalls."""
        if self._closed or (self._pipeline is None and self._writer is None):
            raise DpaError(f"video output {self.uri} is not open; call open() or use it in a with-block")
        image = self._fit(image)
        if self._writer is not None:
            self._writer.put(self._image_path(name), image.copy())
        else:
            self._wait_for_room()
            Gst = self._pipeline.Gst
            buffer = _rgb_buffer(Gst, image, self.frames_written, self.framerate, timestamp, self._last_pts)
            self._last_pts = buffer.pts
            result = self._appsrc.emit("push-buffer", buffer)
            if result != Gst.FlowReturn.OK:
                self._pipeline.poll()
                raise DpaError(f"video output {self.uri} failed: {self._pipeline.error or result.value_nick}")
        self.frames_written += 1

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        if image.shape[:2] != (self.height, self.width):
            if not self._warned_resize:
                logger.warning("video output %s: frames of %dx%d are resized to %dx%d", self.uri, image.shape[1],
                               image.shape[0], self.width, self.height)
                self._warned_resize = True
            image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(image)

    def _image_path(self, name: str | None) -> Path:
        pattern = self.spec.options["pattern"]
        if name is None:
            return Path(self.spec.location) / (pattern % self.frames_written)
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"a frame name must be a plain file stem, got {name!r}")
        return Path(self.spec.location) / (name + Path(pattern).suffix)

    def _wait_for_room(self) -> None:
        """Backpressure with a bound: wait while the appsrc holds NON_LIVE_QUEUE frames; raise pipeline errors."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._pipeline.poll()
            if self._pipeline.error:
                raise DpaError(f"video output {self.uri} failed: {self._pipeline.error}")
            if self._appsrc.get_property("current-level-buffers") < NON_LIVE_QUEUE:
                return
            if time.monotonic() >= deadline:
                raise DpaError(f"video output {self.uri} accepted no frame for {self.timeout_s:g} s")
            time.sleep(0.002)

    def close(self) -> None:
        """Finish the output: EOS and wait for it (bounded) so files are complete, then stop; idempotent.
        DpaError when the output could not be finalised (the pipeline is stopped anyway)."""
        if self._closed:
            return
        self._closed = True
        problem = None
        try:
            if self._writer is not None:
                self._writer.close()
            elif self._pipeline is not None:
                self._appsrc.emit("end-of-stream")
                if not self._pipeline.wait_eos(self.timeout_s):
                    problem = self._pipeline.error or f"no end of stream within {self.timeout_s:g} s"
        finally:
            if self._pipeline is not None:
                self._pipeline.stop()
            self._stop_server()
        if problem:
            raise DpaError(f"video output {self.uri} could not be finalised: {problem}")

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
