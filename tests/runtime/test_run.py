"""`dpa run` end to end: offline parity with PyTorch, GStreamer sources and sinks, drops, faults and Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gstreamer_support import GST_MISSING, corrupt_fragmented_mp4, count_frames

from dpa.cli import main

pytestmark = pytest.mark.skipif(GST_MISSING is not None, reason=str(GST_MISSING))

STAGES = {"flow", "pre", "encoder", "ima", "decoder", "post", "output"}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _run(tiny_export, source: str, sink: str, stats, *extra: str) -> tuple[int, dict]:
    code = main(["run", source, sink, "--export", str(tiny_export), "--stats-json", str(stats),
                 "--stats-interval", "0", *extra])
    return code, json.loads(stats.read_text())


@pytest.mark.slow
def test_offline_run_matches_pytorch_on_blackswan(davis16, tiny_export, tmp_path):
    """ONNX Runtime CPU, offline policy: every mask within IoU 0.999 of PyTorch's offline inference on the same
    frames, DIS flows and references."""
    import cv2

    from dpa.export.frames import load_clip
    from dpa.runtime.flow import flow_to_rgb, model_flow_estimator, offline_flow
    from dpa.runtime.preprocess import postprocess_probability
    from dpa.training.checkpoint import load_model
    from dpa.training.inference import OfflinePredictor, preprocess_video

    code, stats = _run(tiny_export, str(davis16 / "blackswan"), "null://", tmp_path / "stats.json",
                       "--masks", str(tmp_path / "masks"))
    assert code == 0
    clip = load_clip(davis16 / "blackswan")
    assert stats["frames"] == stats["masks_written"] == len(clip.frames) == 50
    assert stats["memory"]["policy"] == "offline" and stats["memory"]["references"] == [0, 16, 32, 49]
    assert stats["flow"].startswith("offline: forward flow")

    model, _ = load_model("tiny")
    estimator = model_flow_estimator(model.config.size)  # what `dpa run` computes: DIS at the model's S
    flows = [flow_to_rgb(offline_flow(clip.frames, i, estimator)) for i in range(len(clip.frames))]
    rgb, flow = preprocess_video(clip.frames, flows, model.config.size)
    probabilities = OfflinePredictor(model).predict(rgb, flow)
    ious = []
    for index, (frame, probability) in enumerate(zip(clip.frames, probabilities, strict=True)):
        _, expected = postprocess_probability(probability, *frame.shape[:2])
        written = cv2.imread(str(tmp_path / "masks" / f"{index:05d}.png"), cv2.IMREAD_GRAYSCALE) > 127
        ious.append(_iou(written, expected))
    assert min(ious) >= 0.999, (min(ious), int(np.argmin(ious)))


def test_test_source_through_gstreamer_to_null_and_mp4(tiny_export, tmp_path):
    source = "test://ball?width=160&height=120&fps=30&frames=24&live=0"
    code, stats = _run(tiny_export, source, "null://", tmp_path / "null.json")
    assert code == 0
    assert stats["frames"] == stats["frames_written"] == 24 and stats["dropped"] == 0
    assert stats["fps"] > 0 and STAGES <= set(stats["stages_ms"])
    assert all(value["mean"] > 0 for value in stats["stages_ms"].values())
    assert stats["error"] is None and stats["interrupted"] is False

    video = tmp_path / "out.mp4"
    code, stats = _run(tiny_export, source, str(video), tmp_path / "mp4.json", "--policy", "uniform",
                       "--horizon", "8")
    assert code == 0 and stats["frames_written"] == 24
    assert stats["memory"]["policy"] == "uniform" and stats["memory"]["admitted_frames"] == [0, 2, 4, 6, 8, 10, 12,
                                                                                             14, 16, 18, 20, 22]
    assert stats["flow"].startswith("live: -flow(t->t-1)")
    assert count_frames(str(video)) == 24


def test_source_failing_mid_run_exits_nonzero_with_one_line_and_a_playable_file(tiny_export, tmp_path):
    corrupt = corrupt_fragmented_mp4(tmp_path / "corrupt.mp4")
    video, stats_path = tmp_path / "out.mp4", tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "dpa", "run", str(corrupt), str(video), "--export", str(tiny_export),
         "--policy", "uniform", "--stats-json", str(stats_path), "--stats-interval", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("dpa run: error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["error"] and 30 <= stats["frames_written"] <= 60
    assert count_frames(str(video)) == stats["frames_written"]


def test_live_source_faster_than_inference_drops_frames(tiny_export, tmp_path):
    """200 frames at 400 fps (0.5 s) against ~10+ ms of work per frame: most frames are dropped, none queued."""
    code, stats = _run(tiny_export, "test://ball?width=160&height=120&fps=400&frames=200", "null://",
                       tmp_path / "stats.json")
    assert code == 0
    assert stats["live"] is True and stats["produced"] == 200
    assert stats["dropped"] > 0 and stats["frames"] + stats["dropped"] == stats["produced"]
    assert stats["frames"] <= 150


def test_ctrl_c_finalises_a_playable_file(tiny_export, tmp_path):
    video, stats_path = tmp_path / "out.mp4", tmp_path / "stats.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "dpa", "run", "test://ball?width=160&height=120&fps=30", str(video),
         "--export", str(tiny_export), "--stats-json", str(stats_path), "--stats-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (video.is_file() and video.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    stats = json.loads(stats_path.read_text())
    assert stats["interrupted"] is True and stats["frames_written"] > 0
    assert count_frames(str(video)) == stats["frames_written"]


def test_run_refuses_bad_options_with_one_line(tiny_export, capsys):
    assert main(["run", "test://ball", "null://", "--export", str(tiny_export), "--memory", "9"]) == 1
    assert "at most 4 reference frames" in capsys.readouterr().err
    assert main(["run", "test://ball", "null://", "--export", str(tiny_export), "--policy", "offline"]) == 1
    assert "live source can only use uniform" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("DPA_SKIP_DEMO") == "1", reason="DPA_SKIP_DEMO=1")
def test_demo_default_writes_video_masks_and_report(tmp_path, capsys):
    """The README's main job on its embedded default (a live synthetic clip of 96 frames at 15 fps)."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("overlay.mp4", "masks", "stats.json", "report.md"):
        assert str(tmp_path / name) in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frames"] + report["dropped"] == 96
    assert report["frames"] == report["frames_written"] == len(list((tmp_path / "masks").glob("*.png")))
    assert count_frames(str(tmp_path / "overlay.mp4")) == report["frames"]
    assert report["scores"]["frames_scored"] == report["frames"]
    assert report["scores"]["J_mean"] >= 0.75, report["scores"]
    assert report["engine"]["backend"] == "onnxruntime"
    assert "Real video" in report["note"] and "note: a synthetic clip" in printed  # the score is not real video's


