"""Video I/O by URI: exact gst-launch descriptions, and real GStreamer round trips, drops, faults, caps changes."""

import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from gstreamer_support import (
    corrupt_fragmented_mp4,
    count_frames,
    count_frames_until_error,
    needs,
    read_all,
    run_to_eos,
)

from dpa.errors import DpaError
from dpa.runtime.video import (
    SinkSpec,
    SourceSpec,
    VideoOutput,
    VideoSource,
    gst,
    parse_sink,
    parse_source,
    pipelines,
    rtsp_media_description,
    sink_description,
    source_description,
)

LIVE_SINK = "appsink name=dpa_sink max-buffers=1 drop=true sync=false enable-last-sample=false"
FILE_SINK = "appsink name=dpa_sink max-buffers=4 drop=false sync=false enable-last-sample=false"
RGB_TAIL = "videoconvert ! videoscale ! video/x-raw,format=RGB"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


# ----------------------------------------------------------------------------------------------------------
# URI parsing and descriptions (no GStreamer needed)


@pytest.mark.parametrize("uri, expected", [
    ("/dev/video0", f"v4l2src device=/dev/video0 ! decodebin ! {RGB_TAIL} ! {LIVE_SINK}"),
    ("v4l2:///dev/video1?width=640&height=480&fps=15&frames=100",
     "v4l2src device=/dev/video1 num-buffers=100 ! decodebin ! videorate ! videoconvert ! videoscale ! "
     f"video/x-raw,format=RGB,width=640,height=480,framerate=15/1 ! {LIVE_SINK}"),
    ("csi://0", "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! "
                f"nvvidconv ! video/x-raw,format=BGRx ! {RGB_TAIL} ! {LIVE_SINK}"),
    ("/data/clip.mp4", f"filesrc location=/data/clip.mp4 ! decodebin ! {RGB_TAIL} ! {FILE_SINK}"),
    ("file:///data/my%20clip.mkv?width=320&height=240&frames=10",
     f'filesrc location="/data/my clip.mkv" ! decodebin ! {RGB_TAIL},width=320,height=240 ! {FILE_SINK}'),
    ("/data/clip.mp4?live=1",
     f"filesrc location=/data/clip.mp4 ! decodebin ! {RGB_TAIL} ! "
     "appsink name=dpa_sink max-buffers=1 drop=true sync=true enable-last-sample=false"),
    ("rtsp://cam.local:554/stream?channel=2&latency=100",
     'rtspsrc location="rtsp://cam.local:554/stream?channel=2" latency=100 ! application/x-rtp,media=video ! '
     f"decodebin ! {RGB_TAIL} ! {LIVE_SINK}"),
    ("rtspt://10.0.0.2/live", "rtspsrc location=rtspt://10.0.0.2/live latency=200 ! application/x-rtp,media=video ! "
                              f"decodebin ! {RGB_TAIL} ! {LIVE_SINK}"),
    ("test://ball", "videotestsrc pattern=ball is-live=true ! video/x-raw,width=640,height=480,framerate=30/1 ! "
                    f"{RGB_TAIL} ! {LIVE_SINK}"),
    ("test://smpte?width=320&height=240&fps=15&frames=5&live=0",
     "videotestsrc pattern=smpte is-live=false num-buffers=5 ! video/x-raw,width=320,height=240,framerate=15/1 ! "
     f"{RGB_TAIL} ! {FILE_SINK}"),
    ("test://synthetic", 'appsrc name=dpa_frames caps="video/x-raw,format=RGB,width=128,height=128,framerate=30/1" '
                         f"format=time is-live=true block=true ! {RGB_TAIL} ! {LIVE_SINK}"),
    ("test://synthetic?seed=3&size=96&frames=20&fps=10&live=0",
     'appsrc name=dpa_frames caps="video/x-raw,format=RGB,width=96,height=96,framerate=10/1" '
     f"format=time is-live=false block=true ! {RGB_TAIL} ! {FILE_SINK}"),
])
def test_source_descriptions(uri, expected):
    assert source_description(parse_source(uri)) == expected


def test_source_specs():
    assert parse_source("/dev/video0") == SourceSpec("v4l2", "/dev/video0", {}, True, "/dev/video0")
    assert parse_source("csi://1?fps=60") == SourceSpec("csi", "1", {"fps": 60.0}, True, "csi://1?fps=60")
    assert parse_source("test://ball?live=0&frames=7").options == {"frames": 7}
    spec = parse_source("test://synthetic?seed=-4&size=64")
    assert (spec.kind, spec.options, spec.live) == ("synthetic", {"seed": -4, "size": 64, "frames": 300, "fps": 30},
                                                    True)
    assert parse_source("rtsp://user:pw@cam/s?fps=5").location == "rtsp://user:pw@cam/s"
    assert parse_source("clip.mp4").live is False


