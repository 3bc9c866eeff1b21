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

Submodules: `uri` parses URIs into specs; `pipelines` turns specs into gst-launch descriptions; `gst` loads
GStreamer (PyGObject) and wraps a pipeline and its bus; `source` reads frames (`VideoSource`); `sink` writes
them (`VideoOutput`). Everything public is importable from this package.
"""

from dpa.runtime.video.gst import GSTREAMER_APT_PACKAGES, POLL_S
from dpa.runtime.video.pipelines import (
    CSI_DEFAULTS,
    MP4_FRAGMENT_MS,
    NON_LIVE_QUEUE,
    RTSP_LATENCY_MS,
    TEST_DEFAULTS,
    rtsp_media_description,
    sink_description,
    source_description,
)
from dpa.runtime.video.sink import VideoOutput
from dpa.runtime.video.source import FOLDER_FPS, Frame, VideoSource, stream_frame_name
from dpa.runtime.video.uri import (
    RTSP_SINK_PORT,
    SINK_FORMS,
    SINK_IMAGE_SUFFIXES,
    SOURCE_FORMS,
    SYNTHETIC_DEFAULTS,
    TEST_PATTERNS,
    VIDEO_SUFFIXES,
    SinkSpec,
    SourceSpec,
    parse_sink,
    parse_source,
)

__all__ = [
    "CSI_DEFAULTS",
    "FOLDER_FPS",
    "GSTREAMER_APT_PACKAGES",
    "MP4_FRAGMENT_MS",
    "NON_LIVE_QUEUE",
    "POLL_S",
    "RTSP_LATENCY_MS",
    "RTSP_SINK_PORT",
    "SINK_FORMS",
    "SINK_IMAGE_SUFFIXES",
    "SOURCE_FORMS",
    "SYNTHETIC_DEFAULTS",
    "TEST_DEFAULTS",
    "TEST_PATTERNS",
    "VIDEO_SUFFIXES",
    "Frame",
    "SinkSpec",
    "SourceSpec",
    "VideoOutput",
    "VideoSource",
    "stream_frame_name",
    "parse_sink",
    "parse_source",
    "rtsp_media_description",
    "sink_description",
    "source_description",
]
