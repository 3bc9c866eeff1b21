"""Procedural video clips with exact masks (SPEC §3): data for tests, the demo, the tiny model, `test://synthetic`.

A clip is a textured background seen by a moving, slightly zooming camera, with one or two textured
objects moving on their own smooth paths in front of it (the later one occludes the earlier one where
they cross). Some objects take their colours from the background palette, so colour alone does not
separate them and the motion stream has to help. Generation is numpy + OpenCV only (no torch), so the
runtime's `test://` source can use `generate_clip` directly; everything follows from the random generator.
`dpa synth` (`dpa.training.synth`) writes such clips as a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dpa.errors import DpaError

REFERENCE_SIZE = 128  # speeds and texture scales below are in pixels of a 128-pixel frame
CANVAS_SCALE = 1.7  # background canvas side / frame side: room for the camera to move and zoom
MAX_ZOOM_CHANGE = 0.05  # camera zoom stays within 1 ± this
CAMOUFLAGE_PROBABILITY = 0.35  # an object takes its colours from the background palette
TWO_OBJECTS_PROBABILITY = 0.5
SHAPES = ("blob", "ellipse", "polygon")
MIN_SIZE = 16  # frame side, pixels


@dataclass(frozen=True)
class Trajectory:
    """A smooth Lissajous path: position(t) = centre + amplitude·sin(angular_speed·t + phase), per axis.

    All arrays are (2,) = (x, y) in frame pixels, radians per frame and radians; t counts frames.
    """

    centre: np.ndarray
    amplitude: np.ndarray
    angular_speed: np.ndarray
    phase: np.ndarray

    def at(self, t: float) -> np.ndarray:
        return self.centre + self.amplitude * np.sin(self.angular_speed * t + self.phase)


@dataclass(frozen=True)
class SceneObject:
    """A foreground object: its sprite and how it moves.

    texture: uint8 (D, D, 3) RGB; silhouette: float32 (D, D), 1 inside the shape, 0 outside.
    path: where the sprite's centre is in the frame; angle(t) = angle + spin·t (degrees);
    scale(t) = 1 + pulse·sin(pulse_speed·t + pulse_phase).
    """

    texture: np.ndarray
    silhouette: np.ndarray
    path: Trajectory
    angle: float
    spin: float
    pulse: float
    pulse_speed: float
    pulse_phase: float

    def transform(self, t: float) -> np.ndarray:
        """(2, 3) affine matrix taking sprite pixels to frame pixels at frame t."""
        side = self.silhouette.shape[0]
        scale = 1 + self.pulse * np.sin(self.pulse_speed * t + self.pulse_phase)
        matrix = cv2.getRotationMatrix2D((side / 2, side / 2), self.angle + self.spin * t, scale)
        matrix[:, 2] += self.path.at(t) - side / 2
        return matrix


@dataclass(frozen=True)
class SyntheticScene:
    """Everything that defines a clip; `render(t)` draws frame t.

    canvas: uint8 (C, C, 3) RGB background; camera: the frame centre's path on the canvas;
    zoom(t) = 1 + zoom_amplitude·sin(zoom_speed·t + zoom_phase); objects: back to front.
    """

    size: int
    canvas: np.ndarray
    camera: Trajectory
    zoom_amplitude: float
    zoom_speed: float
    zoom_phase: float
    objects: tuple[SceneObject, ...]

    def background(self, t: int) -> np.ndarray:
        """uint8 (S, S, 3): the background alone as the camera sees it at frame t."""
        zoom = 1 + self.zoom_amplitude * np.sin(self.zoom_speed * t + self.zoom_phase)
        centre_x, centre_y = self.camera.at(t)
        matrix = np.array([[zoom, 0, self.size / 2 - zoom * centre_x],
                           [0, zoom, self.size / 2 - zoom * centre_y]])
        return cv2.warpAffine(self.canvas, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)

    def object_masks(self, t: int) -> list[np.ndarray]:
        """Each object's whole silhouette at frame t, before occlusion: bool (S, S) per object."""
        return [
            cv2.warpAffine(item.silhouette, item.transform(t), (self.size, self.size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0.5
            for item in self.objects
        ]

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t: (uint8 (S, S, 3) RGB, bool (S, S) mask = union of the objects' silhouettes)."""
        frame = self.background(t)
        mask = np.zeros((self.size, self.size), bool)
        for item, silhouette in zip(self.objects, self.object_masks(t), strict=True):
            texture = cv2.warpAffine(item.texture, item.transform(t), (self.size, self.size),
                                     flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            frame[silhouette] = texture[silhouette]
            mask |= silhouette
        return frame, mask


def generate_clip(
    rng: np.random.Generator, frames: int, size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A random clip: `frames` uint8 (size, size, 3) RGB frames and their bool (size, size) masks."""
    scene = sample_scene(rng, size)
    rendered = [scene.render(t) for t in range(frames)]
    return [frame for frame, _ in rendered], [mask for _, mask in rendered]


def sample_scene(rng: np.random.Generator, size: int) -> SyntheticScene:
    """Draw a scene: background palette and texture, camera path, one or two objects."""
    check_size(size)
    unit = size / REFERENCE_SIZE
    background_palette = random_palette(rng, int(rng.integers(3, 6)))
    canvas_side = int(np.ceil(size * CANVAS_SCALE))
    canvas = background_texture(rng, canvas_side, background_palette, unit)

    # The camera's view (at most size / (1 − MAX_ZOOM_CHANGE) wide) stays on the canvas.
    margin = canvas_side / 2 - size / (2 * (1 - MAX_ZOOM_CHANGE))
    camera = random_path(rng, centre=np.full(2, canvas_side / 2), spread=0.0,
                         amplitude=(0.3 * margin, margin), speed=(0.3 * unit, 2.0 * unit))
    objects = []
    for _ in range(2 if rng.random() < TWO_OBJECTS_PROBABILITY else 1):
        camouflaged = rng.random() < CAMOUFLAGE_PROBABILITY
        palette = background_palette[rng.permutation(len(background_palette))[:3]] if camouflaged \
            else random_palette(rng, int(rng.integers(2, 4)))
        objects.append(random_object(rng, size, palette, unit))
    return SyntheticScene(
        size=size,
        canvas=canvas,
        camera=camera,
        zoom_amplitude=float(rng.uniform(0, MAX_ZOOM_CHANGE)),
        zoom_speed=float(rng.uniform(0.05, 0.2)),
        zoom_phase=float(rng.uniform(0, 2 * np.pi)),
        objects=tuple(objects),
    )


def check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise DpaError(f"synthetic frames must be at least {MIN_SIZE} pixels wide, got {size}")


def random_palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) uint8 RGB colours of random hue, saturation and brightness."""
    hsv = np.stack([rng.uniform(0, 180, count), rng.uniform(60, 255, count), rng.uniform(70, 255, count)], -1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def random_path(rng: np.random.Generator, centre: np.ndarray, spread: float, amplitude: tuple[float, float],
                speed: tuple[float, float]) -> Trajectory:
    """A Lissajous path around centre (± spread), with amplitudes and peak speeds (pixels/frame) in ranges."""
    amplitudes = rng.uniform(*amplitude, 2)
    speeds = rng.uniform(*speed, 2)
    return Trajectory(
        centre=centre + rng.uniform(-spread, spread, 2),
        amplitude=amplitudes,
        angular_speed=speeds / np.maximum(amplitudes, 1e-6) * rng.choice([-1, 1], 2),
        phase=rng.uniform(0, 2 * np.pi, 2),
    )


def smooth_noise(rng: np.random.Generator, side: int, cell: float) -> np.ndarray:
    """float32 (side, side) in [0, 1]: random values on a grid of `cell`-pixel cells, interpolated."""
    cells = max(2, int(np.ceil(side / max(cell, 1.0))) + 1)
    grid = rng.random((cells, cells), dtype=np.float32)
    noise = cv2.resize(grid, (side, side), interpolation=cv2.INTER_CUBIC)
    low, high = noise.min(), noise.max()
    return (noise - low) / max(high - low, 1e-6)


def stripes(rng: np.random.Generator, side: int, period: float) -> np.ndarray:
    """float32 (side, side) in [0, 1]: a sinusoidal grating of the given period at a random angle."""
    angle = rng.uniform(0, np.pi)
    coordinates = np.arange(side, dtype=np.float32)
    projection = np.cos(angle) * coordinates[None, :] + np.sin(angle) * coordinates[:, None]
    phase = rng.uniform(0, 2 * np.pi)
    return (0.5 + 0.5 * np.sin(2 * np.pi * projection / period + phase)).astype(np.float32)


def colourise(field: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a [0, 1] field through the palette's colours (piecewise linear): uint8 (side, side, 3) RGB."""
    stops = np.linspace(0, 1, len(palette))
    lookup = np.stack([np.interp(np.linspace(0, 1, 256), stops, palette[:, c]) for c in range(3)], -1)
    return lookup.astype(np.uint8)[np.clip(field * 255, 0, 255).astype(np.uint8)]


def add_grain(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """Static per-pixel grain (it moves with the surface, giving the flow estimator texture to track)."""
    grain = rng.normal(0, strength, image.shape[:2]).astype(np.float32)[..., None]
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def background_texture(rng: np.random.Generator, side: int, palette: np.ndarray, unit: float) -> np.ndarray:
    """uint8 (side, side, 3): smoothed noise at two scales, maybe stripes, blobs of palette colours, grain."""
    field = 0.65 * smooth_noise(rng, side, rng.uniform(12, 40) * unit) \
        + 0.35 * smooth_noise(rng, side, rng.uniform(3, 8) * unit)
    if rng.random() < 0.5:
        field = 0.6 * field + 0.4 * stripes(rng, side, rng.uniform(6, 24) * unit)
    canvas = np.ascontiguousarray(colourise(field, palette))
    for _ in range(int(rng.integers(2, 9))):
        colour = palette[rng.integers(len(palette))] if rng.random() < 0.7 else random_palette(rng, 1)[0]
        centre = (int(rng.integers(side)), int(rng.integers(side)))
        axes = (int(rng.uniform(3, 18) * unit) + 1, int(rng.uniform(3, 18) * unit) + 1)
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, centre, axes, angle, 0, 360, colour.tolist(), -1, cv2.LINE_AA)
    return add_grain(rng, canvas, 6.0)


def random_silhouette(rng: np.random.Generator, side: int, radius: float) -> np.ndarray:
    """float32 (side, side): a random blob, ellipse or polygon of about `radius` centred in the sprite."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    image = np.zeros((side, side), np.uint8)
    centre = np.array([side / 2, side / 2])
    if shape == "ellipse":
        axes = (int(radius), int(radius * rng.uniform(0.45, 1.0)))
        cv2.ellipse(image, (int(centre[0]), int(centre[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        if shape == "blob":  # radius(θ) = R·(1 + Σ a_k cos(kθ + φ_k)), k = 2..4: smooth and star-shaped
            angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            radii = np.ones_like(angles)
            for k in (2, 3, 4):
                radii += rng.uniform(0, 0.18) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
            radii *= radius / radii.max()
        else:  # a polygon of 3–7 corners at jittered, evenly spread angles (so it holds its centre)
            corners = int(rng.integers(3, 8))
            step = 2 * np.pi / corners
            angles = np.arange(corners) * step + rng.uniform(-0.3, 0.3, corners) * step + rng.uniform(0, step)
            radii = radius * rng.uniform(0.65, 1.0, corners)
        points = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], 1)
    return image.astype(np.float32)


def random_object(rng: np.random.Generator, size: int, palette: np.ndarray, unit: float) -> SceneObject:
    """An object of radius 12–24 % of the frame with its own texture, path, spin and pulsing scale."""
    radius = rng.uniform(0.12, 0.24) * size
    side = int(np.ceil(2 * radius * 1.25)) + 4  # room for the pulsing scale
    field = smooth_noise(rng, side, rng.uniform(4, 14) * unit)
    if rng.random() < 0.6:
        field = 0.5 * field + 0.5 * stripes(rng, side, rng.uniform(4, 12) * unit)
    texture = add_grain(rng, colourise(field, palette), 6.0)
    path = random_path(rng, centre=np.full(2, size / 2), spread=0.15 * size,
                       amplitude=(0.12 * size, 0.3 * size), speed=(1.0 * unit, 3.5 * unit))
    return SceneObject(
        texture=texture,
        silhouette=random_silhouette(rng, side, radius),
        path=path,
        angle=float(rng.uniform(0, 360)),
        spin=float(rng.uniform(-3, 3)),
        pulse=float(rng.uniform(0, 0.1)),
        pulse_speed=float(rng.uniform(0.05, 0.3)),
        pulse_phase=float(rng.uniform(0, 2 * np.pi)),
    )


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip `index`: the index-th child of the seed, whatever the number of clips."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
