"""How far an array is from its reference, accumulated over frames: the one error measure of `dpa check` and
`dpa compare` (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpa.errors import DpaError


@dataclass
class TensorError:
    """One tensor's error against the reference, accumulated over frames.

    max_abs: worst |actual - reference|; mean_abs: mean over frames of the mean |difference|; scale: the
    reference's largest magnitude; cosine_min / cosine_mean: cosine similarity of the flattened tensors.
    """

    max_abs: float = 0.0
    mean_abs_sum: float = 0.0
    scale: float = 0.0
    cosine_min: float = 1.0
    cosine_sum: float = 0.0
    frames: int = 0

    def add(self, actual: np.ndarray, expected: np.ndarray) -> None:
        actual = np.asarray(actual, np.float64).ravel()
        expected = np.asarray(expected, np.float64).ravel()
        if actual.shape != expected.shape:
            raise DpaError(f"shape mismatch against the reference: {actual.shape} vs {expected.shape}")
        difference = np.abs(actual - expected)
        finite = bool(np.isfinite(difference).all())
        self.max_abs = max(self.max_abs, float(difference.max(initial=0.0)) if finite else math.inf)
        self.mean_abs_sum += float(difference.mean()) if finite else math.inf
        self.scale = max(self.scale, float(np.abs(expected).max(initial=0.0)))
        norms = np.linalg.norm(actual) * np.linalg.norm(expected)
        cosine = float(actual @ expected / norms) if norms > 0 else float(np.array_equal(actual, expected))
        cosine = cosine if np.isfinite(cosine) else -1.0
        self.cosine_min = min(self.cosine_min, cosine)
        self.cosine_sum += cosine
        self.frames += 1

    @property
    def relative(self) -> float:
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else math.inf

    def to_dict(self) -> dict:
        frames = max(self.frames, 1)
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs_sum / frames, "relative": self.relative,
                "scale": self.scale, "cosine_min": self.cosine_min, "cosine_mean": self.cosine_sum / frames,
                "frames": self.frames}
