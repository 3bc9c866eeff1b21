"""The pre/post-processing contract (SPEC §2.1): exact values, shapes, threshold, image reading."""

import cv2
import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.images import read_rgb, write_image
from dpa.runtime.preprocess import postprocess_probability, preprocess_flow, preprocess_rgb


def test_rgb_normalisation_on_a_constant_image():
    frame = np.empty((48, 80, 3), np.uint8)
    frame[...] = (51, 102, 204)  # 0.2, 0.4, 0.8 after /255
    tensor = preprocess_rgb(frame, 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    # (0.2 − 0.485)/0.229 = −1.244541..., (0.4 − 0.456)/0.224 = −0.25, (0.8 − 0.406)/0.225 = 1.751111...
    expected = [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(tensor[channel], value, atol=1e-6)


def test_rgb_channel_order_and_resize():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, :32, 0] = 255  # red left half
    tensor = preprocess_rgb(frame, 32)
    red = tensor[0] * 0.229 + 0.485  # undo the normalisation: back to [0, 1]
    assert np.allclose(red[:, :15], 1, atol=1e-6) and np.allclose(red[:, 17:], 0, atol=1e-6)
    assert np.allclose(tensor[1], (0 - 0.456) / 0.224, atol=1e-6)


def test_flow_scaling_without_normalisation():
    flow_rgb = np.empty((20, 30, 3), np.uint8)
    flow_rgb[...] = (255, 0, 51)
    tensor = preprocess_flow(flow_rgb, 64)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], 1.0)
    np.testing.assert_allclose(tensor[1], 0.0)
    np.testing.assert_allclose(tensor[2], 0.2, atol=1e-7)


def test_postprocess_resizes_and_thresholds():
    probability = np.array([[0.2, 0.5], [0.51, 0.9]], np.float32)
    resized, mask = postprocess_probability(probability, 2, 2)
    assert resized.dtype == np.float32 and mask.dtype == bool
    assert mask.tolist() == [[False, False], [True, True]]  # strictly above 0.5
    resized, mask = postprocess_probability(np.full((32, 32), 0.7, np.float32), 48, 80)
    assert resized.shape == (48, 80) and mask.shape == (48, 80)
    np.testing.assert_allclose(resized, 0.7, atol=1e-6)
    assert mask.all()


def test_postprocess_is_bilinear():
    probability = np.zeros((4, 4), np.float32)
    probability[:, 2:] = 1.0
    resized, mask = postprocess_probability(probability, 4, 8)
    # Upsampling x2 with pixel centres aligned: output x maps to input (x + 0.5)/2 − 0.5; at x = 3 → 1.25,
    # between input columns 1 (0) and 2 (1) with weight 0.25 → 0.25; at x = 4 → 1.75 → 0.75.
    np.testing.assert_allclose(resized[0], [0, 0, 0, 0.25, 0.75, 1, 1, 1], atol=1e-6)
    assert mask[0].tolist() == [False] * 4 + [True] * 4


def test_read_rgb(tmp_path):
    image = np.zeros((6, 7, 3), np.uint8)
    image[..., 0] = 200  # red
    write_image(tmp_path / "red.png", image)
    assert cv2.imread(str(tmp_path / "red.png"))[0, 0].tolist() == [0, 0, 200]  # stored as BGR
    loaded = read_rgb(tmp_path / "red.png")
    assert loaded.shape == (6, 7, 3) and loaded[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(DpaError, match="missing.png"):
        read_rgb(tmp_path / "missing.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DpaError, match="broken.jpg"):
        read_rgb(tmp_path / "broken.jpg")