def test_image_folder_source_spec(tmp_path):
    spec = parse_source(f"{tmp_path}?frames=3")
    assert (spec.kind, spec.location, spec.options, spec.live) == ("folder", str(tmp_path), {"frames": 3}, False)
    assert parse_source(f"file://{tmp_path}").kind == "folder"
    with pytest.raises(DpaError, match="OpenCV"):
        source_description(spec)


def test_sink_descriptions(monkeypatch):
    head = ('appsrc name=dpa_src caps="video/x-raw,format=RGB,width=320,height=240,framerate=25/1" format=time '
            "is-live={live} do-timestamp=false")
    h264 = "videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency speed-preset=veryfast key-int-max=25"

    def describe(uri):
        return sink_description(parse_sink(uri), 320, 240, 25)

    assert describe("null://") == head.format(live="false") + " ! fakesink sync=false"
    assert describe("/out/run.mp4") == (head.format(live="false") + f" ! {h264} ! h264parse ! "
                                        "mp4mux fragment-duration=1000 ! "
                                        "filesink location=/out/run.mp4")
    assert describe("file:///out/run.mkv") == (head.format(live="false") + f" ! {h264} ! h264parse ! matroskamux ! "
                                               "filesink location=/out/run.mkv")
    assert describe("run.avi").endswith("! h264parse ! avimux ! filesink location=run.avi")
    assert describe("rtsp://@:8554/live") == (head.format(live="true") + " ! videoconvert ! "
                                              "video/x-raw,format=I420 ! intervideosink "
                                              "channel=dpa-rtsp-8554-live sync=false")
    monkeypatch.setattr(pipelines, "_on_jetson", lambda: False)
    assert describe("display://0") == head.format(live="true") + " ! videoconvert ! autovideosink sync=false"
    monkeypatch.setattr(pipelines, "_on_jetson", lambda: True)
    assert describe("display://0") == (head.format(live="true") + " ! videoconvert ! video/x-raw,format=RGBA ! "
                                       "nvvidconv ! nv3dsink sync=false")
    assert sink_description(parse_sink("null://"), 64, 48, 29.97).startswith(
        'appsrc name=dpa_src caps="video/x-raw,format=RGB,width=64,height=48,framerate=2997/100"')


def test_sink_specs_and_rtsp_media():
    assert parse_sink("out/") == SinkSpec("folder", "out", {"pattern": "%05d.jpg"}, False, "out/")
    assert parse_sink("out/masks/%05d.png").options == {"pattern": "%05d.png"}
    assert parse_sink("out/masks/%05d.png").location == "out/masks"
    assert parse_sink("rtsp://@:9000/cam/front") == SinkSpec(
        "rtsp", "/cam/front", {"address": "0.0.0.0", "port": 9000}, True, "rtsp://@:9000/cam/front")
    assert parse_sink("rtsp://127.0.0.1:8600/x").options == {"address": "127.0.0.1", "port": 8600}
    assert parse_sink("display://").location == "0"
    assert rtsp_media_description(parse_sink("rtsp://@:8554/live"), 320, 240, 30) == (
        "( intervideosrc channel=dpa-rtsp-8554-live ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 ! "
        "x264enc tune=zerolatency speed-preset=veryfast key-int-max=30 ! rtph264pay name=pay0 pt=96 "
        "config-interval=-1 )")
    with pytest.raises(DpaError, match="OpenCV"):
        sink_description(parse_sink("out/"), 64, 64, 30)


@pytest.mark.parametrize("uri, reason", [
    ("", "empty"),
    ("bogus://x", "unknown scheme"),
    ("test://nopattern", "unknown test pattern"),
    ("test://ball?colour=red", "unknown option 'colour'"),
    ("test://ball?width=abc", "not a number"),
    ("test://ball?fps=0", "must be positive"),
    ("test://ball?live=yes", "not a 0 or 1"),
    ("csi://a", "csi://N"),
    ("v4l2://camera", "v4l2:///dev/videoN"),
    ("rtsp:///path", "needs a host"),
])
def test_bad_source_uris(uri, reason):
    with pytest.raises(DpaError, match=reason) as error:
        parse_source(uri)
    assert "accepted: /dev/videoN" in str(error.value) and "test://synthetic" in str(error.value)


