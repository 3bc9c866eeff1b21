"""Source and sink URIs: `parse_source`/`parse_sink` turn one string into a `SourceSpec`/`SinkSpec`.

The accepted forms and their options are documented in the package docstring (`dpa.runtime.video`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from dpa.errors import DpaError

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
SYNTHETIC_DEFAULTS = {"size": 128, "frames": 300, "fps": 30.0, "seed": 0}
RTSP_SINK_PORT = 8554
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
    """Parse a source URI (see the `dpa.runtime.video` docstring) into a SourceSpec; DpaError listing the
    accepted forms."""
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
    """Parse a sink URI (see the `dpa.runtime.video` docstring) into a SinkSpec; DpaError listing the
    accepted forms."""
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

