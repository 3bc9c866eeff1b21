"""Scoring of mask folders and in-memory sequences, the two protocols, `dpa eval`, and the DAVIS samples."""

import json
import logging
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from dpa.cli import main
from dpa.errors import DpaError
from dpa.training.evaluate import (
    format_table,
    read_mask,
    score_directories,
    score_sequence,
    summarise,
    write_json,
)
from dpa.training.metrics import disk

SHAPE = (20, 30)


def square_mask(size: int, shape=SHAPE) -> np.ndarray:
    """A size×size square at (5, 5); size 0 gives an empty mask."""
    mask = np.zeros(shape, dtype=bool)
    mask[5 : 5 + size, 5 : 5 + size] = True
    return mask


def half_of(mask: np.ndarray) -> np.ndarray:
    """The left half of the square of `square_mask(10)`: J = 0.5 against it."""
    half = mask.copy()
    half[:, 10:] = False
    return half


def write_mask(path: Path, mask: np.ndarray, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask.astype(np.uint8) * value)


# ---- read_mask -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 128, 255])
def test_read_mask_treats_any_non_zero_value_as_foreground(tmp_path, value):
    mask = square_mask(10)
    write_mask(tmp_path / "mask.png", mask, value)
    assert np.array_equal(read_mask(tmp_path / "mask.png"), mask)


def test_read_mask_colour_image(tmp_path):
    mask = square_mask(10)
    colour = np.zeros((*SHAPE, 3), dtype=np.uint8)
    colour[mask] = (0, 0, 128)  # DAVIS palette red, as BGR
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    assert np.array_equal(read_mask(tmp_path / "colour.png"), mask)


def test_read_mask_errors(tmp_path):
    with pytest.raises(DpaError, match="not found"):
        read_mask(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DpaError, match="broken.png"):
        read_mask(tmp_path / "broken.png")


# ---- score_sequence and summarise ------------------------------------------------------------------------


def interior_sequence() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """5 frames: first and last predictions empty (J = F = 0); interior J = [1, 1, 0.5]."""
    gt = square_mask(10)
    predictions = [square_mask(0), gt, gt, half_of(gt), square_mask(0)]
    return [(f"{index:05d}", gt, pred) for index, pred in enumerate(predictions)]


def test_score_sequence_all_frames():
    result = score_sequence(interior_sequence(), "all")
    assert list(result["frames"]) == ["00000", "00001", "00002", "00003", "00004"]
    assert [frame["J"] for frame in result["frames"].values()] == [0.0, 1.0, 1.0, 0.5, 0.0]
    # J = [0, 1, 1, 0.5, 0]; N = 5 → decay edges [0, 1, 2, 3, 4]: bin 0 = v[0..1], bin 3 = v[3..4]
    assert result["J"] == {"mean": 2.5 / 5, "recall": 2 / 5, "decay": 0.5 - 0.25}
    assert result["F"]["mean"] == pytest.approx((2 + 46 / 70) / 5, rel=1e-12)
    assert result["G"] == (result["J"]["mean"] + result["F"]["mean"]) / 2


def test_score_sequence_davis2016_drops_first_and_last_frames():
    result = score_sequence(interior_sequence(), "davis2016")
    frames = result["frames"]
    assert math.isnan(frames["00000"]["J"]) and math.isnan(frames["00004"]["F"])
    assert [frames[name]["J"] for name in ("00001", "00002", "00003")] == [1.0, 1.0, 0.5]
    # interior J = [1, 1, 0.5]; N = 3 → edges [0, 1, 1, 2, 2]: bin 0 = v[0..1] = 1, bin 3 = v[2..2] = 0.5
    assert result["J"] == {"mean": 2.5 / 3, "recall": 2 / 3, "decay": 0.5}
    # F of the half square against the square (tolerance 1 px, a plus-shaped disk): the square has 40
    # boundary pixels, the half 30; 23 of the half's lie within 1 px of the square's (all but column 9,
    # rows 6..12) and 23 of the square's within 1 px of the half's (row 4 columns 4..10, column 4 rows
    # 5..14, row 14 columns 5..10): P = 23/30, R = 23/40 → F = 46/70.
    assert frames["00003"]["F"] == pytest.approx(46 / 70, rel=1e-12)
    assert result["F"]["mean"] == pytest.approx((2 + 46 / 70) / 3, rel=1e-12)


