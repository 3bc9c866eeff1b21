"""The IFA memory: the bank (fixed capacity N, preallocated tensors, validity mask) and the policies that decide
which frames enter it, offline (the paper's sampling) and live (uniform over a horizon). Torch-free.

A policy only decides, frame by frame, whether the frame just processed is admitted and into which slot. An
empty bank makes the chain use the current frame as its own reference (SPEC §4.3), so no policy has to
special-case the first frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpa.errors import DpaError
from dpa.manifest import Manifest
from dpa.runtime.engine import HOST, Transfer
from dpa.sampling import frames_for_references

POLICIES = ("uniform", "offline")


class MemoryBank:
    """The IFA memory: per bank tensor a preallocated (1, N, T, D) array, and the validity mask (1, N).

    Slots are written with a frame's entry (the memory graph's outputs) and cleared by setting their validity to 0;
    a cleared slot's old contents stay and are ignored exactly by the decoder. The bank is kept in host memory
    (`tensors`, `valid`) and, through `transfer`, as the engine's own tensors: they are uploaded again only after
    the bank changed (an admission), so a frame that only reads the memory moves none of it.
    """

    def __init__(self, manifest: Manifest, transfer: Transfer = HOST):
        memory = manifest.pipeline.memory
        if memory is None:
            raise DpaError(f"config {manifest.config_name} has no IFA: it has no memory bank")
        decoder = {tensor.name: tensor for tensor in manifest.graphs["decoder"].inputs}
        self.capacity: int = memory.capacity
        self.bank_to_entry: dict[str, str] = dict(memory.bank)
        self.valid_name: str = memory.valid
        # An engine computing in another floating type (a float64 reference) keeps its entries in that type.
        dtype = getattr(transfer, "host_dtype", None)
        self.tensors = {name: np.zeros(decoder[name].shape, dtype or decoder[name].numpy_dtype)
                        for name in self.bank_to_entry}
        self.valid = np.zeros(decoder[self.valid_name].shape, decoder[self.valid_name].numpy_dtype)
        self.transfer = transfer
        self._resident: dict[str, Any] | None = None

    @property
    def count(self) -> int:
        """Number of valid slots."""
        return int(np.count_nonzero(self.valid))

    def write(self, slot: int, entry: Mapping[str, Any]) -> None:
        """Store a frame's entry (entry output name -> (1, T, D), host array or engine tensor) in `slot` and mark it
        valid."""
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} outside a memory of {self.capacity} slots")
        for bank_name, entry_name in self.bank_to_entry.items():
            self.tensors[bank_name][:, slot] = self.transfer.download(entry[entry_name])
        self.valid[:, slot] = 1
        self._resident = None

    def clear(self, slot: int | None = None) -> None:
        """Mark one slot (or every slot) empty."""
        if slot is None:
            self.valid[:] = 0
        else:
            self.valid[:, slot] = 0
        self._resident = None

    def host_sources(self) -> dict[str, np.ndarray]:
        """The bank as pipeline values, "memory/<bank tensor>" and "memory/<valid>", as host arrays."""
        return {f"memory/{name}": array for name, array in {**self.tensors, self.valid_name: self.valid}.items()}

    def sources(self) -> dict[str, Any]:
        """The bank as pipeline values in the engine's memory (uploaded again only after a change)."""
        if self._resident is None:
            self._resident = {name: self.transfer.upload(array) for name, array in self.host_sources().items()}
        return self._resident


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
