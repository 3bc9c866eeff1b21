"""Outputs under faults (issue 13, guarantee 2): claimed before work, written whole, never shared, never stale,
and the first failed write is the one named."""

import os

import pytest
from fault_support import (
    Running,
    assert_one_error_line,
    complete_masks,
    mounted_tmpfs,
    read_stats,
    run_dpa,
    video_frames,
    write_frames,
    write_video,
)
from gstreamer_support import GST_MISSING

pytestmark = pytest.mark.skipif(GST_MISSING is not None, reason=str(GST_MISSING))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clips") / "clip.mp4", 300)


def _run(export, source, sink, *extra):
    return ("run", str(source), str(sink), "--export", str(export), "--stats-interval", "0", *extra)


def test_two_runs_never_write_the_same_output(clip, tiny_export, tmp_path):
    video, masks = tmp_path / "out.mp4", tmp_path / "masks"
    first = Running(tmp_path / "first", *_run(tiny_export, clip, video, "--masks", str(masks), "--stats-json",
                                              str(tmp_path / "first.json")))
    first.wait_for(lambda: masks.is_dir() and any(masks.glob("*.png")), "the first run's masks")
    second = run_dpa(*_run(tiny_export, clip, video, "--masks", str(masks), "--overwrite"))
    assert_one_error_line(second, "is being written by", f"pid {first.pid}")
    finished = first.finish()
    assert finished.code == 0, finished.stderr[-3000:]
    summary = read_stats(tmp_path / "first.json")
    assert video_frames(video)[0] == summary["frames_written"] == 300
    assert complete_masks(masks, (120, 160)) == 300


def test_existing_outputs_are_refused_unless_overwrite_which_clears_stale_masks(tiny_export, tmp_path):
    frames = tmp_path / "frames"
    write_frames(frames, 12, (160, 120))
    masks, stats = tmp_path / "masks", tmp_path / "stats.json"
    assert run_dpa(*_run(tiny_export, frames, "null://", "--masks", str(masks), "--stats-json", str(stats))).code == 0
    assert complete_masks(masks, (120, 160)) == 12
    shorter = tmp_path / "shorter"
    write_frames(shorter, 5, (96, 64), suffix=".png")
    for option, path in (("--masks", masks), ("--stats-json", stats)):
        others = ["--masks", str(tmp_path / "m2")] if option == "--stats-json" else []
        refused = run_dpa(*_run(tiny_export, shorter, "null://", option, str(path), *others))
        assert_one_error_line(refused, str(path), "exists already", "--overwrite")
    assert complete_masks(masks, (120, 160)) == 12  # nothing lost
    assert run_dpa(*_run(tiny_export, shorter, "null://", "--masks", str(masks), "--stats-json", str(stats),
                         "--overwrite")).code == 0
    assert complete_masks(masks, (64, 96)) == 5  # no stale mask of the first run
    video = tmp_path / "out.mkv"
    assert run_dpa(*_run(tiny_export, shorter, video)).code == 0
    assert_one_error_line(run_dpa(*_run(tiny_export, shorter, video)), "exists already")


def test_overwrite_never_empties_a_folder_dpa_did_not_write(tiny_export, tmp_path):
    frames = tmp_path / "frames"
    write_frames(frames, 3, (160, 120))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    refused = run_dpa(*_run(tiny_export, frames, "null://", "--masks", str(precious), "--overwrite"))
    assert_one_error_line(refused, "dpa did not write")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_an_unwritable_output_fails_before_any_work(clip, tiny_export, tmp_path):
    locked = tmp_path / "read-only"
    with mounted_tmpfs(locked, "1m", read_only=True):
        video = tmp_path / "out.mp4"
        refused = run_dpa(*_run(tiny_export, clip, video, "--stats-json", str(locked / "stats.json")))
        assert_one_error_line(refused, str(locked / "stats.json"), "Read-only file system")
        assert not video.exists()
        assert "frames in" not in refused.stdout  # no frame was processed


def test_a_full_disk_names_the_first_failed_write_and_keeps_every_written_file_whole(clip, tiny_export, tmp_path):
    full = tmp_path / "full"
    with mounted_tmpfs(full, "300k"):
        stats = tmp_path / "stats.json"
        finished = run_dpa(*_run(tiny_export, clip, full / "out.mp4", "--masks", str(full / "masks"), "--stats-json",
                                 str(stats)))
        line = assert_one_error_line(finished, "No space left on")
        summary = read_stats(stats)
        assert summary["error"] and "No space left on" in summary["error"] and summary["error"] in line
        masks = complete_masks(full / "masks", (120, 160))  # every mask on disk is whole, no temporary file left
        assert masks == summary["masks_written"] <= summary["frames_written"] < 300
        assert not [name for name in os.listdir(full) if ".tmp" in name]
        video = full / "out.mp4"
        if video.stat().st_size:  # it plays up to its last complete fragment that reached the disk
            assert video_frames(video)[0] <= summary["frames_written"]


def test_export_over_an_export_with_variants_removes_them(tiny_export_copy, tmp_path):
    calibrated = run_dpa("calibrate", str(tiny_export_copy), "--frames", "synthetic:1", "--precisions", "fp16")
    assert calibrated.code == 0, calibrated.stderr[-3000:]
    assert (tiny_export_copy / "fp16" / "manifest.json").is_file()
    assert_one_error_line(run_dpa("export", "--checkpoint", "tiny", "--out", str(tiny_export_copy)), "exists already")
    assert (tiny_export_copy / "fp16" / "manifest.json").is_file()  # refused: nothing lost
    assert run_dpa("export", "--config", "tiny", "--out", str(tiny_export_copy), "--overwrite").code == 0
    assert not (tiny_export_copy / "fp16").exists()
    refused = run_dpa("run", "test://ball?frames=3", "null://", "--export", str(tiny_export_copy), "--precision",
                      "fp16", "--backend", "onnxruntime")
    assert_one_error_line(refused, "no fp16 variant")


def test_every_command_refuses_an_unwritable_output_before_any_work(tiny_export, tmp_path):
    locked = tmp_path / "read-only"
    with mounted_tmpfs(locked, "1m", read_only=True):
        commands = [
            ("export", "--checkpoint", "tiny", "--out", str(locked / "export")),
            ("train", "--config", "tiny", "--data", str(tmp_path), "--out", str(locked / "run")),
            ("eval", "--pred", str(tmp_path), "--gt", str(tmp_path), "--json", str(locked / "eval.json")),
            ("check", str(tiny_export), "--json", str(locked / "check.json")),
            ("calibrate", str(tiny_export), "--frames", "synthetic:1", "--out", str(locked)),
            ("compare", "--export", str(tiny_export), "--clips", "synthetic:1", "--out", str(locked / "compare")),
            ("bench", "--export", str(tiny_export), "--json", str(locked / "bench.json")),
            ("synth", "--out", str(locked)),
            ("flow", "--data", str(tmp_path), "--layout", "images", "--out", str(locked / "flow")),
            ("demo", "--out", str(locked / "demo")),
            ("round-weights", "--checkpoint", "tiny", "--out", str(locked / "grid.pt")),
        ]
        for command in commands:
            assert_one_error_line(run_dpa(*command, timeout=120), str(locked), "Read-only file system")
