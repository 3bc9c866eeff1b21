"""GStreamer through PyGObject: loading `Gst` and `GstRtspServer`, a bus-polled pipeline, RGB buffers <-> numpy."""

from __future__ import annotations

import ctypes
import logging
import time
import weakref
from fractions import Fraction

import numpy as np

from dpa.errors import DpaError, require_module

logger = logging.getLogger(__name__)

POLL_S = 0.05  # bus and appsink polling slice: Ctrl-C and errors are noticed within this
GSTREAMER_APT_PACKAGES = (
    "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
    "gstreamer1.0-plugins-ugly gstreamer1.0-libav gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0"
)


def _keep_gcc_unwinder_first() -> None:
    """Put libgcc_s's C++ unwinder in the process's global symbol scope before GStreamer loads.

    Debian's libgstreamer links libunwind, and GModule loads it into the global scope. Extensions loaded
    afterwards privately (onnx, torch) would then resolve `_Unwind_Resume` to libunwind's while their own
    exceptions come from libgcc_s: the first C++ exception they throw, even one they catch, aborts the process
    (seen with `dpa export` after a GStreamer run in the same process). Loading libgcc_s globally first keeps
    every extension on one unwinder.
    """
    try:
        ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # not a glibc/GCC system (the clash cannot happen there)
        pass


def _gst():
    """The initialised `Gst` module (PyGObject); DpaError naming what to install when it is absent."""
    _keep_gcc_unwinder_first()
    try:
        gi = require_module("gi", "PyGObject", "GStreamer video I/O")
    except DpaError as error:
        raise DpaError(f"{error}: pip install 'dpa-edge[gstreamer]' (PyGObject builds against the system packages "
                       f"libgirepository1.0-dev libcairo2-dev) and install GStreamer: {GSTREAMER_APT_PACKAGES} "
                       "(scripts/setup.sh does all of it)") from error
    try:
        gi.require_version("Gst", "1.0")
        from gi.repository import Gst
    except (ValueError, ImportError) as error:
        raise DpaError(f"GStreamer video I/O needs GStreamer's introspection data ({error}); install the system "
                       f"packages {GSTREAMER_APT_PACKAGES} (scripts/setup.sh)") from error
    if not Gst.is_initialized():
        Gst.init(None)
    return Gst


def _rtsp_server_module():
    """`GstRtspServer` (PyGObject); DpaError naming the system package when its typelib is absent."""
    import gi

    try:
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GstRtspServer
    except (ValueError, ImportError) as error:
        raise DpaError(f"RTSP output needs GstRtspServer ({error}); install the system package "
                       "gir1.2-gst-rtsp-server-1.0 (scripts/setup.sh)") from error
    return GstRtspServer


class _Pipeline:
    """A parsed gst-launch pipeline and its bus, polled without a main loop; every wait is bounded."""

    def __init__(self, description: str, what: str):
        self.Gst = _gst()
        from gi.repository import GLib

        self.what = what
        self.error: str | None = None
        self.eos = False
        try:
            self.pipeline = self.Gst.parse_launch(description)
        except GLib.Error as error:
            raise DpaError(f"{what}: cannot build the GStreamer pipeline ({error.message}); the GStreamer plugins "
                           f"may be missing: {GSTREAMER_APT_PACKAGES} (scripts/setup.sh)") from error
        self.bus = self.pipeline.get_bus()
        # A pipeline dropped without stop() (an exception before close) is still set to NULL, once.
        self._stop = weakref.finalize(self, self.pipeline.set_state, self.Gst.State.NULL)

    def element(self, name: str):
        return self.pipeline.get_by_name(name)

    def start(self) -> None:
        if self.pipeline.set_state(self.Gst.State.PLAYING) == self.Gst.StateChangeReturn.FAILURE:
            self.poll()
            self.stop()
            raise DpaError(f"{self.what} failed to start: {self.error or 'GStreamer could not start the pipeline'}")

    def poll(self, timeout_s: float = 0.0) -> None:
        """Handle the bus messages waiting (the first one waited for up to timeout_s): record the first error
        and EOS, log warnings, redistribute latency as gst-launch does."""
        Gst = self.Gst
        message = self.bus.timed_pop(int(timeout_s * Gst.SECOND)) if timeout_s > 0 else self.bus.pop()
        while message is not None:
            if message.type == Gst.MessageType.ERROR and self.error is None:
                error, debug = message.parse_error()
                detail = debug.strip().splitlines()[-1] if debug and debug.strip() else ""
                self.error = f"{error.message} ({message.src.get_name()}{': ' + detail if detail else ''})"
                logger.debug("%s: GStreamer error %s; debug: %s", self.what, error.message, debug)
            elif message.type == Gst.MessageType.WARNING:
                warning, _ = message.parse_warning()
                logger.warning("%s: GStreamer warning from %s: %s", self.what, message.src.get_name(), warning.message)
            elif message.type == Gst.MessageType.EOS:
                self.eos = True
            elif message.type == Gst.MessageType.LATENCY:
                self.pipeline.recalculate_latency()
            message = self.bus.pop()

    def wait_eos(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for EOS on the bus; False on an error or when the time is up."""
        deadline = time.monotonic() + timeout_s
        while not self.eos and self.error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.poll(min(POLL_S, remaining))
        return self.eos

    def stop(self) -> None:
        self._stop()


def _rgb_buffer(Gst, image: np.ndarray, number: int, framerate: Fraction, timestamp: float | None = None,
                previous_pts: int | None = None):
    """A Gst.Buffer of one uint8 (H, W, 3) RGB frame in GStreamer's default layout (rows padded to 4 bytes),
    stamped at `timestamp` seconds (capture time), else at number / fps; never before `previous_pts` (ns)."""
    height, width = image.shape[:2]
    row = width * 3
    stride = (row + 3) // 4 * 4
    if stride != row:
        padded = np.zeros((height, stride), np.uint8)
        padded[:, :row] = image.reshape(height, row)
        image = padded
    buffer = Gst.Buffer.new_wrapped(np.ascontiguousarray(image).tobytes())
    frame_ns = Gst.SECOND * framerate.denominator // framerate.numerator
    if timestamp is None:
        buffer.pts = number * frame_ns
    else:
        buffer.pts = max(int(round(timestamp * Gst.SECOND)), 0 if previous_pts is None else previous_pts + 1)
    buffer.duration = frame_ns
    buffer.offset = number
    return buffer


def _sample_image(sample) -> tuple[np.ndarray, float | None]:
    """The uint8 (H, W, 3) RGB image (contiguous, writable copy) of an appsink sample of RGB caps, and the frame
    rate of its caps (None when variable)."""
    structure = sample.get_caps().get_structure(0)
    width, height = structure.get_int("width")[1], structure.get_int("height")[1]
    _, numerator, denominator = structure.get_fraction("framerate")
    buffer = sample.get_buffer()
    stride = (width * 3 + 3) // 4 * 4
    data = np.frombuffer(buffer.extract_dup(0, buffer.get_size()), np.uint8)
    if data.size < stride * height:
        raise DpaError(f"a {width}x{height} RGB frame of {data.size} bytes (expected {stride * height})")
    rows = data[: stride * height].reshape(height, stride)[:, : width * 3]
    fps = numerator / denominator if numerator > 0 and denominator > 0 else None
    return np.array(rows.reshape(height, width, 3)), fps
