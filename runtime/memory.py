"""Which frames enter the IFA memory bank: the offline (paper) and live (uniform over a horizon) policies.

Torch-free. The bank itself (fixed capacity N, preallocated tensors, validity mask) is
`dpa.runtime.chain.MemoryBank`; a policy only decides, frame by frame, whether the frame just processed
is admitted and into which slot. An empty bank makes the chain use the current frame as its own
reference (SPEC §4.3), so no policy has to special-case the first frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dpa.errors import DpaError

POLICIES = ("uniform", "offline")


def frames_for_references(length: int, memory: int) -> list[int]:
    """The paper's reference sampling over a video of `length` frames: k_i = floor(i (L-1) / (N-1)).

    Returns N frame indices, slot i holding frame k_i (repeats when L < N, as in the paper's code).
    """
    if length < 1 or memory < 1:
        raise ValueError(f"need a video of at least one frame and a memory of at least one slot, "
                         f"got length {length}, memory {memory}")
    if memory == 1:
        return [0]
    return [math.floor(i * (length - 1) / (memory - 1)) for i in range(memory)]


def mask_confidence(probability: np.ndarray) -> float:
    """How sure a probability map (any shape, values in [0, 1]) is: mean over pixels of max(p, 1 - p), in [0.5, 1]."""
    probability = np.asarray(probability, np.float32)
    return float(np.mean(np.maximum(probability, 1.0 - probability)))


@dataclass
class Admission:
    """A policy's decision for one frame: write its memory entry into `slot`."""

    slot: int


class OfflinePolicy:
    """The paper's sampling over a whole file of `length` frames (two passes: references first, then every frame).

    `references` lists the frame of every slot; `slots_of(frame)` the slots a frame fills (several when
    L < N). The runtime computes these entries before processing the first frame, so every frame is
    decoded against the same complete memory, exactly like the PyTorch offline inference.
    """

    name = "offline"

    def __init__(self, length: int, capacity: int):
        self.length = length
        self.capacity = capacity
        self.references = frames_for_references(length, capacity)

    def slots_of(self, frame: int) -> list[int]:
        return [slot for slot, reference in enumerate(self.references) if reference == frame]

    def describe(self) -> dict:
        return {"policy": self.name, "capacity": self.capacity, "length": self.length, "references": self.references}


class UniformPolicy:
    """Live default: entries spread evenly over the last `horizon` frames, at most `capacity` of them.

    A frame is admitted when at least `stride` = ceil(horizon / capacity) frames have passed since the
    last admission (the first frame always is); the new entry replaces the oldest, so the bank holds
    frames about `stride` apart covering the last `horizon` frames. With `min_confidence`, a frame whose
    mask confidence (`mask_confidence`) is below it is not admitted and the next frame is tried instead;
    `rejected` counts those.
    """

    name = "uniform"

    def __init__(self, capacity: int, horizon: int, min_confidence: float | None = None):
        if capacity < 1:
            raise DpaError(f"memory capacity must be at least 1, got {capacity}")
        if horizon < 1:
            raise DpaError(f"memory horizon must be at least 1 frame, got {horizon}")
        if min_confidence is not None and not 0.5 <= min_confidence <= 1.0:
            raise DpaError(f"--min-confidence must be in [0.5, 1] (mean of max(p, 1-p)), got {min_confidence}")
        self.capacity = capacity
        self.horizon = horizon
        self.stride = max(1, math.ceil(horizon / capacity))
        self.min_confidence = min_confidence
        self.slot_frames: list[int | None] = [None] * capacity  # frame index held by each slot
        self.rejected = 0
        self._last_admitted: int | None = None

    def consider(self, frame: int, confidence: float | None = None) -> Admission | None:
        """Decide for the frame just processed (index `frame`, increasing); returns where to write it, or None."""
        if self._last_admitted is not None and frame - self._last_admitted < self.stride:
            return None
        if self.min_confidence is not None:
            if confidence is None:
                raise ValueError("a gated policy needs the frame's mask confidence")
            if confidence < self.min_confidence:
                self.rejected += 1
                return None
        slot = self._oldest_slot()
        self.slot_frames[slot] = frame
        self._last_admitted = frame
        return Admission(slot)

    def reset(self) -> None:
        """Forget every admission (after a caps change or a reconnect: the old entries no longer match)."""
        self.slot_frames = [None] * self.capacity
        self._last_admitted = None

    def _oldest_slot(self) -> int:
        for slot, held in enumerate(self.slot_frames):
            if held is None:
                return slot
        return min(range(self.capacity), key=lambda slot: self.slot_frames[slot])

    def describe(self) -> dict:
        return {"policy": self.name, "capacity": self.capacity, "horizon": self.horizon, "stride": self.stride,
                "min_confidence": self.min_confidence, "rejected": self.rejected,
                "slot_frames": list(self.slot_frames)}