def test_davis2016_needs_three_frames():
    gt = square_mask(10)
    with pytest.raises(DpaError, match="at least 3"):
        score_sequence([("a", gt, gt), ("b", gt, gt)], "davis2016")
    assert score_sequence([("a", gt, gt), ("b", gt, gt)], "all")["G"] == 1.0


def test_score_sequence_rejects_other_resolutions_and_protocols():
    gt = square_mask(10)
    with pytest.raises(DpaError, match="ground truth's resolution"):
        score_sequence([("00000", gt, square_mask(10, (40, 60)))], "all")
    with pytest.raises(DpaError, match="unknown protocol"):
        score_sequence([("00000", gt, gt)], "davis2017")


def test_dataset_values_are_means_of_sequence_means():
    gt = square_mask(10)
    good = score_sequence([("a", gt, gt), ("b", gt, gt)], "all")
    bad = score_sequence([(str(index), gt, square_mask(0)) for index in range(4)], "all")
    dataset = summarise({"good": good, "bad": bad}, "all")["dataset"]
    assert dataset["J_mean"] == 0.5  # pooled over the 6 frames it would be 1/3
    assert dataset["F_mean"] == 0.5
    assert dataset["G"] == 0.5
    assert dataset["J_recall"] == 0.5 and dataset["J_decay"] == 0.0


def test_format_table_lists_sequences_and_the_mean():
    gt = square_mask(10)
    result = summarise({"swan": score_sequence([("a", gt, gt)], "all")}, "all")
    table = format_table(result)
    assert "protocol: all" in table
    assert table.splitlines()[-2].startswith("| swan ")
    assert [cell.strip() for cell in table.splitlines()[-1].split("|")[1:4]] == ["mean", "1", "1.000"]


# ---- score_directories ------------------------------------------------------------------------------------


def make_tree(root: Path, sequences: dict[str, list[np.ndarray]]) -> Path:
    for name, masks in sequences.items():
        for index, mask in enumerate(masks):
            write_mask(root / name / f"{index:05d}.png", mask)
    return root


def test_missing_prediction_is_an_error_naming_the_file(tmp_path):
    gt = make_tree(tmp_path / "gt", {"seq": [square_mask(10)] * 3})
    pred = make_tree(tmp_path / "pred", {"seq": [square_mask(10)] * 2})
    with pytest.raises(DpaError, match=r"pred/seq/00002\.png"):
        score_directories(pred, gt)
    with pytest.raises(DpaError, match="no predictions for sequence other"):
        score_directories(pred, make_tree(tmp_path / "gt2", {"other": [square_mask(10)]}))


def test_predictions_without_ground_truth_are_ignored_with_a_warning(tmp_path, caplog):
    gt = make_tree(tmp_path / "gt", {"seq": [square_mask(10)] * 2})
    pred = make_tree(tmp_path / "pred", {"seq": [square_mask(10)] * 3, "extra": [square_mask(10)]})
    with caplog.at_level(logging.WARNING):
        result = score_directories(pred, gt)
    assert list(result["sequences"]) == ["seq"]
    assert list(result["sequences"]["seq"]["frames"]) == ["00000", "00001"]
    assert "extra" in caplog.text and "00002.png" in caplog.text


def test_prediction_at_another_resolution_is_an_error(tmp_path):
    gt = make_tree(tmp_path / "gt", {"seq": [square_mask(10)]})
    pred = make_tree(tmp_path / "pred", {"seq": [square_mask(10, (40, 60))]})
    with pytest.raises(DpaError, match="predict at the ground truth's resolution"):
        score_directories(pred, gt)


