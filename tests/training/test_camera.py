"""Simulated camera motion (`dpa train --camera-motion`): the shift, and clips seen from a following camera."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from dpa.cli import main
from dpa.runtime.flow import flow_to_rgb
from dpa.training.camera import FOLLOW_RANGE, follow_shift
from dpa.training.datasets import ClipDataset
from dpa.training.layouts import load_sequences

SIZE = 96
STEP = 4  # pixels the object moves right per frame
FRAMES = 5


def test_follow_shift_is_minus_the_followed_part_of_the_object_mean_motion():
    flow = np.zeros((8, 8, 2), np.float32)
    flow[..., 0] = 0.5  # the background drifts
    flow[2:4, 2:6] = (3.0, -1.0)
    flow[4:6, 2:6] = (5.0, -3.0)
    mask = np.zeros((16, 16), bool)  # at twice the flow's resolution: resized to its grid
    mask[4:12, 4:12] = True  # flow rows 2..5, columns 2..5: half (3, -1), half (5, -3)
    assert follow_shift(flow, mask, 1.0) == pytest.approx([-4.0, 2.0])
    assert follow_shift(flow, mask, 0.5) == pytest.approx([-2.0, 1.0])
    assert follow_shift(flow, np.zeros((8, 8), bool), 1.0) is None


def _moving_object_clip(root: Path) -> Path:
    """One textured square moving STEP pixels right per frame over a still textured background; the stored flow
    images are white (no motion anywhere), so only live flow can show motion."""
    generator = np.random.default_rng(0)
    background = cv2.GaussianBlur(generator.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8), (5, 5), 0)
    texture = cv2.GaussianBlur(generator.integers(0, 256, (24, 24, 3)).astype(np.uint8), (3, 3), 0)
    for i in range(FRAMES):
        frame, mask = background.copy(), np.zeros((SIZE, SIZE), np.uint8)
        x = 20 + STEP * i
        frame[36:60, x:x + 24] = texture
        mask[36:60, x:x + 24] = 255
        for folder, image in (("JPEGImages", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)), ("Annotations", mask),
                              ("FLOW", np.full((SIZE, SIZE, 3), 255, np.uint8))):
            path = root / "clip" / folder / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), image)
    return root


def _background(item) -> np.ndarray:
    """The query's flow colours (uint8 (K, 3)) on background pixels away from the object and the border."""
    mask = item["mask"][0].numpy() > 0
    far = cv2.dilate(mask.astype(np.uint8), np.ones((25, 25), np.uint8)) == 0
    far[:12], far[-12:], far[:, :12], far[:, -12:] = False, False, False, False
    return np.round(item["flow"].numpy().transpose(1, 2, 0)[far] * 255)


def test_a_clip_seen_from_a_following_camera_shows_the_background_moving_against_the_object(tmp_path):
    sequences = load_sequences(_moving_object_clip(tmp_path))
    filmed = ClipDataset(sequences, SIZE, memory=2, augment=False, seed=1)[2]
    followed = ClipDataset(sequences, SIZE, memory=2, augment=False, seed=1, camera_motion=1.0)[2]
    assert filmed["frame"] == followed["frame"]
    # As filmed: the stored images (white, no motion).
    assert np.all(_background(filmed) == 255)
    assert float(filmed["reference_flow"].min()) == 1.0
    # Followed: the background moves left at f × STEP (f in [0.5, 1]) against an object moving right at
    # (1 − f) × STEP: the background's colour decodes to leftward motion, in the query and every reference (one
    # camera for the whole clip).
    background = _background(followed)
    assert len(background) > 500
    u, v = _decode(np.median(background, axis=0))
    assert u < -0.3 and abs(v) < 0.3 * abs(u), (u, v)
    for reference in followed["reference_flow"].numpy():
        u, v = _decode(np.median(np.round(reference.transpose(1, 2, 0)[24:36, 12:84].reshape(-1, 3) * 255), axis=0))
        assert u < -0.3 and abs(v) < 0.3 * abs(u), (u, v)


def _decode(colour: np.ndarray) -> tuple[float, float]:
    """The normalised flow vector (u, v) whose rendering is nearest to an RGB colour (a grid search over the unit
    disc): reads a flow image's colour as motion, independently of how the image was made."""
    axis = np.linspace(-1, 1, 201, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis), -1)
    grid[np.hypot(grid[..., 0], grid[..., 1]) > 1] = 0
    grid[0, 0] = (1, 0)  # one unit vector sets the rendering's scale to 1
    rendered = flow_to_rgb(grid).astype(float)
    row, column = np.unravel_index(np.argmin(np.abs(rendered - colour).sum(-1)), rendered.shape[:2])
    return float(grid[row, column, 0]), float(grid[row, column, 1])


def test_the_camera_motion_chance_and_the_followed_fraction():
    dataset = ClipDataset.__new__(ClipDataset)
    dataset.camera_motion = 0.3
    generator = np.random.default_rng(5)
    draws = [dataset._draw_follow(generator) for _ in range(1000)]
    followed = [f for f in draws if f is not None]
    assert 250 <= len(followed) <= 350
    assert min(followed) >= FOLLOW_RANGE[0] and max(followed) <= FOLLOW_RANGE[1]
    dataset.camera_motion = 0.0
    state = generator.bit_generator.state
    assert dataset._draw_follow(generator) is None
    assert generator.bit_generator.state == state  # off: no draw, so runs without it sample as before


def test_camera_motion_reaches_the_settings_and_is_refused_for_stage_1(tmp_path, capsys):
    root = _moving_object_clip(tmp_path / "data")
    common = ["train", "--config", "tiny", "--size", "96", "--data", f"{root}:images", "--steps", "1",
              "--batch-size", "2", "--workers", "0", "--camera-motion", "0.5"]
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    assert '"camera_motion": 0.5' in (tmp_path / "run" / "settings.json").read_text()
    assert main([*common, "--out", str(tmp_path / "still"), "--stage", "1"]) == 1
    assert "--camera-motion applies to stage 2" in capsys.readouterr().err
    with pytest.raises(Exception, match="probability"):
        ClipDataset(load_sequences(root), SIZE, camera_motion=1.5)
