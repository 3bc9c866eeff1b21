"""GStreamer helpers shared by the runtime tests: availability checks, fixtures made with real pipelines."""

import struct
from pathlib import Path

import pytest

from dpa.errors import DpaError
from dpa.runtime.video import VideoSource
from dpa.runtime.video.gst import _gst


def _gstreamer():
    """(Gst, None) or (None, why GStreamer cannot be used here); through the runtime's own loader."""
    try:
        return _gst(), None
    except DpaError as error:
        return None, str(error)


Gst, GST_MISSING = _gstreamer()


def needs(*elements: str):
    """Skip unless GStreamer and these elements are present."""
    if Gst is None:
        return pytest.mark.skipif(True, reason=GST_MISSING)
    missing = [name for name in elements if Gst.ElementFactory.find(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"GStreamer elements missing: {', '.join(missing)}")


def read_all(source: VideoSource, limit: int = 10_000) -> list:
    frames = []
    while (frame := source.read()) is not None and len(frames) < limit:
        frames.append(frame)
    return frames


def count_frames(uri: str) -> int:
    with VideoSource(uri) as source:
        return len(read_all(source))


def count_frames_until_error(uri: str) -> int:
    frames = 0
    with pytest.raises(DpaError), VideoSource(uri) as source:
        while source.read() is not None:
            frames += 1
    return frames


def run_to_eos(description: str, timeout_s: float = 30.0) -> None:
    """Run a gst-launch description to EOS (test fixtures), failing on an error or after timeout_s."""
    pipeline = Gst.parse_launch(description)
    pipeline.set_state(Gst.State.PLAYING)
    try:
        message = pipeline.get_bus().timed_pop_filtered(int(timeout_s * Gst.SECOND),
                                                        Gst.MessageType.EOS | Gst.MessageType.ERROR)
        assert message is not None and message.type == Gst.MessageType.EOS, message and message.parse_error()
    finally:
        pipeline.set_state(Gst.State.NULL)


def corrupt_fragmented_mp4(path: Path) -> Path:
    """A real mid-stream fault: a 120-frame fragmented MP4 (4 fragments of 1 s, 160x120) whose third fragment
    header claims a size past the end of the file. qtdemux plays the first fragments, then posts an ERROR
    ("atom has bogus size"); truncated or noisy files only end the stream early."""
    run_to_eos("videotestsrc pattern=ball num-buffers=120 ! video/x-raw,width=160,height=120,framerate=30/1 ! "
               "videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency key-int-max=30 ! h264parse ! "
               f"mp4mux fragment-duration=1000 ! filesink location={path}")
    data = bytearray(path.read_bytes())
    fragments = [index - 4 for index in range(len(data)) if data[index:index + 4] == b"moof"]
    assert len(fragments) == 4, fragments
    data[fragments[2]:fragments[2] + 4] = struct.pack(">I", 0xFFFFFFF0)  # the box size runs past the file
    path.write_bytes(bytes(data))
    return path
