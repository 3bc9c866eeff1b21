"""Frames for parity checks and calibration: a clip folder or a synthetic clip, pre-processed like offline inference.

Torch-free (numpy, OpenCV, the runtime's pre-processing and DIS flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.errors import DpaError


@dataclass
class Clip:
    """The frames of a clip, uint8 (H, W, 3) RGB, and where they came from."""

    name: str
    frames: list[np.ndarray]
    source: str


def load_clip(path: str | Path) -> Clip:
    """A sequence folder (<path>/JPEGImages/*.jpg, as the DAVIS samples) or a plain folder of images, in name
    order (natural sort). DpaError when there is no image or the frames differ in size."""
    from dpa.images import IMAGE_SUFFIXES, list_images, read_rgb

    path = Path(path)
    folder = path / "JPEGImages" if (path / "JPEGImages").is_dir() else path
    if not folder.is_dir():
        raise DpaError(f"clip folder {path} not found")
    images = list_images(folder)
    if not images:
        raise DpaError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    frames = [read_rgb(image) for image in images]
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        raise DpaError(f"the frames of {folder} differ in size ({sorted(sizes)}); a clip needs one frame size")
    return Clip(path.name, frames, str(folder))


def synthetic_clip(length: int, size: int, seed: int) -> Clip:
    """A procedural clip from `dpa.synthetic.generate_clip`: `length` frames of size x size pixels."""
    from dpa.synthetic import generate_clip

    frames, _ = generate_clip(np.random.default_rng(seed), length, size)
    return Clip(f"synthetic-{seed}", frames, f"synthetic (generate_clip, seed {seed}, {length} frames of {size} px)")


def preprocess_clip(
    clip: Clip, indices: list[int], size: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], str]:
    """Model inputs of the frames `indices`: (rgb, flow), each index -> (3, S, S) float32, and the flow's source.

    Flow is DIS at the model's input size (`model_flow_estimator`) in the offline direction (forward flow t -> t+1;
    the last frame -flow(t -> t-1)), rendered and pre-processed exactly as offline inference does.
    """
    from dpa.runtime.flow import flow_to_rgb, model_flow_estimator, offline_flow
    from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb

    estimator = model_flow_estimator(size)
    rgb = {i: preprocess_rgb(clip.frames[i], size) for i in indices}
    flow = {i: preprocess_flow(flow_to_rgb(offline_flow(clip.frames, i, estimator)), size) for i in indices}
    return rgb, flow, f"{estimator!r} (offline: forward flow t->t+1; last frame -flow(t->t-1))"
