"""Optical flow for DPA's motion stream: estimators, frame-pair direction, and the RAFT colour rendering.

Torch-free. The rendering (`flow_to_rgb`) is the one used by the public pre-processed datasets (RAFT's
`flow_viz.flow_to_image`, SPEC §2.7); training data, offline inference and the live runtime all go
through it. Which frame pair a frame's flow comes from (SPEC §4.3):

- `offline_flow` — training data (`dpa flow`, `dpa synth`) and offline inference on a file: forward flow
  t→t+1; the last frame, having no successor, uses the negated backward flow −flow(t→t−1).
- `live_flow` — live streams, which cannot look ahead: −flow(t→t−1), anchored on frame t; the first
  frame gets zero flow.

At which resolution (SPEC §3, one definition for training data, offline inference and the runtime): a model of
input size S sees `model_flow_estimator(S)`, DIS on the two frames resized to S×S. The field stays on that S×S
grid, its vectors measured in pixels of the frames (so directions are those of the frames, as when the flow is
computed at full resolution), and is rendered there: at 854×480, DIS costs ~200 ms and the rendering ~20 ms,
at 224×224 about 2 and 3 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import cv2
import numpy as np

from dpa.errors import DpaError

# The Middlebury colour wheel's six ramps, 55 hues in all: (name, length, the channel held at 255,
# the channel that ramps, whether it rises 0→255 or falls 255→0). Channels: 0 = R, 1 = G, 2 = B.
WHEEL_RAMPS = (
    ("RY", 15, 0, 1, True),  # red → yellow
    ("YG", 6, 1, 0, False),  # yellow → green
    ("GC", 4, 1, 2, True),  # green → cyan
    ("CB", 11, 2, 1, False),  # cyan → blue
    ("BM", 13, 2, 0, True),  # blue → magenta
    ("MR", 6, 0, 2, False),  # magenta → red
)

RADIUS_EPSILON = 1e-5  # added to the maximum flow radius before normalising (RAFT's value)


def make_colorwheel() -> np.ndarray:
    """The Middlebury colour wheel as RAFT builds it: (55, 3) float64, RGB, values 0..255.

    Each ramp of length n moves one channel between 0 and 255 in steps of floor(255·i/n), i = 0..n−1,
    while another channel stays at 255.
    """
    wheel = np.zeros((sum(ramp[1] for ramp in WHEEL_RAMPS), 3))
    start = 0
    for _, length, full_channel, ramp_channel, rising in WHEEL_RAMPS:
        rows = slice(start, start + length)
        steps = np.floor(255 * np.arange(length) / length)
        wheel[rows, full_channel] = 255
        wheel[rows, ramp_channel] = steps if rising else 255 - steps
        start += length
    return wheel


_COLORWHEEL = make_colorwheel()
_WHEEL_UNIT = _COLORWHEEL / 255.0  # (55, 3) in [0, 1]


def flow_to_rgb(flow: np.ndarray) -> np.ndarray:
    """Render a flow field as RAFT's `flow_viz.flow_to_image` does, byte for byte (SPEC §2.7).

    flow: (H, W, 2) float, (u, v) = (x, y) displacement in pixels. Returns (H, W, 3) uint8 RGB.
    The flow is divided by its maximum radius + 1e-5, so only directions and relative magnitudes show;
    zero flow renders white. Arithmetic follows RAFT's dtypes: the normalised flow, radius, angle and
    wheel position stay in the flow's precision (float32 for float32 input), the colour in float64.
    """
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H, W, 2), got {flow.shape}")
    if flow.dtype not in (np.float32, np.float64):
        flow = flow.astype(np.float32)
    dtype = flow.dtype.type
    u, v = flow[..., 0], flow[..., 1]
    radius_max = np.max(np.sqrt(np.square(u) + np.square(v))) if flow.size else dtype(0)
    if not np.isfinite(radius_max):
        raise ValueError("flow contains NaN or infinite values; the estimator failed on this frame pair")
    scale = radius_max + dtype(RADIUS_EPSILON)
    u = u / scale
    v = v / scale

    wheel_size = _WHEEL_UNIT.shape[0]
    radius = np.sqrt(np.square(u) + np.square(v))  # (H, W) normalised radius, ≤ 1 up to rounding
    angle = np.arctan2(-v, -u) / dtype(np.pi)  # (H, W) in [−1, 1]
    position = (angle + dtype(1)) / dtype(2) * dtype(wheel_size - 1)  # (H, W) in [0, 54]
    k0 = np.floor(position).astype(np.int32)
    k1 = (k0 + 1) % wheel_size
    fraction = (position - k0)[..., None]  # float64, as in RAFT (float32 − int32 promotes)
    # In-place arithmetic (same operations, same order as RAFT): large temporaries cost more than the maths.
    colour = np.take(_WHEEL_UNIT, k0, axis=0)  # (H, W, 3) in [0, 1]
    colour *= 1 - fraction
    upper = np.take(_WHEEL_UNIT, k1, axis=0)
    upper *= fraction
    colour += upper
    radius = radius[..., None]
    outside = np.broadcast_to(radius > 1, colour.shape)  # only reachable through rounding after normalising
    dimmed = colour[outside] * 0.75
    np.subtract(1, colour, out=colour)  # towards white at the centre: 1 − r·(1 − colour)
    colour *= radius
    np.subtract(1, colour, out=colour)
    colour[outside] = dimmed
    colour *= 255
    return np.floor(colour, out=colour).astype(np.uint8)


class FlowEstimator(Protocol):
    """Dense optical flow between two frames of the same size.

    `estimator(frame_from, frame_to)`: uint8 (H, W, 3) RGB frames → float32 (h, w, 2) flow from→to in
    pixels of the frames: frame_from at (x, y) moves to (x + u, y + v) in frame_to. (h, w) is the estimator's
    working grid: the frames' own (H, W) unless it works at another size.
    """

    name: str

    def __call__(self, frame_from: np.ndarray, frame_to: np.ndarray) -> np.ndarray: ...


DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class DISFlow:
    """OpenCV's Dense Inverse Search flow on the grayscale frames (SPEC §4.3's default estimator).

    preset: "ultrafast", "fast" (default) or "medium" (slower, smoother).
    size: working resolution, None (the frames' own), an int S (S×S) or (width, height). The frames are
    resized there (area interpolation) and the flow is returned on that grid, its vectors rescaled to pixels
    of the frames.
    One instance holds one OpenCV object: not for concurrent use from several threads.
    """

    name = "dis"

    def __init__(self, preset: str = "fast", size: int | tuple[int, int] | None = None):
        if preset not in DIS_PRESETS:
            raise DpaError(f"unknown DIS preset {preset!r}; choose one of {', '.join(DIS_PRESETS)}")
        if isinstance(size, int):
            size = (size, size)
        if size is not None and (len(size) != 2 or min(size) < 8):
            raise DpaError(f"DIS working size must be at least 8×8 pixels, got {size}")
        self.preset = preset
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])

    def __repr__(self) -> str:
        return f"DISFlow(preset={self.preset!r}, size={self.size})"

    def __call__(self, frame_from: np.ndarray, frame_to: np.ndarray) -> np.ndarray:
        if frame_from.shape != frame_to.shape:
            raise ValueError(f"flow needs frames of one size, got {frame_from.shape} and {frame_to.shape}")
        height, width = frame_from.shape[:2]
        gray_from = _to_gray(frame_from)
        gray_to = _to_gray(frame_to)
        if self.size is None or self.size == (width, height):
            return self._dis.calc(gray_from, gray_to, None)
        work_width, work_height = self.size
        gray_from = cv2.resize(gray_from, self.size, interpolation=cv2.INTER_AREA)
        gray_to = cv2.resize(gray_to, self.size, interpolation=cv2.INTER_AREA)
        flow = self._dis.calc(gray_from, gray_to, None)
        flow[..., 0] *= width / work_width
        flow[..., 1] *= height / work_height
        return flow


def _to_gray(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


DEFAULT_PRESET = "fast"


def model_flow_estimator(size: int, preset: str = DEFAULT_PRESET) -> DISFlow:
    """The flow a model of input size S sees (module doc): DIS on the frames resized to S×S."""
    return DISFlow(preset, size=size)


def flow_size_estimator(flow_size: int | None, model_size: int, preset: str = DEFAULT_PRESET) -> DISFlow:
    """DIS for a `--flow-size` option: None, the model's input size S (`model_flow_estimator`); 0, the frames' own
    size; else flow_size × flow_size."""
    return DISFlow(preset) if flow_size == 0 else model_flow_estimator(flow_size or model_size, preset)


# Estimators the torch-free runtime has; `dpa flow` adds RAFT on the training side where torchvision is.
FLOW_ESTIMATORS: dict[str, Callable[..., FlowEstimator]] = {"dis": DISFlow}


def create_flow_estimator(name: str, **options) -> FlowEstimator:
    """An estimator by name, e.g. `create_flow_estimator("dis", preset="fast")`."""
    if name not in FLOW_ESTIMATORS:
        raise DpaError(f"unknown flow estimator {name!r}; available: {', '.join(sorted(FLOW_ESTIMATORS))}")
    try:
        return FLOW_ESTIMATORS[name](**options)
    except TypeError as error:
        raise DpaError(f"bad options for flow estimator {name!r}: {error}") from error


def zero_flow(frame: np.ndarray, estimator: FlowEstimator | None = None) -> np.ndarray:
    """Float32 zeros for a frame with no neighbour (renders white), on the estimator's working grid when it has
    one (`DISFlow.size`), else (H, W, 2) of the frame."""
    grid = getattr(estimator, "size", None)
    shape = (grid[1], grid[0]) if grid else frame.shape[:2]
    return np.zeros((*shape, 2), np.float32)


def offline_flow(frames: Sequence[np.ndarray], index: int, estimator: FlowEstimator) -> np.ndarray:
    """Flow of frames[index] when the whole clip is available (training data, offline inference).

    Forward flow frames[t]→frames[t+1]; the last frame uses −flow(t→t−1); a one-frame clip gets zero
    flow. Any window of consecutive frames that holds the frame's neighbours gives the same result, so
    streaming code may pass a window of up to three frames. Returns (H, W, 2) float32.
    """
    count = len(frames)
    if not 0 <= index < count:
        raise IndexError(f"frame index {index} outside a clip of {count} frames")
    if index + 1 < count:
        return estimator(frames[index], frames[index + 1])
    if index > 0:
        return -estimator(frames[index], frames[index - 1])
    return zero_flow(frames[index], estimator)


def live_flow(previous: np.ndarray | None, current: np.ndarray, estimator: FlowEstimator) -> np.ndarray:
    """Flow of the current live frame: −flow(current→previous), zero for the first frame (previous None).

    Anchored on the current frame like `offline_flow`'s last frame, and pointing forward in time like
    the forward flow the model was trained on. Returns (H, W, 2) float32.
    """
    if previous is None:
        return zero_flow(current, estimator)
    return -estimator(current, previous)