@pytest.mark.parametrize("uri, reason", [
    ("", "empty"),
    ("out.txt", "unknown file type"),
    ("frame.jpg", "images go to a folder"),
    ("out/%d%d.jpg", "one %d"),
    ("display://1", "only display://0"),
    ("rtsp://@:99999/x", "bad port"),
    ("rtsp://@:8554", "rtsp://@:PORT/NAME"),
    ("null://x", "just null://"),
    ("ftp://host/x.mp4", "unknown scheme"),
])
def test_bad_sink_uris(uri, reason):
    with pytest.raises(DpaError, match=reason) as error:
        parse_sink(uri)
    assert "accepted: display://0" in str(error.value)


def test_missing_pygobject_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # import gi now raises ImportError
    with pytest.raises(DpaError, match="PyGObject") as error:
        VideoSource("test://ball").open()
    assert "gir1.2-gstreamer-1.0" in str(error.value) and "scripts/setup.sh" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# Image folders (OpenCV, no GStreamer)


def test_image_folder_source_is_pixel_exact_in_natural_order(tmp_path):
    from dpa.export.frames import load_clip

    images = random_frames(4, 24, 32, seed=1)
    names = ["frame10", "frame2", "frame1", "frame33"]
    for name, image in zip(names, images, strict=True):
        suffix = ".jpg" if name == "frame33" else ".png"
        cv2.imwrite(str(tmp_path / f"{name}{suffix}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "notes.txt").write_text("not an image")
    with VideoSource(str(tmp_path)) as source:
        frames = read_all(source)
        assert source.read() is None
    assert [frame.name for frame in frames] == ["frame1", "frame2", "frame10", "frame33"]
    assert [frame.index for frame in frames] == [0, 1, 2, 3]
    assert [frame.timestamp for frame in frames] == [0, 1 / 30, 2 / 30, 3 / 30]
    for frame in frames:
        expected = cv2.cvtColor(cv2.imread(str(next(tmp_path.glob(frame.name + ".*")))), cv2.COLOR_BGR2RGB)
        assert frame.image.dtype == np.uint8 and frame.image.flags.c_contiguous
        np.testing.assert_array_equal(frame.image, expected)
    clip = load_clip(tmp_path)  # offline inference's reader: same order, same pixels
    for frame, offline in zip(frames, clip.frames, strict=True):
        np.testing.assert_array_equal(frame.image, offline)
    assert (source.produced, source.delivered, source.dropped, source.live) == (4, 4, 0, False)
    with VideoSource(f"{tmp_path}?frames=2") as source:
        assert [frame.name for frame in read_all(source)] == ["frame1", "frame2"]


def test_image_folder_source_skips_corrupt_frames(tmp_path):
    for index, image in enumerate(random_frames(3, 8, 8)):
        cv2.imwrite(str(tmp_path / f"{index:05d}.png"), image)
    (tmp_path / "00001.png").write_bytes(b"not a png")
    with VideoSource(str(tmp_path)) as source:
        assert [frame.index for frame in read_all(source)] == [0, 2]
        assert (source.skipped, source.delivered) == (1, 2)


def test_image_folder_sink_writes_named_and_numbered_files(tmp_path):
    images = random_frames(5, 30, 40, seed=2)
    with VideoOutput(str(tmp_path / "named") + "/", 40, 30, 25) as output:
        for index, image in enumerate(images[:3]):
            output.write(image, name=f"clip_{index}")
        output.write(images[3])  # no name: the pattern with the frame number
    assert output.frames_written == 4
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == [
        "00003.jpg", "clip_0.jpg", "clip_1.jpg", "clip_2.jpg"]
    with VideoOutput(str(tmp_path / "masks" / "%03d.png"), 40, 30, 25) as output:
        for image in images:
            output.write(image)
        output.write(np.zeros((60, 80, 3), np.uint8))  # another size: resized to 40x30
    files = sorted((tmp_path / "masks").iterdir())
    assert [p.name for p in files] == [f"{index:03d}.png" for index in range(6)]
    for path, image in zip(files, images, strict=False):  # PNG is lossless: exactly what was written
        np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), image)
    assert cv2.imread(str(files[5])).shape == (30, 40, 3)


