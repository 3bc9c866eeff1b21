"""Training augmentation (SPEC §3): flip, small crop, rotation and colour jitter, shared by a sample's frames.

One `AugmentParams` is drawn per training sample and applied identically to every frame of it (the query
and its N references, like a camera-consistent transform). Geometry (flip, crop, rotation) is one affine
warp per image, defined in normalised coordinates, so an RGB frame, its flow image and its mask move
together even when their resolutions differ; colour jitter touches the RGB frame only.

Images stay in pixel space here (uint8); ImageNet normalisation happens afterwards, in
`dpa.runtime.preprocess`.

Rendered flow images are warped as images, the way the public DPA/TMO code flips them: a mirrored flow
field would have its horizontal component negated (and a rotated one its vectors rotated), which would
change the colours; we keep the colours and move the pixels, so motion boundaries and layout stay
consistent with the frame while the encoded directions are those of the unaugmented flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# ITU-R 601 luma weights, as torchvision's colour jitter uses for grayscale.
_LUMA = np.asarray((0.2989, 0.587, 0.114), np.float32)
# Fill outside the warped frame after a rotation: black RGB, white flow (zero motion renders white,
# SPEC §2.7), background mask.
_RGB_FILL = (0, 0, 0)
_FLOW_FILL = (255, 255, 255)


@dataclass(frozen=True)
class AugmentConfig:
    """How strong the augmentation is. Defaults follow the public DPA/TMO recipe (SPEC §3).

    flip_probability: chance of a horizontal flip.
    min_crop: smallest kept fraction of each side in the random crop (0 < min_crop <= 1).
    rotation_probability, max_rotation: chance of a rotation, drawn uniformly in ±max_rotation degrees.
    brightness, contrast, saturation: factors drawn uniformly in [1 − x, 1 + x].
    hue: shift drawn uniformly in ±hue, as a fraction of the full hue circle.
    """

    flip_probability: float = 0.5
    min_crop: float = 0.85
    rotation_probability: float = 0.2
    max_rotation: float = 15.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation, applied to all of its frames.

    flip: mirror horizontally (before cropping).
    crop: (x0, y0, width, height) of the kept window, as fractions of the (flipped) frame's width/height.
    rotation: degrees, counter-clockwise on screen about the output centre (0 = no rotation).
    brightness, contrast, saturation: multiplicative factors (1 = unchanged); hue: shift in turns.
    """

    flip: bool = False
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    rotation: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @property
    def changes_colour(self) -> bool:
        return (self.brightness, self.contrast, self.saturation, self.hue) != (1.0, 1.0, 1.0, 0.0)


def draw_augment_params(rng: np.random.Generator, config: AugmentConfig | None = None) -> AugmentParams:
    """Draw one sample's augmentation. Always consumes the same number of random values."""
    config = config or AugmentConfig()
    flip = bool(rng.random() < config.flip_probability)
    width = float(rng.uniform(config.min_crop, 1.0))
    height = float(rng.uniform(config.min_crop, 1.0))
    x0 = float(rng.uniform(0.0, 1.0 - width))
    y0 = float(rng.uniform(0.0, 1.0 - height))
    rotate = bool(rng.random() < config.rotation_probability)
    angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
    brightness = float(rng.uniform(1.0 - config.brightness, 1.0 + config.brightness))
    contrast = float(rng.uniform(1.0 - config.contrast, 1.0 + config.contrast))
    saturation = float(rng.uniform(1.0 - config.saturation, 1.0 + config.saturation))
    hue = float(rng.uniform(-config.hue, config.hue))
    return AugmentParams(
        flip=flip,
        crop=(x0, y0, width, height),
        rotation=angle if rotate else 0.0,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
    )


def warp_matrix(params: AugmentParams, width: int, height: int, size: int) -> np.ndarray:
    """(2, 3) affine map from output pixel (u, v) of the S×S result to source pixel (x, y) of a W×H image.

    Pixel centres are aligned as in `cv2.resize`; for the identity parameters the warp is a plain
    bilinear resize to S×S.
    """
    x0, y0, crop_width, crop_height = params.crop
    to_continuous = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    centre = size / 2.0
    cos, sin = math.cos(math.radians(params.rotation)), math.sin(math.radians(params.rotation))
    rotation = np.array(
        [[cos, -sin, centre - cos * centre + sin * centre], [sin, cos, centre - sin * centre - cos * centre], [0, 0, 1]]
    )
    crop = np.array(
        [
            [crop_width * width / size, 0.0, x0 * width],
            [0.0, crop_height * height / size, y0 * height],
            [0.0, 0.0, 1.0],
        ]
    )
    flip = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if params.flip else np.eye(3)
    to_index = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    return (to_index @ flip @ crop @ rotation @ to_continuous)[:2]


def _warp(image: np.ndarray, params: AugmentParams, size: int, interpolation: int, fill) -> np.ndarray:
    matrix = warp_matrix(params, image.shape[1], image.shape[0], size)
    return cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )


def jitter_colour(rgb: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Brightness, contrast, saturation, hue (in that order, torchvision's formulas) on uint8 (H, W, 3) RGB."""
    if not params.changes_colour:
        return rgb
    image = rgb.astype(np.float32) / np.float32(255)
    image = np.clip(image * params.brightness, 0.0, 1.0)
    mean = float((image @ _LUMA).mean())
    image = np.clip((image - mean) * params.contrast + mean, 0.0, 1.0)
    gray = (image @ _LUMA)[..., None]
    image = np.clip((image - gray) * params.saturation + gray, 0.0, 1.0)
    if params.hue != 0.0:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float32: hue in degrees [0, 360)
        hsv[..., 0] = np.mod(hsv[..., 0] + params.hue * 360.0, 360.0)
        image = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)
    return np.rint(image * 255).astype(np.uint8)


def apply_augment(
    params: AugmentParams,
    rgb: np.ndarray,
    flow_rgb: np.ndarray | None,
    mask: np.ndarray | None,
    size: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply one sample's augmentation to one frame, resizing to S×S.

    rgb: uint8 (H, W, 3) RGB; flow_rgb: uint8 (H', W', 3) rendered flow or None; mask: bool (H'', W'')
    or None (the three may differ in resolution; each is warped over its own full extent).
    Returns (rgb uint8 (S, S, 3), flow uint8 (S, S, 3) | None, mask bool (S, S) | None). RGB and flow are
    interpolated bilinearly, the mask by nearest neighbour; colour jitter touches the RGB only.
    """
    out_rgb = jitter_colour(_warp(rgb, params, size, cv2.INTER_LINEAR, _RGB_FILL), params)
    out_flow = None if flow_rgb is None else _warp(flow_rgb, params, size, cv2.INTER_LINEAR, _FLOW_FILL)
    out_mask = None
    if mask is not None:
        out_mask = _warp(mask.astype(np.uint8), params, size, cv2.INTER_NEAREST, 0) > 0
    return out_rgb, out_flow, out_mask


def augment(
    rgb: np.ndarray,
    flow_rgb: np.ndarray | None,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    size: int,
    config: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Draw an augmentation from `rng` and apply it to one frame (see `apply_augment`).

    For a multi-frame sample draw once with `draw_augment_params` and call `apply_augment` per frame.
    """
    return apply_augment(draw_augment_params(rng, config), rgb, flow_rgb, mask, size)
