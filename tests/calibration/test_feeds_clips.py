"""Clip arguments, the feed format on disk, mask IoU: small exact cases."""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dpa.calibration.clips import expand_clip_arguments, load_labelled_clip
from dpa.calibration.compare import TensorError, mask_iou
from dpa.calibration.feeds import FEEDS_FORMAT, FeedSet, check_feeds_match, load_feeds, save_feeds
from dpa.errors import DpaError


def test_synthetic_ranges_expand():
    assert expand_clip_arguments(["synthetic:3", "clips/a", "synthetic:10..12"]) == [
        "synthetic:3", "clips/a", "synthetic:10", "synthetic:11", "synthetic:12"]


@pytest.mark.parametrize("argument", ["synthetic:", "synthetic:x", "synthetic:5..2", "synthetic:-1"])
def test_bad_synthetic_arguments_are_user_errors(argument):
    with pytest.raises(DpaError, match="synthetic"):
        expand_clip_arguments([argument])


def test_a_clip_given_twice_is_an_error():
    with pytest.raises(DpaError, match="twice"):
        expand_clip_arguments(["synthetic:1", "synthetic:0..2"])


def test_synthetic_clip_has_exact_masks():
    clip = load_labelled_clip("synthetic:4", 64, synthetic_length=5, max_frames=3)
    assert clip.name == "synthetic-4" and clip.length == 3 and clip.frame_names == ["00000", "00001", "00002"]
    assert clip.frames[0].shape == (64, 64, 3) and clip.masks[0].shape == (64, 64) and clip.masks[0].any()


def test_folder_clip_reads_ground_truth_by_frame_name(tmp_path):
    (tmp_path / "seq" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "seq" / "Annotations").mkdir()
    for index in (2, 10):
        cv2.imwrite(str(tmp_path / "seq" / "JPEGImages" / f"{index}.png"), np.full((8, 12, 3), index, np.uint8))
        mask = np.zeros((8, 12), np.uint8)
        mask[: index // 2] = 255
        cv2.imwrite(str(tmp_path / "seq" / "Annotations" / f"{index}.png"), mask)
    clip = load_labelled_clip(str(tmp_path / "seq"), 64)
    assert clip.frame_names == ["2", "10"]  # natural order
    assert [int(m.sum()) for m in clip.masks] == [12, 60]
    (tmp_path / "seq" / "Annotations" / "10.png").unlink()
    with pytest.raises(DpaError, match="lacks masks"):
        load_labelled_clip(str(tmp_path / "seq"), 64)


def test_official_davis_layout_finds_its_annotations(tmp_path):
    frames = tmp_path / "DAVIS" / "JPEGImages" / "480p" / "cows"
    masks = tmp_path / "DAVIS" / "Annotations" / "480p" / "cows"
    frames.mkdir(parents=True)
    masks.mkdir(parents=True)
    cv2.imwrite(str(frames / "00000.jpg"), np.zeros((6, 6, 3), np.uint8))
    cv2.imwrite(str(masks / "00000.png"), np.full((6, 6), 255, np.uint8))
    clip = load_labelled_clip(str(frames), 64)
    assert clip.name == "cows" and clip.masks is not None and clip.masks[0].all()


def test_mask_iou_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert mask_iou(a, b) == 1.0
    a[0, :4] = True
    b[0, 2:4] = True
    b[1, 0] = True
    assert mask_iou(a, b) == pytest.approx(2 / 5)


def test_tensor_error_by_hand():
    error = TensorError()
    error.add(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 4.0]))
    error.add(np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0]))
    result = error.to_dict()
    assert result["max_abs"] == 2.0 and result["scale"] == 4.0 and result["relative"] == 0.5
    assert result["mean_abs"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["cosine_min"] == pytest.approx(13 / (3 * np.sqrt(21)))
    assert result["frames"] == 2


def _feed_set():
    arrays = {"encoder": {"rgb": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 2, 2),
                          "flow": np.ones((2, 1, 3, 2, 2), np.float32)}}
    origins = {"encoder": [{"clip": "a", "frame": 0, "role": "frame"}, {"clip": "a", "frame": 1, "role": "frame"}]}
    export = {"weights_sha256": "abc", "size": 2, "memory": 4}
    return FeedSet(arrays, origins, export, [{"name": "a", "source": "test", "frames": 2, "references": []}], "dis")


def test_feeds_round_trip(tmp_path):
    index = save_feeds(_feed_set(), tmp_path / "feeds")
    assert json.loads(index.read_text())["format"] == FEEDS_FORMAT
    loaded = load_feeds(tmp_path / "feeds")
    assert loaded.count("encoder") == 2 and loaded.origins == _feed_set().origins
    feeds = list(loaded.feeds("encoder"))
    assert [sorted(feed) for feed in feeds] == [["flow", "rgb"], ["flow", "rgb"]]
    np.testing.assert_array_equal(feeds[1]["rgb"], np.arange(12, 24, dtype=np.float32).reshape(1, 3, 2, 2))
    assert len(list(loaded.feeds("encoder", limit=1))) == 1
    manifest = SimpleNamespace(model=SimpleNamespace(weights_sha256="other"), graphs={})
    with pytest.raises(DpaError, match="other weights"):
        check_feeds_match(loaded, manifest)


def test_missing_feeds_folder_says_what_to_do(tmp_path):
    with pytest.raises(DpaError, match="dpa calibrate"):
        load_feeds(tmp_path)
