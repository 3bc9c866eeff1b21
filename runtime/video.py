"""Video sources and sinks by URI (cameras, files, RTSP, test patterns, image folders) through GStreamer.

One string picks the backend, as jetson-inference's videoSource/videoOutput do: `parse_source`/`parse_sink`
turn it into a spec, `source_description`/`sink_description` into a gst-launch description.

Sources (`parse_source`), all taking `?width=&height=&fps=&frames=&live=0|1`:

- `/dev/videoN`, `v4l2:///dev/videoN` — a V4L2 camera (live);
- `csi://N` — a Jetson CSI camera through nvarguscamerasrc (live);
- a video file path or `file://PATH` — decoded with decodebin, every frame (not live);
- `rtsp://HOST[:PORT]/PATH` (`rtspt://` forces TCP) — an RTSP client (live), also `latency=` (ms);
- `test://PATTERN` — videotestsrc (`ball`, `smpte`, ...; live);
- `test://synthetic` — the procedural clips of `dpa.synthetic.generate_clip`, also `seed=` and `size=`,
  pushed through an appsrc (live: paced at fps by the appsink's clock sync);
- an image folder — read with OpenCV in natural name order (not live, no GStreamer, so frames are
  pixel-identical to offline inference's `cv2.imread`).

Live sources drop frames rather than queue them (appsink `max-buffers=1 drop=true`); the others process every
frame (backpressure). `frames=N` ends the stream after N frames at the source.

Sinks (`parse_sink`): `display://0`, a `.mp4`/`.mkv`/`.avi` file (H.264), an image folder `DIR/` or
`DIR/%05d.jpg|png` (written with OpenCV on a background thread), `rtsp://@:PORT/NAME` (a GstRtspServer fed
through intervideosink/intervideosrc) and `null://` (fakesink). GStreamer sinks are fed by an appsrc.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import re
import socket
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import cv2
import numpy as np

from dpa.errors import DpaError, require_module
from dpa.images import IMAGE_SUFFIXES, list_images, read_rgb, write_rgb

logger = logging.getLogger(__name__)

SOURCE_FORMS = (
    "/dev/videoN or v4l2:///dev/videoN (V4L2 camera)",
    "csi://N (Jetson CSI camera)",
    "a video file path or file://PATH",
    "rtsp://HOST[:PORT]/PATH (rtspt:// for TCP)",
    "test://PATTERN (GStreamer test pattern, e.g. test://ball)",
    "test://synthetic (procedural clip)",
    "an image folder (DIR of .jpg/.png files)",
)
SINK_FORMS = (
    "display://0",
    "FILE.mp4, FILE.mkv or FILE.avi",
    "DIR/ or DIR/%05d.jpg|png (image folder)",
    "rtsp://@:PORT/NAME (RTSP server)",
    "null:// (discard)",
)
VIDEO_SUFFIXES = {".mp4": "mp4mux", ".mkv": "matroskamux", ".avi": "avimux"}  # sink container -> muxer
SINK_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# videotestsrc's pattern nicknames (GStreamer 1.22).
TEST_PATTERNS = (
    "smpte", "snow", "black", "white", "red", "green", "blue", "checkers-1", "checkers-2", "checkers-4",
    "checkers-8", "circular", "blink", "smpte75", "zone-plate", "gamut", "chroma-zone-plate", "solid-color",
    "ball", "smpte100", "bar", "pinwheel", "spokes", "gradient", "colors", "smpte-rp-219",
)
TEST_DEFAULTS = {"width": 640, "height": 480, "fps": 30.0}
CSI_DEFAULTS = {"width": 1280, "height": 720, "fps": 30.0}
SYNTHETIC_DEFAULTS = {"size": 128, "frames": 300, "fps": 30.0, "seed": 0}
FOLDER_FPS = 30.0  # image folders have no timestamps: frame i is at i / fps seconds
RTSP_LATENCY_MS = 200
RTSP_SINK_PORT = 8554
MP4_FRAGMENT_MS = 1000
NON_LIVE_QUEUE = 4  # frames an appsink (non-live) or an output appsrc may hold before backpressure
POLL_S = 0.05  # bus and appsink polling slice: Ctrl-C and errors are noticed within this
GSTREAMER_APT_PACKAGES = (
    "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
    "gstreamer1.0-plugins-ugly gstreamer1.0-libav gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0"
)
_COMMON_OPTIONS = ("width", "height", "fps", "frames", "live")
_SOURCE_OPTIONS = {
    "v4l2": _COMMON_OPTIONS,
    "csi": _COMMON_OPTIONS,
    "file": _COMMON_OPTIONS,
    "rtsp": _COMMON_OPTIONS + ("latency",),
    "test": _COMMON_OPTIONS,
    "synthetic": _COMMON_OPTIONS + ("seed", "size"),
    "folder": ("width", "height", "fps", "frames"),
}
_INHERENTLY_LIVE = ("v4l2", "csi", "rtsp", "test")  # sources that produce at their own pace


# ----------------------------------------------------------------------------------------------------------
# URIs


@dataclass
class SourceSpec:
    """A parsed source URI.

    kind: "v4l2", "csi", "file", "rtsp", "test", "synthetic" or "folder"; location: the device, path, URL,
    sensor id or test pattern; options: typed query options (width, height, frames, seed, size, latency: int;
    fps: float; a synthetic source always has seed, size, frames and fps, defaults filled in); live: drop
    frames rather than queue them; uri: the string it came from.
    """

    kind: str
    location: str
    options: dict = field(default_factory=dict)
    live: bool = False
    uri: str = ""


@dataclass
class SinkSpec:
    """A parsed sink URI.

    kind: "display", "file", "folder", "rtsp" or "null"; location: display number, file path, folder path or
    RTSP mount path ("/name"); options: "muxer" (file), "pattern" (folder), "address" and "port" (rtsp);
    live: the appsrc feeding it is live (display, rtsp); uri: the string it came from.
    """

    kind: str
    location: str
    options: dict = field(default_factory=dict)
    live: bool = False
    uri: str = ""


def _bad_source(uri: str, why: str) -> DpaError:
    return DpaError(f"bad video source '{uri}': {why}; accepted: {'; '.join(SOURCE_FORMS)}, with options "
                    "?width=&height=&fps=&frames=&live=0|1 (synthetic: seed=, size=; rtsp: latency=)")


def _bad_sink(uri: str, why: str) -> DpaError:
    return DpaError(f"bad video sink '{uri}': {why}; accepted: {'; '.join(SINK_FORMS)}")


def _option_value(uri: str, key: str, text: str) -> int | float | bool:
    """One query option, typed and range-checked."""
    try:
        if key == "live":
            if text not in ("0", "1"):
                raise ValueError
            return text == "1"
        value = float(text) if key == "fps" else int(text)
    except ValueError:
        raise _bad_source(uri, f"option {key}={text!r} is not a {'0 or 1' if key == 'live' else 'number'}") from None
    if key not in ("seed", "latency") and not value > 0:
        raise _bad_source(uri, f"option {key} must be positive, got {text}")
    if key == "latency" and value < 0:
        raise _bad_source(uri, f"option latency must be >= 0 ms, got {text}")
    return value


def _split_options(uri: str, query: str, kind: str, keep_unknown: bool = False) -> tuple[dict, str]:
    """Typed options for `kind` from a query string, and the query left over (RTSP URLs keep their own)."""
    options, unknown = {}, []
    allowed = _SOURCE_OPTIONS[kind]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in allowed:
            options[key] = _option_value(uri, key, value)
        elif keep_unknown:
            unknown.append((key, value))
        else:
            raise _bad_source(uri, f"unknown option '{key}' (this source takes {', '.join(allowed)})")
    return options, urlencode(unknown)


def parse_source(uri: str) -> SourceSpec:
    """Parse a source URI (see the module docstring) into a SourceSpec; DpaError listing the accepted forms."""
    text = uri.strip()
    if not text:
        raise _bad_source(uri, "empty")
    if "://" not in text:  # a path; options follow a '?' unless the whole string names an existing file
        name, query = (text, "") if Path(text).exists() else text.partition("?")[::2]
        path = Path(name)
        kind = "v4l2" if str(path).startswith("/dev/video") else ("folder" if path.is_dir() else "file")
        return _path_source(uri, path, _split_options(uri, query, kind)[0])
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = Path(unquote(parts.netloc + parts.path))
        return _path_source(uri, path, _split_options(uri, parts.query, "folder" if path.is_dir() else "file")[0])
    if scheme == "v4l2":
        device = parts.netloc + parts.path
        if not re.fullmatch(r"/dev/video\d+", device):
            raise _bad_source(uri, "a V4L2 device is v4l2:///dev/videoN")
        return _make_source(uri, "v4l2", device, _split_options(uri, parts.query, "v4l2")[0])
    if scheme == "csi":
        if not parts.netloc.isdigit() or parts.path not in ("", "/"):
            raise _bad_source(uri, "a CSI camera is csi://N with N the sensor id")
        return _make_source(uri, "csi", parts.netloc, _split_options(uri, parts.query, "csi")[0])
    if scheme in ("rtsp", "rtsps", "rtspt", "rtspu"):
        if not parts.hostname:
            raise _bad_source(uri, "an RTSP source needs a host: rtsp://HOST[:PORT]/PATH")
        options, rest = _split_options(uri, parts.query, "rtsp", keep_unknown=True)
        return _make_source(uri, "rtsp", urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), options)
    if scheme == "test":
        pattern = (parts.netloc + parts.path).strip("/")
        if pattern == "synthetic":
            return _make_source(uri, "synthetic", "synthetic", _split_options(uri, parts.query, "synthetic")[0])
        if pattern not in TEST_PATTERNS:
            raise _bad_source(uri, f"unknown test pattern '{pattern}' (synthetic or one of {', '.join(TEST_PATTERNS)})")
        return _make_source(uri, "test", pattern, _split_options(uri, parts.query, "test")[0])
    raise _bad_source(uri, f"unknown scheme '{parts.scheme}://'")


def _path_source(uri: str, path: Path, options: dict) -> SourceSpec:
    if path.is_dir():
        return _make_source(uri, "folder", str(path), options)
    if str(path).startswith("/dev/video"):
        return _make_source(uri, "v4l2", str(path), options)
    return _make_source(uri, "file", str(path), options)


def _make_source(uri: str, kind: str, location: str, options: dict) -> SourceSpec:
    live = options.pop("live", kind in _INHERENTLY_LIVE or kind == "synthetic")
    if kind == "synthetic":  # the spec says exactly which clip: seed, size, frames and fps are always there
        options = {**SYNTHETIC_DEFAULTS, **options}
    return SourceSpec(kind, location, options, live, uri)


def parse_sink(uri: str) -> SinkSpec:
    """Parse a sink URI (see the module docstring) into a SinkSpec; DpaError listing the accepted forms."""
    text = uri.strip()
    if not text:
        raise _bad_sink(uri, "empty")
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme == "null":
        if text.lower().rstrip("/") != "null:":
            raise _bad_sink(uri, "the null sink is just null://")
        return SinkSpec("null", "", {}, False, uri)
    if scheme == "display":
        parts = urlsplit(text)
        number = parts.netloc or "0"
        if not number.isdigit() or parts.path not in ("", "/") or parts.query:
            raise _bad_sink(uri, "a display is display://N")
        if number != "0":
            raise _bad_sink(uri, "only display://0 (the default display) is supported")
        return SinkSpec("display", number, {}, True, uri)
    if scheme == "rtsp":
        return _rtsp_sink(uri, text)
    if scheme == "file":
        parts = urlsplit(text)
        text = unquote(parts.netloc + parts.path) + ("/" if text.endswith("/") else "")
    elif scheme:
        raise _bad_sink(uri, f"unknown scheme '{scheme}://'")
    return _path_sink(uri, text)


def _rtsp_sink(uri: str, text: str) -> SinkSpec:
    parts = urlsplit(text)
    host, _, port = parts.netloc.rpartition(":") if ":" in parts.netloc else (parts.netloc, "", "")
    host = "0.0.0.0" if host in ("", "@") else host
    port = port or str(RTSP_SINK_PORT)
    mount = parts.path.rstrip("/")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad_sink(uri, f"bad port '{port}'")
    if not re.fullmatch(r"(/[\w.-]+)+", mount) or parts.query:
        raise _bad_sink(uri, "an RTSP output is rtsp://@:PORT/NAME")
    return SinkSpec("rtsp", mount, {"address": host, "port": int(port)}, True, uri)


def _path_sink(uri: str, text: str) -> SinkSpec:
    path = Path(text)
    suffix = path.suffix.lower()
    if "%" in path.name:
        if not re.fullmatch(r"[^%/]*%0?\d*d[^%/]*", path.name) or suffix not in SINK_IMAGE_SUFFIXES:
            raise _bad_sink(uri, "an image pattern is DIR/%05d.jpg or DIR/%05d.png (one %d)")
        return SinkSpec("folder", str(path.parent), {"pattern": path.name}, False, uri)
    if text.endswith("/") or path.is_dir() or suffix == "":
        return SinkSpec("folder", str(path), {"pattern": "%05d.jpg"}, False, uri)
    if suffix in VIDEO_SUFFIXES:
        return SinkSpec("file", str(path), {"muxer": VIDEO_SUFFIXES[suffix]}, False, uri)
    if suffix in SINK_IMAGE_SUFFIXES:
        raise _bad_sink(uri, "images go to a folder: DIR/ or DIR/%05d.jpg")
    raise _bad_sink(uri, f"unknown file type '{suffix}'")


# ----------------------------------------------------------------------------------------------------------
# gst-launch descriptions


def _quote(value: str) -> str:
    """A property value for a gst-launch description, quoted when it holds anything but plain path characters."""
    if re.fullmatch(r"[\w./:@+-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _framerate(fps: float) -> str:
    """fps as a GStreamer fraction: 30 -> "30/1", 29.97 -> "2997/100"."""
    if not fps > 0:
        raise DpaError(f"the frame rate must be positive, got {fps}")
    fraction = Fraction(fps).limit_denominator(1001)
    return f"{fraction.numerator}/{fraction.denominator}"


def _on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def source_description(spec: SourceSpec) -> str:
    """The gst-launch description of a source; it ends with `appsink name=dpa_sink` delivering RGB frames.

    Image folders are read with OpenCV, not GStreamer: DpaError for them.
    """
    options = spec.options
    if spec.kind == "folder":
        raise DpaError(f"{spec.uri}: image folders are read with OpenCV, not through a GStreamer pipeline")
    scale = True  # width/height/fps scale the decoded frames, except where the source produces them
    if spec.kind == "v4l2":
        head = f"v4l2src device={_quote(spec.location)}{_num_buffers(options)} ! decodebin"
    elif spec.kind == "csi":
        size = {key: options.get(key, value) for key, value in CSI_DEFAULTS.items()}
        head = (f"nvarguscamerasrc sensor-id={spec.location}{_num_buffers(options)} ! "
                f"video/x-raw(memory:NVMM),width={size['width']},height={size['height']},"
                f"framerate={_framerate(size['fps'])} ! nvvidconv ! video/x-raw,format=BGRx")
        scale = False
    elif spec.kind == "file":
        head = f"filesrc location={_quote(spec.location)} ! decodebin"
    elif spec.kind == "rtsp":
        latency = options.get("latency", RTSP_LATENCY_MS)
        head = f"rtspsrc location={_quote(spec.location)} latency={latency} ! application/x-rtp,media=video ! decodebin"
    elif spec.kind == "test":
        size = {key: options.get(key, value) for key, value in TEST_DEFAULTS.items()}
        head = (f"videotestsrc pattern={spec.location} is-live={str(spec.live).lower()}{_num_buffers(options)} ! "
                f"video/x-raw,width={size['width']},height={size['height']},framerate={_framerate(size['fps'])}")
        scale = False
    elif spec.kind == "synthetic":
        head = (f'appsrc name=dpa_frames caps="video/x-raw,format=RGB,width={options["size"]},'
                f'height={options["size"]},framerate={_framerate(options["fps"])}" format=time '
                f"is-live={str(spec.live).lower()} block=true")
        scale = "width" in options or "height" in options
    else:
        raise DpaError(f"unknown source kind '{spec.kind}'")
    caps = "video/x-raw,format=RGB"
    if scale:
        caps += "".join(f",{key}={options[key]}" for key in ("width", "height") if key in options)
    rate = ""
    if scale and "fps" in options and spec.kind != "synthetic":
        rate = "videorate ! "
        caps += f",framerate={_framerate(options['fps'])}"
    return f"{head} ! {rate}videoconvert ! videoscale ! {caps} ! {_appsink(spec)}"


def _num_buffers(options: dict) -> str:
    return f" num-buffers={options['frames']}" if "frames" in options else ""


def _appsink(spec: SourceSpec) -> str:
    """Live: keep only the newest frame (drop=true); a file played live is paced by the clock (sync=true), a live
    synthetic clip by its feeder.
    Not live: a short queue and backpressure, every frame."""
    if spec.live:  # synthetic clips are paced by their feeder thread
        sync = "false" if spec.kind in _INHERENTLY_LIVE or spec.kind == "synthetic" else "true"
        return f"appsink name=dpa_sink max-buffers=1 drop=true sync={sync} enable-last-sample=false"
    return f"appsink name=dpa_sink max-buffers={NON_LIVE_QUEUE} drop=false sync=false enable-last-sample=false"


def sink_description(spec: SinkSpec, width: int, height: int, fps: float) -> str:
    """The gst-launch description of a sink for width x height RGB frames at fps; it starts with
    `appsrc name=dpa_src`. Image folders are written with OpenCV, not GStreamer: DpaError for them."""
    head = (f'appsrc name=dpa_src caps="video/x-raw,format=RGB,width={width},height={height},'
            f'framerate={_framerate(fps)}" format=time is-live={str(spec.live).lower()} do-timestamp=false')
    if spec.kind == "null":
        return f"{head} ! fakesink sync=false"
    if spec.kind == "display":
        if _on_jetson():
            return f"{head} ! videoconvert ! video/x-raw,format=RGBA ! nvvidconv ! nv3dsink sync=false"
        return f"{head} ! videoconvert ! autovideosink sync=false"
    if spec.kind == "file":
        return (f"{head} ! videoconvert ! video/x-raw,format=I420 ! {_h264(fps)} ! h264parse ! "
                f"{_muxer(spec)} ! filesink location={_quote(spec.location)}")
    if spec.kind == "rtsp":
        return (f"{head} ! videoconvert ! video/x-raw,format=I420 ! "
                f"intervideosink channel={_rtsp_channel(spec)} sync=false")
    if spec.kind == "folder":
        raise DpaError(f"{spec.uri}: image folders are written with OpenCV, not through a GStreamer pipeline")
    raise DpaError(f"unknown sink kind '{spec.kind}'")


def _muxer(spec: SinkSpec) -> str:
    """The container muxer. MP4 is written as fragments (one a second) and rewritten as a plain MP4 at EOS:
    a run killed before EOS still leaves a file playable up to its last fragment."""
    muxer = spec.options["muxer"]
    if muxer != "mp4mux":
        return muxer
    return f"mp4mux fragment-duration={MP4_FRAGMENT_MS} fragment-mode=first-moov-then-finalise"


def _h264(fps: float) -> str:
    return f"x264enc tune=zerolatency speed-preset=veryfast key-int-max={max(1, round(fps))}"


def _rtsp_channel(spec: SinkSpec) -> str:
    return f"dpa-rtsp-{spec.options['port']}-{spec.location.strip('/').replace('/', '-')}"


def rtsp_media_description(spec: SinkSpec, width: int, height: int, fps: float) -> str:
    """The GstRtspServer media pipeline of an RTSP sink: the frames of `sink_description`'s intervideosink,
    H.264-encoded into RTP payloader `pay0`, in parentheses as RTSPMediaFactory.set_launch wants."""
    return (f"( intervideosrc channel={_rtsp_channel(spec)} ! "
            f"video/x-raw,format=I420,width={width},height={height},framerate={_framerate(fps)} ! "
            f"{_h264(fps)} ! rtph264pay name=pay0 pt=96 config-interval=-1 )")


# ----------------------------------------------------------------------------------------------------------
# GStreamer plumbing


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


def _rgb_buffer(Gst, image: np.ndarray, number: int, framerate: Fraction):
    """A Gst.Buffer of one uint8 (H, W, 3) RGB frame in GStreamer's default layout (rows padded to 4 bytes),
    stamped at number / fps seconds."""
    height, width = image.shape[:2]
    row = width * 3
    stride = (row + 3) // 4 * 4
    if stride != row:
        padded = np.zeros((height, stride), np.uint8)
        padded[:, :row] = image.reshape(height, row)
        image = padded
    buffer = Gst.Buffer.new_wrapped(np.ascontiguousarray(image).tobytes())
    buffer.pts = number * Gst.SECOND * framerate.denominator // framerate.numerator
    buffer.duration = (number + 1) * Gst.SECOND * framerate.denominator // framerate.numerator - buffer.pts
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


# ----------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Frame:
    """One frame from a VideoSource.

    image: uint8 (H, W, 3) RGB, contiguous; index: frame number at the source, 0-based, counting dropped ones;
    timestamp: seconds (the buffer's PTS; index / fps for image folders); name: the file stem for image folders,
    else f"{index:05d}".
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
            try:
                image = read_rgb(path)
            except DpaError as error:
                self.skipped += 1
                logger.warning("video source %s: skipping frame %d: %s", self.spec.uri, index, error)
                continue
            if "width" in options or "height" in options:
                size = (options.get("width", image.shape[1]), options.get("height", image.shape[0]))
                image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            return Frame(image, index, index / options.get("fps", FOLDER_FPS), path.stem)
        return None


class VideoSource:
    """Frames from a source URI (see the module docstring), as uint8 RGB `Frame`s.

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
        else:
            timestamp = index / self.fps if self.fps else 0.0
        return Frame(image, index, timestamp, f"{index:05d}")

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


# ----------------------------------------------------------------------------------------------------------
# Sinks


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
                    write_rgb(*item)
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
    """Writes uint8 RGB frames of a fixed size to a sink URI (see the module docstring).

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

    def write(self, image: np.ndarray, name: str | None = None) -> None:
        """Write one uint8 (H, W, 3) RGB frame. name: the file stem for image folders (default: the frame number
        in the folder's pattern); ignored by other sinks. DpaError when the output fails or stalls."""
        if self._closed or (self._pipeline is None and self._writer is None):
            raise DpaError(f"video output {self.uri} is not open; call open() or use it in a with-block")
        image = self._fit(image)
        if self._writer is not None:
            self._writer.put(self._image_path(name), image.copy())
        else:
            self._wait_for_room()
            Gst = self._pipeline.Gst
            result = self._appsrc.emit("push-buffer", _rgb_buffer(Gst, image, self.frames_written, self.framerate))
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
