"""gst-launch descriptions of sources and sinks: `source_description`, `sink_description`, `rtsp_media_description`."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from dpa.errors import DpaError
from dpa.runtime.video.uri import _INHERENTLY_LIVE, SinkSpec, SourceSpec

TEST_DEFAULTS = {"width": 640, "height": 480, "fps": 30.0}
CSI_DEFAULTS = {"width": 1280, "height": 720, "fps": 30.0}
RTSP_LATENCY_MS = 200
MP4_FRAGMENT_MS = 1000
NON_LIVE_QUEUE = 4  # frames an appsink (non-live) or an output appsrc may hold before backpressure


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
    """The container muxer. MP4 is written as fragmented MP4 (a header, then one self-contained fragment a
    second), so a run that ends without EOS (killed, disk full) leaves a file playable up to its last complete
    fragment; Matroska is written cluster by cluster and plays up to where it ends."""
    muxer = spec.options["muxer"]
    if muxer != "mp4mux":
        return muxer
    return f"mp4mux fragment-duration={MP4_FRAGMENT_MS}"


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