def test_missing_or_empty_ground_truth_directory(tmp_path):
    with pytest.raises(DpaError, match="not found"):
        score_directories(tmp_path, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpaError, match="no ground truth found"):
        score_directories(tmp_path, tmp_path / "empty")


def test_frames_are_ordered_naturally(tmp_path):
    for stem in ("f2", "f10", "f1"):
        write_mask(tmp_path / "gt" / "seq" / f"{stem}.png", square_mask(10))
        write_mask(tmp_path / "pred" / "seq" / f"{stem}.png", square_mask(10))
    result = score_directories(tmp_path / "pred", tmp_path / "gt")
    assert list(result["sequences"]["seq"]["frames"]) == ["f1", "f2", "f10"]


def test_write_json_turns_nan_into_null(tmp_path):
    result = summarise({"seq": score_sequence(interior_sequence(), "davis2016")}, "davis2016")
    write_json(result, tmp_path / "out" / "result.json")
    loaded = json.loads((tmp_path / "out" / "result.json").read_text())
    assert loaded["sequences"]["seq"]["frames"]["00000"] == {"J": None, "F": None}


# ---- dpa eval ------------------------------------------------------------------------------------------


def test_dpa_eval_writes_the_json(tmp_path, capsys):
    gt_square = square_mask(10)
    make_tree(tmp_path / "gt", {"a": [gt_square] * 5, "b": [gt_square] * 2})
    predictions = [pred for _, _, pred in interior_sequence()]
    make_tree(tmp_path / "pred", {"a": predictions, "b": [gt_square, square_mask(0)]})
    out = tmp_path / "result.json"
    folders = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert main(["eval", *folders, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "all"
    assert set(result["sequences"]) == {"a", "b"}
    assert result["sequences"]["a"]["J"] == {"mean": 0.5, "recall": 0.4, "decay": 0.25}
    assert result["sequences"]["b"]["J"] == {"mean": 0.5, "recall": 0.5, "decay": 1.0}
    assert result["sequences"]["b"]["F"] == {"mean": 0.5, "recall": 0.5, "decay": 1.0}
    f_a = (2 + 46 / 70) / 5
    assert result["sequences"]["a"]["F"]["mean"] == pytest.approx(f_a, rel=1e-12)
    assert result["dataset"]["J_mean"] == 0.5
    assert result["dataset"]["F_mean"] == pytest.approx((f_a + 0.5) / 2, rel=1e-12)
    assert result["dataset"]["G"] == pytest.approx((0.5 + (f_a + 0.5) / 2) / 2, rel=1e-12)
    assert "| a " in capsys.readouterr().out

    assert main(["eval", *folders, "--protocol", "davis2016"]) == 1  # b has only 2 frames
    assert "at least 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "nothing to evaluate"),
        (["--pred", "p"], "--gt is missing"),
        (["--data", "d"], "--checkpoint is missing"),
        (["--pred", "p", "--gt", "g", "--checkpoint", "c"], "not both"),
    ],
)
def test_dpa_eval_needs_one_complete_mode(arguments, message, capsys):
    assert main(["eval", *arguments]) == 1
    assert message in capsys.readouterr().err


def test_dpa_eval_checkpoint_mode_delegates_to_inference(tmp_path, monkeypatch, capsys):
    gt = square_mask(10)
    calls = []

    def evaluate_checkpoint(args):
        calls.append((args.checkpoint, args.data, args.protocol))
        return summarise({"synthetic": score_sequence([("0", gt, gt)], args.protocol)}, args.protocol)

    inference = types.ModuleType("dpa.training.inference")
    inference.evaluate_checkpoint = evaluate_checkpoint
    monkeypatch.setitem(sys.modules, "dpa.training.inference", inference)
    out = tmp_path / "result.json"
    assert main(["eval", "--checkpoint", "model.pt", "--data", "clips", "--json", str(out)]) == 0
    assert calls == [("model.pt", "clips", "all")]
    assert json.loads(out.read_text())["dataset"]["G"] == 1.0
    assert "| synthetic " in capsys.readouterr().out


