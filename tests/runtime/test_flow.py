"""Flow rendering (SPEC §2.7) on hand-computed pixels, DIS accuracy, and the flow direction helpers (§4.3)."""

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.runtime.flow import (
    FLOW_ESTIMATORS,
    DISFlow,
    create_flow_estimator,
    flow_to_rgb,
    live_flow,
    make_colorwheel,
    model_flow_estimator,
    offline_flow,
)


def test_colorwheel_anchors():
    wheel = make_colorwheel()
    assert wheel.shape == (55, 3)
    # Ramp starts: RY at 0, YG at 15, GC at 21, CB at 25, BM at 36, MR at 49; each starts at a pure hue.
    assert wheel[0].tolist() == [255, 0, 0]  # red
    assert wheel[15].tolist() == [255, 255, 0]  # yellow
    assert wheel[21].tolist() == [0, 255, 0]  # green
    assert wheel[25].tolist() == [0, 255, 255]  # cyan
    assert wheel[36].tolist() == [0, 0, 255]  # blue
    assert wheel[49].tolist() == [255, 0, 255]  # magenta
    # RY ramp: G = floor(255·i/15) = 17·i exactly.
    assert wheel[:15, 1].tolist() == [17 * i for i in range(15)]
    assert np.all(wheel[:15, 0] == 255) and np.all(wheel[:15, 2] == 0)
    # YG: R = 255 − floor(255·i/6): i = 1 → 255 − 42 = 213, i = 5 → 255 − floor(212.5) = 43.
    assert wheel[16].tolist() == [213, 255, 0] and wheel[20].tolist() == [43, 255, 0]
    # GC: B = floor(255·i/4): 63, 127, 191.
    assert wheel[22:25, 2].tolist() == [63, 127, 191]
    # CB: G = 255 − floor(255·2/11) = 255 − 46 = 209 at index 27.
    assert wheel[27].tolist() == [0, 209, 255]
    # BM: R = floor(255·4/13) = 78 at index 40, floor(255·5/13) = 98 at index 41.
    assert wheel[40].tolist() == [78, 0, 255] and wheel[41].tolist() == [98, 0, 255]
    # MR: B = 255 − floor(255·5/6) = 43 at the last entry.
    assert wheel[54].tolist() == [255, 0, 43]


def test_zero_flow_is_white():
    image = flow_to_rgb(np.zeros((4, 5, 2), np.float32))
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert np.all(image == 255)


def test_hand_computed_pixels():
    # Max radius 1 (pixel (0, 0)), so u, v are divided by 1 + 1e-5 and r = |flow| / (1 + 1e-5):
    # r ≈ 0.99999 for the unit flows, r ≈ 0.499995 for the half ones.
    flow = np.array(
        [
            [[1.0, 0.0], [-0.5, 0.0], [0.0, 0.5]],
            [[0.0, -0.5], [0.0, 0.0], [1.0, -0.0]],
        ],
        np.float32,
    )
    image = flow_to_rgb(flow)
    # +x, v = +0.0: a = atan2(−0.0, −1)/π = −1 (IEEE signed zero: −v is −0.0) → fk = 0 → wheel[0] = (1, 0, 0);
    # R = 1 → 255; G = B = 1 − r·1 ≈ 1e-5 → floor(0.00255) = 0.
    assert image[0, 0].tolist() == [255, 0, 0]
    # −x: a = atan2(−0.0, 0.5)/π = −0 → fk = 27, f = 0 → wheel[27] = (0, 209, 255)/255;
    # R: 255·(1 − r) = 127.501 → 127; G: 255 − r·(255 − 209) = 255 − 22.9998 → 232; B: 255.
    assert image[0, 1].tolist() == [127, 232, 255]
    # +y (image down): a = atan2(−0.5, −0.0)/π = −0.5 → fk = 0.25·54 = 13.5 → k0 = 13, k1 = 14, f = 0.5;
    # wheel[13] = (255, 221, 0), wheel[14] = (255, 238, 0) → col = (1, 229.5/255, 0);
    # R: 255; G: 255 − r·25.5 = 242.25 → 242; B: 255·(1 − r) = 127.501 → 127.
    assert image[0, 2].tolist() == [255, 242, 127]
    # −y: a = atan2(0.5, −0.0)/π = 0.5 → fk = 0.75·54 = 40.5 → k0 = 40, k1 = 41, f = 0.5;
    # wheel[40] = (78, 0, 255), wheel[41] = (98, 0, 255) → col = (88/255, 0, 1);
    # R: 255 − r·(255 − 88) = 255 − 83.499 = 171.5 → 171; G: 127.501 → 127; B: 255.
    assert image[1, 0].tolist() == [171, 127, 255]
    # Zero flow: radius 0 → white.
    assert image[1, 1].tolist() == [255, 255, 255]
    # +x, v = −0.0: a = atan2(+0.0, −1)/π = +1 → fk = 54 → k0 = 54, k1 = (54 + 1) mod 55 = 0, f = 0 →
    # wheel[54] = (255, 0, 43); B: 255 − r·212 = 43.002 → 43. (RAFT's output depends on the zero's sign.)
    assert image[1, 2].tolist() == [255, 0, 43]


