"""The one pre/post-processing contract (SPEC §2.1), shared by training data, offline inference and runtime.

Torch-free. Frames are uint8 RGB (H, W, 3); the model sees S×S channel-first float32 inputs and returns
an S×S foreground probability. All resizes are OpenCV bilinear (`cv2.INTER_LINEAR`, pixel centres
aligned, no anti-aliasing), so every consumer gets the same numbers.
"""

from __future__ import annotations

import cv2
import numpy as np

from dpa.constants import IMAGENET_MEAN, IMAGENET_STD

MASK_THRESHOLD = 0.5  # foreground where the probability is strictly above this

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def preprocess_rgb(frame: np.ndarray, size: int) -> np.ndarray:
    """Model input `rgb`: uint8 (H, W, 3) RGB frame → float32 (3, S, S).

    Bilinear resize to S×S, scale to [0, 1], subtract the ImageNet mean and divide by its std per channel.
    """
    image = _resize_image(frame, size).astype(np.float32) / np.float32(255)
    image = (image - _MEAN) / _STD
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def preprocess_flow(flow_rgb: np.ndarray, size: int) -> np.ndarray:
    """Model input `flow`: uint8 (H, W, 3) flow rendered by `flow_to_rgb` → float32 (3, S, S) in [0, 1].

    Bilinear resize to S×S and scale to [0, 1]; no further normalisation.
    """
    image = _resize_image(flow_rgb, size).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def postprocess_probability(
    probability: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Model output → frame: (S, S) foreground probability → (float32 (H, W) probability, bool (H, W) mask).

    Bilinear resize to the frame's height × width, then foreground where probability > 0.5.
    """
    probability = np.asarray(probability, np.float32)
    if probability.ndim != 2:
        raise ValueError(f"expected an (S, S) probability map, got shape {probability.shape}")
    if probability.shape != (height, width):
        probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
    return probability, probability > MASK_THRESHOLD