def test_unwritable_outputs_fail_before_starting(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for uri in (f"{blocker}/frames/", f"{blocker}/out.mp4"):
        with pytest.raises(DpaError, match="cannot write"):
            VideoOutput(uri, 64, 48, 30).open()


# ----------------------------------------------------------------------------------------------------------
# Through GStreamer


@needs("videotestsrc", "appsink")
def test_test_pattern_delivers_exactly_the_requested_frames():
    with VideoSource("test://ball?width=160&height=120&fps=30&frames=40&live=0") as source:
        frames = read_all(source)
        assert source.read() is None
        assert (source.width, source.height, source.fps) == (160, 120, 30.0)
    assert len(frames) == 40
    assert all(frame.image.shape == (120, 160, 3) and frame.image.dtype == np.uint8 for frame in frames)
    assert [frame.index for frame in frames] == list(range(40))
    assert [frame.name for frame in frames[:2]] == ["00000", "00001"]
    np.testing.assert_allclose([frame.timestamp for frame in frames], np.arange(40) / 30, atol=1e-9)
    assert (source.produced, source.delivered, source.dropped) == (40, 40, 0)


@needs("appsrc", "appsink")
def test_synthetic_source_is_lossless():
    from dpa.synthetic import generate_clip

    expected, _ = generate_clip(np.random.default_rng(3), 12, 66)  # 66 px: rows of 198 bytes, padded to 200
    with VideoSource("test://synthetic?seed=3&frames=12&size=66&live=0") as source:
        frames = read_all(source)
    assert len(frames) == 12
    for frame, image in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(frame.image, image)


@pytest.mark.slow
@needs("videotestsrc", "appsink")
def test_live_source_drops_instead_of_queueing():
    with VideoSource("test://ball?width=160&height=120&fps=100&frames=200") as source:
        assert source.live
        indices = []
        while (frame := source.read()) is not None:
            indices.append(frame.index)
            time.sleep(0.03)  # a consumer three times slower than the camera
        produced, delivered, dropped = source.produced, source.delivered, source.dropped
    assert produced == 200
    assert dropped > 0 and delivered + dropped == produced
    assert delivered <= produced // 2
    gaps = np.diff(indices)
    assert len(indices) == delivered and gaps.min() >= 1 and indices[-1] <= 199
    assert np.median(gaps) >= 2  # each frame read is the newest one, not the next one in a queue


@needs("appsrc", "appsink")
def test_live_synthetic_source_is_paced_and_drops():
    # Paced at 100 fps, a consumer taking 30 ms per frame reads about a third of the frames; unpaced, the 60
    # frames would all arrive at once and it would see only the first and the last.
    with VideoSource("test://synthetic?frames=60&fps=100&size=32") as source:
        while source.read() is not None:
            time.sleep(0.03)
        assert source.produced == 60
        assert 6 <= source.delivered <= 40 and source.dropped == 60 - source.delivered


@needs("x264enc", "mp4mux", "matroskamux", "avimux", "decodebin", "appsrc", "appsink")
@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_video_file_round_trip(tmp_path, suffix):
    path = str(tmp_path / f"out{suffix}")
    with VideoOutput(path, 160, 120, 30) as output:
        for image in random_frames(30, 120, 160):
            output.write(image)
    assert output.frames_written == 30
    with VideoSource(path) as source:
        frames = read_all(source)
        assert (source.width, source.height, source.fps, source.dropped) == (160, 120, 30.0, 0)
    assert len(frames) == 30 and all(frame.image.shape == (120, 160, 3) for frame in frames)


@needs("x264enc", "matroskamux", "decodebin", "appsrc", "appsink")
def test_video_output_resizes_frames_of_another_size(tmp_path, caplog):
    path = str(tmp_path / "resized.mkv")
    with VideoOutput(path, 64, 48, 30) as output:
        for _ in range(3):
            output.write(np.full((100, 90, 3), 200, np.uint8))
    assert sum("resized to 64x48" in record.getMessage() for record in caplog.records) == 1
    with VideoSource(path) as source:
        frames = read_all(source)
    assert [frame.image.shape for frame in frames] == [(48, 64, 3)] * 3
    assert abs(float(frames[1].image.mean()) - 200) < 8  # H.264 is lossy, but a flat frame stays flat


@needs("appsrc", "fakesink")
def test_null_sink_accepts_frames():
    with VideoOutput("null://", 64, 48, 30) as output:
        for image in random_frames(50, 48, 64):
            output.write(image)
    assert output.frames_written == 50
    output.close()  # idempotent
    with pytest.raises(DpaError, match="not open"):
        output.write(np.zeros((48, 64, 3), np.uint8))


def test_missing_video_file_is_a_clear_error(tmp_path):
    with pytest.raises(DpaError, match="not found"):
        VideoSource(str(tmp_path / "missing.mp4")).open()


@needs("x264enc", "mp4mux", "qtdemux", "matroskamux", "appsrc", "appsink")
def test_source_error_mid_run_keeps_the_output_playable(tmp_path):
    """A recording corrupted in the middle (a fragmented MP4, 4 fragments, whose third fragment header is broken):
    qtdemux posts a real ERROR once it reaches it; read() raises it, and the output written so far stays
    playable."""
    corrupt = corrupt_fragmented_mp4(tmp_path / "corrupt.mp4")
    # Frames of the intact fragments, then the error; frames still inside the decoder when it stops are lost.
    assert 30 <= count_frames_until_error(str(corrupt)) <= 60

    result = tmp_path / "result.mkv"
    output = VideoOutput(str(result), 160, 120, 30).open()
    try:
        with pytest.raises(DpaError) as error, VideoSource(str(corrupt)) as source:
            while (frame := source.read()) is not None:
                output.write(frame.image)
    finally:
        output.close()
    message = str(error.value)
    assert str(corrupt) in message and "failed" in message and "\n" not in message
    assert "no frame" not in message  # GStreamer's error, not a timeout
    assert 30 <= output.frames_written <= 60
    assert count_frames(str(result)) == output.frames_written


@needs("x264enc", "mpegtsmux", "tsdemux", "decodebin", "appsink")
def test_caps_change_mid_stream_delivers_the_new_size(tmp_path):
    """Two MPEG-TS recordings of different sizes, concatenated (as a broadcast stream switching resolution)."""
    parts = []
    for width, height in ((160, 120), (96, 64)):
        part = tmp_path / f"{width}.ts"
        run_to_eos(f"videotestsrc num-buffers=15 ! video/x-raw,width={width},height={height},framerate=30/1 ! "
                   "videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency ! h264parse ! mpegtsmux ! "
                   f"filesink location={part}")
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    with VideoSource(str(joined)) as source:
        shapes = [frame.image.shape for frame in read_all(source)]
        assert (source.width, source.height) == (96, 64)
    assert shapes == [(120, 160, 3)] * 15 + [(64, 96, 3)] * 15


@needs("rtspsrc")
def test_unreachable_rtsp_source_is_a_clear_error():
    uri = f"rtspt://127.0.0.1:{free_port()}/nothing"
    with VideoSource(uri) as source, pytest.raises(DpaError, match=f"video source {uri} failed"):
        source.read(timeout_s=10)


def skip_without_rtsp_server() -> None:
    try:
        gst._rtsp_server_module()
    except DpaError as error:
        pytest.skip(str(error))


@needs("intervideosink")
def test_rtsp_sink_on_a_busy_port_is_a_clear_error():
    skip_without_rtsp_server()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        uri = f"rtsp://@:{busy.getsockname()[1]}/cam"
        with pytest.raises(DpaError, match="cannot listen on 0.0.0.0"):
            VideoOutput(uri, 64, 48, 30).open()


@pytest.mark.slow
@needs("x264enc", "intervideosink", "intervideosrc", "rtph264pay", "rtspsrc", "avdec_h264")
def test_rtsp_sink_serves_frames_to_an_rtsp_source():
    skip_without_rtsp_server()
    port = free_port()
    stop = threading.Event()
    output = VideoOutput(f"rtsp://@:{port}/cam", 160, 120, 30).open()

    def feed():
        while not stop.is_set():
            output.write(np.full((120, 160, 3), 128, np.uint8))
            time.sleep(1 / 30)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with VideoSource(f"rtspt://127.0.0.1:{port}/cam?latency=0") as source:
            frames = [source.read(timeout_s=10) for _ in range(15)]
    finally:
        stop.set()
        feeder.join(timeout=5)
        output.close()
    assert all(frame is not None and frame.image.shape == (120, 160, 3) for frame in frames)
    assert [frame.index for frame in frames] == sorted({frame.index for frame in frames})
    assert abs(float(frames[-1].image.mean()) - 128) < 4
    assert output.frames_written >= 15


@needs("videotestsrc")
def test_cpp_exceptions_still_work_after_gstreamer_loads():
    """Debian's GStreamer brings libunwind into the global symbol scope; without the runtime's guard, the first C++
    exception in onnx (or torch) afterwards aborts the process (rc 134) instead of raising."""
    code = (
        "from dpa.runtime.video.gst import _gst\n"
        "_gst()\n"
        "import onnx\n"
        "from onnx import TensorProto, helper\n"
        "inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [s]) for n, s in (('a', 2), ('b', 3))]\n"
        "graph = helper.make_graph([helper.make_node('Add', ['a', 'b'], ['c'])], 'g', inputs,\n"
        "                          [helper.make_tensor_value_info('c', TensorProto.FLOAT, None)])\n"
        "try:\n"
        "    onnx.shape_inference.infer_shapes(helper.make_model(graph), strict_mode=True)\n"
        "except onnx.shape_inference.InferenceError:\n"
        "    print('raised')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "raised"
