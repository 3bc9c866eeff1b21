"""Augmentation: geometry shared by image, flow and mask; recipe probabilities; colour jitter on RGB only."""

import numpy as np
import pytest

from dpa.training.augment import (
    AugmentConfig,
    AugmentParams,
    apply_augment,
    augment,
    draw_augment_params,
    jitter_colour,
)

RED = (220, 30, 30)
GREEN = (30, 220, 30)
GRAY = 90


def _scene(height: int = 96, width: int = 128, scale: int = 1):
    """An RGB frame with a red square on gray, the matching mask, and a flow image (at 1/scale resolution)
    whose square is green on white."""
    mask = np.zeros((height, width), bool)
    mask[30:70, 40:90] = True
    rgb = np.full((height, width, 3), GRAY, np.uint8)
    rgb[mask] = RED
    flow = np.full((height // scale, width // scale, 3), 255, np.uint8)
    flow[30 // scale : 70 // scale, 40 // scale : 90 // scale] = GREEN
    return rgb, flow, mask


def _more_than_half(contrast: np.ndarray) -> np.ndarray:
    """Pixels more than half covered by the square (bilinear blends at its border; jitter scales colours)."""
    return contrast > 0.5 * contrast.max()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_geometry_keeps_image_flow_and_mask_aligned():
    rgb, flow, mask = _scene()
    config = AugmentConfig(rotation_probability=0.5)  # exercise rotations often
    rotated = 0
    for seed in range(60):
        params = draw_augment_params(np.random.default_rng(seed), config)
        rotated += params.rotation != 0
        out_rgb, out_flow, out_mask = apply_augment(params, rgb, flow, mask, 64)
        assert out_rgb.shape == (64, 64, 3) and out_rgb.dtype == np.uint8
        assert out_flow.shape == (64, 64, 3) and out_flow.dtype == np.uint8
        assert out_mask.shape == (64, 64) and out_mask.dtype == bool
        red = _more_than_half(out_rgb[..., 0].astype(int) - out_rgb[..., 1])
        green = _more_than_half(out_flow[..., 1].astype(int) - out_flow[..., 0])
        assert out_mask.sum() > 100
        assert _iou(out_mask, red) >= 0.95, seed
        assert _iou(out_mask, green) >= 0.95, seed
    assert rotated > 10


def test_flow_at_a_lower_resolution_gets_the_same_geometry():
    rgb, flow, mask = _scene(scale=2)
    for seed in range(20):
        _, out_flow, out_mask = augment(rgb, flow, mask, np.random.default_rng(seed), 64)
        green = _more_than_half(out_flow[..., 1].astype(int) - out_flow[..., 0])
        assert _iou(out_mask, green) >= 0.9, seed


def test_flip_is_applied_identically_to_image_flow_and_mask():
    rgb, flow, mask = _scene(64, 64)
    rgb[5, 3] = (1, 2, 3)  # asymmetric marks
    flow[7, 60] = (4, 5, 6)
    out_rgb, out_flow, out_mask = apply_augment(AugmentParams(flip=True), rgb, flow, mask, 64)
    np.testing.assert_array_equal(out_rgb, rgb[:, ::-1])
    np.testing.assert_array_equal(out_flow, flow[:, ::-1])  # the rendered image is mirrored, colours kept
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_identity_parameters_change_nothing():
    rgb, flow, mask = _scene(64, 64)
    out_rgb, out_flow, out_mask = apply_augment(AugmentParams(), rgb, flow, mask, 64)
    np.testing.assert_array_equal(out_rgb, rgb)
    np.testing.assert_array_equal(out_flow, flow)
    np.testing.assert_array_equal(out_mask, mask)


def test_missing_flow_and_mask_pass_through_as_none():
    rgb, _, _ = _scene()
    out_rgb, out_flow, out_mask = augment(rgb, None, None, np.random.default_rng(0), 32)
    assert out_rgb.shape == (32, 32, 3) and out_flow is None and out_mask is None


def test_recipe_probabilities_and_ranges():
    rng = np.random.default_rng(1234)
    draws = [draw_augment_params(rng) for _ in range(4000)]
    rotation = np.mean([p.rotation != 0 for p in draws])
    flip = np.mean([p.flip for p in draws])
    assert 0.175 <= rotation <= 0.225  # p = 0.2, ±4 sigma
    assert 0.46 <= flip <= 0.54
    assert max(abs(p.rotation) for p in draws) <= 15.0
    for p in draws:
        x0, y0, width, height = p.crop
        assert 0.85 <= width <= 1 and 0.85 <= height <= 1
        assert 0 <= x0 and x0 + width <= 1 + 1e-12 and 0 <= y0 and y0 + height <= 1 + 1e-12
        assert 0.9 <= p.brightness <= 1.1 and abs(p.hue) <= 0.02


def test_colour_jitter_touches_rgb_only():
    rgb, flow, mask = _scene(64, 64)
    params = AugmentParams(brightness=1.1, contrast=0.9, saturation=1.1, hue=0.01)
    out_rgb, out_flow, out_mask = apply_augment(params, rgb, flow, mask, 64)
    assert not np.array_equal(out_rgb, rgb)
    np.testing.assert_array_equal(out_flow, flow)
    np.testing.assert_array_equal(out_mask, mask)


def test_colour_jitter_formulas():
    image = np.full((4, 4, 3), 100, np.uint8)
    # brightness multiplies: 100 * 1.2 = 120
    np.testing.assert_array_equal(jitter_colour(image, AugmentParams(brightness=1.2)), 120)
    # contrast and saturation keep a uniform gray image unchanged (it is its own mean and its own gray)
    np.testing.assert_array_equal(jitter_colour(image, AugmentParams(contrast=0.5, saturation=1.5)), 100)
    # half a turn of hue maps red to cyan
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    cyan = jitter_colour(red, AugmentParams(hue=0.5))
    np.testing.assert_array_equal(cyan[0, 0], (0, 200, 200))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_params_give_the_same_result_for_every_frame(seed):
    rgb, flow, mask = _scene()
    params = draw_augment_params(np.random.default_rng(seed))
    first = apply_augment(params, rgb, flow, mask, 48)
    second = apply_augment(params, rgb.copy(), flow.copy(), mask.copy(), 48)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
