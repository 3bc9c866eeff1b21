"""`dpa compare` on the tiny export: rows for every precision and clip, numbers that the saved masks reproduce,
plots that open, and the fp32 graphs agreeing with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dpa.calibration.clips import load_labelled_clip
from dpa.calibration.compare import REFERENCE_LABEL, mask_iou
from dpa.cli import main
from dpa.training.evaluate import score_sequence

DAVIS16 = Path(__file__).resolve().parents[3] / "shared" / "data" / "davis16"
PRECISIONS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def compared(calibrated, tmp_path_factory):
    """compare on: the calibration clip (synthetic-7, 6 frames), a 4-frame folder without ground truth, and the
    first 8 frames of DAVIS blackswan when the samples are present."""
    root = tmp_path_factory.mktemp("compare")
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    for index, frame in enumerate(load_labelled_clip("synthetic:11", 128, synthetic_length=4).frames):
        cv2.imwrite(str(unlabelled / f"{index:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    clips = ["synthetic:7", str(unlabelled)]
    if (DAVIS16 / "blackswan" / "Annotations").is_dir():
        clips.append(str(DAVIS16 / "blackswan"))
    out = root / "report"
    code = main(["compare", "--checkpoint", "tiny", "--export", str(calibrated), "--clips", *clips,
                 "--synthetic-length", "6", "--max-frames", "8", "--out", str(out), "--threads", "2",
                 "--layer-frames", "1", "--device", "cpu"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text()), clips


def _read_mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None, path
    return image > 0


@pytest.mark.slow
def test_rows_for_every_precision_and_clip(compared):
    _, report, clips = compared
    names = {"synthetic-7", "unlabelled"} | ({"blackswan"} if len(clips) == 3 else set())
    keys = {"backend", "precision", "clip", "iou_vs_reference_mean", "iou_vs_reference_min", "J_mean", "F_mean", "G",
            "latency_ms"}
    assert sorted((row["precision"], row["clip"]) for row in report["rows"]) == sorted(
        (precision, name) for precision in PRECISIONS for name in names)
    for row in report["rows"]:
        assert keys <= set(row) and row["backend"] == "onnxruntime" and row["latency_ms"] > 0
        if row["clip"] == "unlabelled":
            assert row["J_mean"] is None and row["F_mean"] is None and row["G"] is None
        else:
            assert 0 <= row["J_mean"] <= 1 and row["G"] == pytest.approx((row["J_mean"] + row["F_mean"]) / 2)
    assert {stage for stage in report["stages"]} == {f"onnxruntime-{p}" for p in PRECISIONS}


@pytest.mark.slow
def test_iou_and_jf_recomputed_from_the_saved_masks(compared):
    out, report, _ = compared
    for row in report["rows"]:
        folder = out / "masks" / row["clip"]
        files = sorted((folder / REFERENCE_LABEL).glob("*.png"))
        assert len(files) == row["frames"] == len(row["iou_per_frame"])
        masks = [_read_mask(folder / f"onnxruntime-{row['precision']}" / file.name) for file in files]
        ious = [mask_iou(mask, _read_mask(file)) for mask, file in zip(masks, files, strict=True)]
        assert np.max(np.abs(np.array(ious) - row["iou_per_frame"])) <= 1e-9
        assert abs(np.mean(ious) - row["iou_vs_reference_mean"]) <= 1e-9
        assert abs(np.min(ious) - row["iou_vs_reference_min"]) <= 1e-9
        if row["J_mean"] is None:
            continue
        if row["clip"].startswith("synthetic"):
            truth = load_labelled_clip("synthetic:7", 128, synthetic_length=6).masks
        else:
            truth = load_labelled_clip(str(DAVIS16 / row["clip"]), 128, max_frames=8).masks
        score = score_sequence([(file.stem, gt, mask) for file, gt, mask in zip(files, truth, masks, strict=True)])
        assert abs(score["J"]["mean"] - row["J_mean"]) <= 1e-9 and abs(score["F"]["mean"] - row["F_mean"]) <= 1e-9


@pytest.mark.slow
def test_fp32_graphs_agree_with_pytorch_and_fp16_nearly(compared):
    _, report, _ = compared
    for row in report["rows"]:
        if row["precision"] == "fp32":
            assert row["iou_vs_reference_mean"] >= 0.999 and row["probability_max_abs"] <= 1e-4
        if row["precision"] == "fp16":
            assert row["iou_vs_reference_mean"] >= 0.99
    fp32 = report["stages"]["onnxruntime-fp32"]
    assert fp32["worst"]["tensor"] in fp32["tensors"] and fp32["worst"]["relative"] < 1e-4
    int8 = report["stages"]["onnxruntime-int8"]
    assert int8["worst"]["relative"] == max(t["relative"] for t in int8["tensors"].values())
    assert set(report["layers"]) == {"fp16", "int8"}
    assert all(entry["top"] for entry in report["layers"]["int8"].values())


@pytest.mark.slow
def test_report_files_and_plots_open(compared):
    out, report, _ = compared
    expected_names = {"iou_per_frame.png", "error_histogram.png", "worst_frames.png"}
    assert {Path(p).name for p in report["files"]["plots"]} == expected_names
    for name in expected_names:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    markdown = (out / "report.md").read_text()
    assert "Per-stage tensor error" in markdown and report["stages"]["onnxruntime-int8"]["worst"]["tensor"] in markdown
    counts = report["histograms"]["counts"]
    frames = sum(row["frames"] for row in report["rows"] if row["precision"] == "fp32")
    assert all(sum(c) == frames * 128 * 128 for c in counts.values())
    assert any("synthetic-7" in note and "optimistic" in note for note in report["notes"])
    assert 1 <= len(report["worst_frames"]) <= 4