def test_demo_on_a_davis_style_folder_scores_against_its_annotations(tiny_export, tmp_path):
    """`dpa demo --source SEQ` with SEQ/JPEGImages and SEQ/Annotations (every other frame annotated): the report
    scores exactly the annotated frames, and an annotation equal to the written mask scores J 1."""
    import cv2

    from dpa.synthetic import generate_clip

    frames, masks = generate_clip(np.random.default_rng(5), 6, 96)
    sequence = tmp_path / "seq"
    (sequence / "JPEGImages").mkdir(parents=True)
    (sequence / "Annotations").mkdir()
    for index, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
        cv2.imwrite(str(sequence / "JPEGImages" / f"{index:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if index % 2 == 0:
            cv2.imwrite(str(sequence / "Annotations" / f"{index:05d}.png"), mask.astype(np.uint8) * 255)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--export", str(tiny_export), "--source", str(sequence)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 6 and report["scores"]["frames_scored"] == 3
    assert "Annotations" in report["scores"]["against"] and 0.0 <= report["scores"]["J_mean"] <= 1.0
    assert "note" not in report
    # the scoring itself: annotations replaced by the run's own masks score exactly 1
    for index in (0, 2, 4):
        written = cv2.imread(str(out / "masks" / f"{index:05d}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(sequence / "Annotations" / f"{index:05d}.png"), written)
    from dpa.commands.demo import GroundTruth, score_masks

    assert score_masks(out / "masks", GroundTruth.of(str(sequence)))["J_mean"] == 1.0
