"""Bad input (issue 13, guarantees 4 to 6): one line with what is wrong, before anything is written; damaged
frames and streams named and counted, never used silently; live recordings as long as the source."""

import json

import cv2
import numpy as np
import pytest
from fault_support import (
    assert_one_error_line,
    complete_masks,
    read_stats,
    run_dpa,
    video_frames,
    write_frames,
    write_video,
)
from gstreamer_support import GST_MISSING

needs_gstreamer = pytest.mark.skipif(GST_MISSING is not None, reason=str(GST_MISSING))


RUN = ("run", "test://ball", "null://", "--export", "X")


@pytest.mark.parametrize(("arguments", "fragment"), [
    ((*RUN, "--max-frames", "0"), "--max-frames: must be an integer from 1"),
    ((*RUN, "--max-frames", "-3"), "--max-frames: must be an integer"),
    ((*RUN, "--memory", "0"), "--memory: must be an integer from 1 to 64"),
    ((*RUN, "--memory", "-1"), "--memory: must be an integer from 1"),
    ((*RUN, "--stats-interval", "-1"), "--stats-interval: must be a number"),
    ((*RUN, "--horizon", "many"), "got 'many'"),
    (("info", "--size", "100000"), "--size: must be a multiple of 32 from 32 to 2048"),
    (("export", "--size", "100000", "--out", "X"), "--size: must be a multiple of 32"),
    (("train", "--out", "X", "--batch-size", "0"), "--batch-size: must be an integer from 1"),
    (("train", "--out", "X", "--lr", "0"), "--lr: must be a number > 0"),
    (("train", "--out", "X", "--lr", "nan"), "--lr: must be a number > 0"),
    (("bench", "--repeats", "0"), "--repeats: must be an integer from 1"),
])
def test_bad_numbers_get_one_line_with_the_range(arguments, fragment):
    assert_one_error_line(run_dpa(*arguments, timeout=60), fragment)


def test_version_and_unknown_commands():
    finished = run_dpa("--version", timeout=60)
    assert finished.code == 0 and finished.stdout.startswith("dpa ")
    assert_one_error_line(run_dpa("segment", timeout=60), "invalid choice: 'segment'")


@needs_gstreamer
def test_display_without_a_display_is_refused_in_one_line(tiny_export, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    stats = tmp_path / "stats.json"
    refused = run_dpa("run", "test://ball?frames=5", "display://0", "--export", str(tiny_export), "--stats-json",
                      str(stats))
    assert_one_error_line(refused, "display://0", "DISPLAY")


@needs_gstreamer
def test_a_truncated_jpeg_is_skipped_named_and_counted(tiny_export, tmp_path):
    frames = write_frames(tmp_path / "frames", 10, (160, 120))
    data = frames[4].read_bytes()
    frames[4].write_bytes(data[: len(data) // 2])
    masks, stats = tmp_path / "masks", tmp_path / "stats.json"
    finished = run_dpa("run", str(tmp_path / "frames"), "null://", "--export", str(tiny_export), "--masks",
                       str(masks), "--stats-json", str(stats), "--stats-interval", "0")
    assert finished.code == 0, finished.stderr[-3000:]
    assert "skipping frame 4" in finished.stderr and "00004.jpg" in finished.stderr
    summary = read_stats(stats)
    assert summary["skipped_frames"] == 1 and summary["frames"] == 9
    assert complete_masks(masks, (120, 160)) == 9 and not (masks / "00004.png").exists()


@needs_gstreamer
@pytest.mark.parametrize(("size", "fragment"), [((8, 8), "frames of 8x8 are outside 16 to 4096"),
                                                ((8000, 8000), "00000.png is 8000x8000, larger than 4096")])
def test_frame_sizes_the_pipeline_cannot_handle_are_refused_before_writing(size, fragment, tiny_export, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(2):
        cv2.imwrite(str(folder / f"{index:05d}.png"), np.zeros((size[1], size[0], 3), np.uint8))
    video = tmp_path / "out.mp4"
    refused = run_dpa("run", str(folder), str(video), "--export", str(tiny_export))
    assert_one_error_line(refused, fragment)
    assert not video.exists()


@needs_gstreamer
def test_a_resolution_change_is_caught_in_the_first_pass_with_a_hint(tiny_export, tmp_path):
    folder = tmp_path / "frames"
    write_frames(folder, 6, (160, 120))
    cv2.imwrite(str(folder / "00003.jpg"), np.zeros((240, 320, 3), np.uint8))
    masks = tmp_path / "masks"
    refused = run_dpa("run", str(folder), "null://", "--export", str(tiny_export), "--masks", str(masks))
    assert_one_error_line(refused, "frame size changes at frame 3", "--policy uniform")
    assert not masks.exists()  # nothing written, not even the folder
    uniform = run_dpa("run", str(folder), "null://", "--export", str(tiny_export), "--policy", "uniform")
    assert uniform.code == 0 and "frame size changed from 160x120 to 320x240" in uniform.stdout


@needs_gstreamer
def test_a_truncated_video_is_named_with_its_frame_index(tiny_export, tmp_path):
    video = write_video(tmp_path / "full.mkv", 90, container="matroskamux")
    data = video.read_bytes()
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    stats = tmp_path / "stats.json"
    finished = run_dpa("run", str(truncated), "null://", "--export", str(tiny_export), "--stats-json", str(stats),
                       "--policy", "uniform")
    assert finished.code == 0, finished.stderr[-3000:]
    summary = read_stats(stats)
    assert summary["frames"] < 90
    assert len(summary["source_warnings"]) == 1
    warning = summary["source_warnings"][0]
    assert f"frames end at frame {summary['frames']}" in warning and "truncated or damaged" in warning
    assert warning in finished.stderr


@needs_gstreamer
def test_a_live_recording_lasts_as_long_as_its_source(tiny_export, tmp_path):
    """A 3 s live source at 60 fps, faster than the loop: frames are dropped, yet the video lasts 3 s."""
    video, stats = tmp_path / "live.mp4", tmp_path / "stats.json"
    finished = run_dpa("run", "test://ball?width=640&height=480&fps=60&frames=180", str(video), "--export",
                       str(tiny_export), "--stats-json", str(stats), "--stats-interval", "0")
    assert finished.code == 0, finished.stderr[-3000:]
    summary = read_stats(stats)
    frames, seconds = video_frames(video)
    assert frames == summary["frames_written"]
    assert seconds == pytest.approx(3.0, abs=0.35), (seconds, summary["dropped"])


def test_the_end_summary_names_every_output(tiny_export, tmp_path):
    folder = tmp_path / "frames"
    write_frames(folder, 4, (160, 120))
    masks, stats = tmp_path / "masks", tmp_path / "stats.json"
    finished = run_dpa("run", str(folder), str(tmp_path / "overlay") + "/", "--export", str(tiny_export), "--masks",
                       str(masks), "--stats-json", str(stats), "--stats-interval", "0")
    assert finished.code == 0, finished.stderr[-3000:]
    for path in (tmp_path / "overlay", masks, stats):
        assert f"wrote {path}" in finished.stdout
    assert json.loads(stats.read_text())["outputs"] == [str(tmp_path / "overlay"), str(masks), str(stats)]