def test_rejects_non_finite_flow():
    flow = np.zeros((2, 2, 2), np.float32)
    flow[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        flow_to_rgb(flow)


def _reference_pixel(u: float, v: float, radius_max: float) -> list[int]:
    """SPEC §2.7 written out for one pixel in float64 (a scalar transcription, independent of numpy)."""
    wheel = make_colorwheel()
    u, v = u / (radius_max + 1e-5), v / (radius_max + 1e-5)
    radius = math.sqrt(u * u + v * v)
    position = (math.atan2(-v, -u) / math.pi + 1) / 2 * 54
    k0 = math.floor(position)
    k1 = (k0 + 1) % 55
    fraction = position - k0
    pixel = []
    for channel in range(3):
        colour = (1 - fraction) * (wheel[k0, channel] / 255) + fraction * (wheel[k1, channel] / 255)
        colour = 1 - radius * (1 - colour) if radius <= 1 else colour * 0.75
        pixel.append(math.floor(255 * colour))
    return pixel


def test_matches_scalar_transcription_on_random_flow():
    rng = np.random.default_rng(3)
    flow = rng.normal(0, 4, (9, 11, 2))  # float64: the scalar reference computes in float64 too
    flow[2, 3] = 0
    image = flow_to_rgb(flow)
    radius_max = max(math.sqrt(u * u + v * v) for u, v in flow.reshape(-1, 2))
    for y in range(flow.shape[0]):
        for x in range(flow.shape[1]):
            assert image[y, x].tolist() == _reference_pixel(flow[y, x, 0], flow[y, x, 1], radius_max), (y, x)


def _textured_image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = cv2.resize(rng.random((size // 6, size // 6)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    gray = np.clip(noise * 255, 0, 255).astype(np.uint8)
    return np.stack([gray, 255 - gray, gray // 2 + 64], -1)


@pytest.mark.parametrize("size", [None, 96])
def test_dis_recovers_translation(size):
    canvas = _textured_image(240)
    shift_x, shift_y = 3, -2  # content moves +3 px in x and −2 px in y from frame 0 to frame 1
    frame_from = canvas[40:200, 40:200]
    frame_to = canvas[40 - shift_y:200 - shift_y, 40 - shift_x:200 - shift_x]
    flow = DISFlow("medium", size=size)(frame_from, frame_to)
    # On the working grid, with vectors in pixels of the 160 px frames.
    grid = size or 160
    assert flow.shape == (grid, grid, 2) and flow.dtype == np.float32
    margin = grid // 5
    interior = flow[margin:-margin, margin:-margin].reshape(-1, 2)
    assert np.all(np.abs(np.median(interior, axis=0) - [shift_x, shift_y]) < 0.5)
    assert np.mean(np.linalg.norm(interior - [shift_x, shift_y], axis=1) < 0.5) > 0.9


def test_registry():
    assert "dis" in FLOW_ESTIMATORS
    estimator = create_flow_estimator("dis", preset="ultrafast")
    assert estimator.name == "dis"
    with pytest.raises(DpaError, match="unknown flow estimator"):
        create_flow_estimator("nope")
    with pytest.raises(DpaError, match="preset"):
        create_flow_estimator("dis", preset="slow")
    with pytest.raises(DpaError, match="bad options"):
        create_flow_estimator("dis", colour=True)


class RecordingEstimator:
    """Returns a constant flow whose u encodes the pair: u = 10·to + from (frames are filled with their index)."""

    name = "recording"

    def __call__(self, frame_from, frame_to):
        flow = np.zeros((*frame_from.shape[:2], 2), np.float32)
        flow[..., 0] = 10 * frame_to[0, 0, 0] + frame_from[0, 0, 0]
        flow[..., 1] = 1
        return flow


def _frames(count):
    return [np.full((4, 4, 3), index, np.uint8) for index in range(count)]


def test_offline_direction():
    frames = _frames(3)
    estimator = RecordingEstimator()
    assert offline_flow(frames, 0, estimator)[0, 0].tolist() == [10, 1]  # 0→1, forward
    assert offline_flow(frames, 1, estimator)[0, 0].tolist() == [21, 1]  # 1→2, forward
    assert offline_flow(frames, 2, estimator)[0, 0].tolist() == [-12, -1]  # −(2→1): the last frame
    assert np.all(offline_flow(_frames(1), 0, estimator) == 0)  # one frame: zero
    with pytest.raises(IndexError):
        offline_flow(frames, 3, estimator)


def test_live_direction():
    frames = _frames(3)
    estimator = RecordingEstimator()
    first = live_flow(None, frames[0], estimator)
    assert first.shape == (4, 4, 2) and np.all(first == 0)
    assert live_flow(frames[1], frames[2], estimator)[0, 0].tolist() == [-12, -1]  # −(2→1)


def test_live_flow_points_forward_like_offline():
    canvas = _textured_image(200)
    frames = [canvas[30 - t:170 - t, 30 - 2 * t:170 - 2 * t] for t in range(3)]  # content moves (+2, +1)/frame
    dis = DISFlow("medium")
    forward = np.median(offline_flow(frames, 1, dis)[30:-30, 30:-30].reshape(-1, 2), axis=0)
    live = np.median(live_flow(frames[1], frames[2], dis)[30:-30, 30:-30].reshape(-1, 2), axis=0)
    assert np.allclose(forward, [2, 1], atol=0.5) and np.allclose(live, [2, 1], atol=0.5)


def test_runtime_modules_do_not_import_torch():
    code = "import sys, dpa.runtime.flow, dpa.runtime.preprocess; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_flow_is_on_the_model_grid_with_vectors_in_frame_pixels():
    """The one definition (training data, offline inference, runtime): DIS on the frames resized to S×S; the field
    stays on that grid, its vectors in pixels of the (here non-square) frames, so directions are the frames'."""
    canvas = _textured_image(400)
    shift_x, shift_y = 6, -3  # pixels of the 240×144 frames
    frame_from = canvas[100:244, 80:320]
    frame_to = canvas[100 - shift_y:244 - shift_y, 80 - shift_x:320 - shift_x]
    estimator = model_flow_estimator(96, preset="medium")
    flow = estimator(frame_from, frame_to)
    assert flow.shape == (96, 96, 2) and flow.dtype == np.float32
    interior = flow[20:-20, 20:-20].reshape(-1, 2)
    assert np.all(np.abs(np.median(interior, axis=0) - [shift_x, shift_y]) < 0.6)
    # A frame without a neighbour gets zero flow on the same grid.
    assert live_flow(None, frame_from, estimator).shape == (96, 96, 2)
    assert offline_flow([frame_from], 0, estimator).shape == (96, 96, 2)