@pytest.mark.parametrize("flow_size, expected", [(None, "size=(128, 128)"), (64, "size=(64, 64)"), (0, "size=None")])
def test_dpa_eval_flow_size_sets_where_dis_runs(tmp_path, flow_size, expected):
    # Default: DIS at the model's input size S (tiny: 128), as in training and the runtime; 0: the frames' size.
    from dpa.training.synth import write_dataset

    write_dataset(tmp_path / "clips", clips=1, frames=4, size=160, seed=1000, split="test", progress=False)
    out = tmp_path / "result.json"
    arguments = ["eval", "--checkpoint", "tiny", "--data", str(tmp_path / "clips"), "--split", "test",
                 "--flow", "dis", "--json", str(out)]
    assert main(arguments + ([] if flow_size is None else ["--flow-size", str(flow_size)])) == 0
    result = json.loads(out.read_text())
    assert expected in str(result["flow"]) and 0.0 <= result["dataset"]["J_mean"] <= 1.0


# ---- the DAVIS 2016 samples --------------------------------------------------------------------------------

SEQUENCES = ("blackswan", "dog")


def test_ground_truth_against_itself_scores_exactly_one(davis16, tmp_path):
    gt_root = tmp_path / "gt"
    gt_root.mkdir()
    for name in SEQUENCES:
        (gt_root / name).symlink_to(davis16 / name / "Annotations", target_is_directory=True)
    for protocol in ("all", "davis2016"):
        result = score_directories(gt_root, gt_root, protocol)
        assert [len(result["sequences"][name]["frames"]) for name in SEQUENCES] == [50, 60]
        assert result["dataset"] == {"J_mean": 1.0, "F_mean": 1.0, "G": 1.0, "J_recall": 1.0,
                                     "J_decay": 0.0, "F_recall": 1.0, "F_decay": 0.0}


# (J mean, F mean, G) of the ground truth against itself eroded with the disk(5) kernel, measured with
# this code (and identical, to the last bit, with the official davis2017-evaluation functions).
ERODED_5PX = {
    "all": {
        "blackswan": (0.8134774496066116, 0.9755583067371846, 0.8945178781718981),
        "dog": (0.8536523607591863, 0.9866221887473297, 0.9201372747532579),
        "dataset": (0.8335649051828989, 0.9810902477422572, 0.9073275764625781),
    },
    "davis2016": {
        "blackswan": (0.8134832071686859, 0.9755604149451157, 0.8945218110569009),
        "dog": (0.853606709741851, 0.9865945198579571, 0.920100614799904),
        "dataset": (0.8335449584552685, 0.9810774674015363, 0.9073112129284024),
    },
}


@pytest.fixture(scope="module")
def eroded_frames(davis16) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    kernel = disk(5).astype(np.uint8)
    sequences = {}
    for name in SEQUENCES:
        frames = []
        for path in sorted((davis16 / name / "Annotations").glob("*.png")):
            gt = read_mask(path)
            frames.append((path.stem, gt, cv2.erode(gt.astype(np.uint8), kernel).astype(bool)))
        sequences[name] = frames
    return sequences


@pytest.mark.parametrize("protocol", ["all", "davis2016"])
def test_ground_truth_eroded_by_5_pixels(eroded_frames, protocol):
    result = summarise({name: score_sequence(frames, protocol) for name, frames in eroded_frames.items()},
                       protocol)
    for name in SEQUENCES:
        sequence = result["sequences"][name]
        measured = (sequence["J"]["mean"], sequence["F"]["mean"], sequence["G"])
        assert measured == pytest.approx(ERODED_5PX[protocol][name], abs=1e-6)
        assert sequence["J"]["recall"] == 1.0 and sequence["F"]["recall"] == 1.0
    dataset = result["dataset"]
    measured = (dataset["J_mean"], dataset["F_mean"], dataset["G"])
    assert measured == pytest.approx(ERODED_5PX[protocol]["dataset"], abs=1e-6)
