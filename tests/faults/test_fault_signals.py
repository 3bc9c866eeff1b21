"""Signals sent to real `dpa` processes in every phase: each ends cleanly with 128 + the signal number, outputs
finalised and the statistics saying so (issue 13, guarantee 1)."""

import signal

import pytest
import torch
from fault_support import (
    Running,
    assert_one_error_line,
    assert_stopped,
    complete_masks,
    read_stats,
    run_dpa,
    video_frames,
    write_video,
)
from gstreamer_support import GST_MISSING

needs_gstreamer = pytest.mark.skipif(GST_MISSING is not None, reason=str(GST_MISSING))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """600 frames (20 s at 30 fps) of 160x120: a run over it lasts several seconds."""
    if GST_MISSING is not None:
        pytest.skip(GST_MISSING)
    return write_video(tmp_path_factory.mktemp("clips") / "long.mp4", 600)


@needs_gstreamer
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_in_the_main_loop_finalises_video_masks_and_stats(signum, long_clip, tiny_export, tmp_path):
    video, masks, stats = tmp_path / "out.mp4", tmp_path / "masks", tmp_path / "stats.json"
    run = Running(tmp_path / "log", "run", str(long_clip), str(video), "--export", str(tiny_export), "--masks",
                  str(masks), "--stats-json", str(stats), "--stats-interval", "0")
    run.wait_for(lambda: masks.is_dir() and len(list(masks.glob("*.png"))) >= 5, "five masks")
    finished = run.stop(signum)
    assert_stopped(finished, signum)
    summary = read_stats(stats)
    assert summary["interrupted"] is True and summary["signal"] == signal.Signals(signum).name
    assert 5 <= summary["frames_written"] < 600
    assert video_frames(video)[0] == summary["frames_written"]
    assert complete_masks(masks, (120, 160)) == summary["masks_written"] == summary["frames_written"]


@needs_gstreamer
def test_a_killed_run_leaves_a_playable_video_and_whole_masks(long_clip, tiny_export, tmp_path):
    """SIGKILL cannot be handled: what was written must still be usable (fragmented MP4, atomic mask files)."""
    video, masks = tmp_path / "out.mp4", tmp_path / "masks"
    run = Running(tmp_path / "log", "run", str(long_clip), str(video), "--export", str(tiny_export), "--masks",
                  str(masks), "--stats-interval", "0")
    run.wait_for(lambda: masks.is_dir() and len(list(masks.glob("*.png"))) >= 80, "80 masks")
    finished = run.stop(signal.SIGKILL)
    assert finished.code == -signal.SIGKILL
    written = complete_masks(masks, (120, 160))
    frames, _ = video_frames(video)  # every complete 1 s fragment plays
    assert 30 <= frames <= written + 64  # the writer may hold a few frames not yet encoded


@needs_gstreamer
def test_signal_in_the_first_pass_ends_cleanly_before_any_frame(tiny_export, tmp_path_factory, tmp_path):
    """The offline policy reads the whole file twice before the first frame is segmented (count, references)."""
    clip = write_video(tmp_path_factory.mktemp("clips") / "many.mp4", 4000, 320, 240)
    stats = tmp_path / "stats.json"
    run = Running(tmp_path / "log", "run", str(clip), "null://", "--export", str(tiny_export), "--stats-json",
                  str(stats), "--stats-interval", "0")
    run.wait_for(lambda: " -> null://" in run.output(), "the start line")
    finished = run.stop(signal.SIGINT)
    assert_stopped(finished, signal.SIGINT)
    summary = read_stats(stats)
    assert summary["interrupted"] is True and summary["signal"] == "SIGINT"
    assert summary["frames"] == 0 and summary["error"] is None


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert run_dpa("synth", "--out", str(root), "--clips", "3", "--frames", "6", "--size", "64").code == 0
    return root


def _train(data, out, *extra):
    return ("train", "--config", "tiny", "--size", "64", "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--workers", "1", "--threads", "1", "--log-every", "1", "--save-every", "1000", "--steps", "5000", *extra)


def _logged_steps(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_training_saves_a_checkpoint_that_resumes(signum, synth_data, tmp_path):
    out = tmp_path / "run"
    run = Running(tmp_path / "log", *_train(synth_data, out))
    run.wait_for(lambda: _logged_steps(out) >= 3, "three training steps", timeout=300)
    finished = run.stop(signum)
    assert_stopped(finished, signum)
    step = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"]
    assert step >= _logged_steps(out) >= 3  # every logged step is in the checkpoint
    resumed = run_dpa(*_train(synth_data, out, "--resume", "--until", str(step + 2)))
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == step + 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_whole_process_group_during_training_saves_a_checkpoint(signum, synth_data, tmp_path):
    """The data-loading worker gets the signal too (a service manager's stop, Ctrl-C in a terminal): only the
    training process decides, so the stop is the same as above, not a crash on the worker's death."""
    out = tmp_path / "run"
    run = Running(tmp_path / "log", *_train(synth_data, out))
    run.wait_for(lambda: _logged_steps(out) >= 3, "three training steps", timeout=300)
    finished = run.stop_group(signum)
    assert_stopped(finished, signum)
    assert "DataLoader worker" not in finished.stderr
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] >= 3


def test_a_second_training_run_into_the_same_folder_is_refused(synth_data, tmp_path):
    out = tmp_path / "run"
    assert run_dpa(*_train(synth_data, out, "--steps", "2")).code == 0
    assert_one_error_line(run_dpa(*_train(synth_data, out, "--steps", "2")), "exists already", "--overwrite")
    assert run_dpa(*_train(synth_data, out, "--steps", "2", "--overwrite")).code == 0


def test_signal_during_export_leaves_no_manifest_and_a_rerun_needs_overwrite(tmp_path):
    out = tmp_path / "export"
    run = Running(tmp_path / "log", "export", "--checkpoint", "tiny", "--out", str(out))
    run.wait_for(lambda: "[2/4] exporting" in run.output(), "the second graph's export")
    finished = run.stop(signal.SIGTERM)
    assert_stopped(finished, signal.SIGTERM)
    assert not (out / "manifest.json").exists()
    assert_one_error_line(run_dpa("export", "--checkpoint", "tiny", "--out", str(out)), "exists already")
    assert run_dpa("export", "--checkpoint", "tiny", "--out", str(out), "--overwrite").code == 0
    assert (out / "manifest.json").is_file()


def test_signal_during_calibration_leaves_no_variant(tiny_export_copy, tmp_path):
    run = Running(tmp_path / "log", "calibrate", str(tiny_export_copy), "--frames", "synthetic:1", "synthetic:2",
                  "synthetic:3", "--synthetic-length", "40", "--precisions", "int8")
    run.wait_for(lambda: "calibrating on" in run.output(), "the calibration start")
    finished = run.stop(signal.SIGHUP)
    assert_stopped(finished, signal.SIGHUP)
    assert not (tiny_export_copy / "int8" / "manifest.json").exists()
