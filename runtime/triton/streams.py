"""The state of the `dpa` sequence model: one segmenter (memory bank + admission policy) per stream.

Triton's sequence batcher sends every request of a stream (one correlation ID) to the same model instance with
START on its first request and END on its last; a stream that goes silent is ended by the batcher's idle timeout
without telling the model, so streams idle for longer than that are swept on the next request. The stage graphs
are shared by every stream: only the memory is per stream, which is what makes the streams independent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpa.errors import DpaError
from dpa.runtime.chain import StageChain
from dpa.runtime.memory import UniformPolicy
from dpa.runtime.segmenter import Segmenter

NO_SLOT = -1  # ADMITTED when the frame was not written to the memory


@dataclass(frozen=True)
class PolicySettings:
    """The admission policy a stream asks for with its first request (the `POLICY` input: slots, horizon,
    minimum confidence; 0 for no confidence gate)."""

    slots: int
    horizon: int
    min_confidence: float | None

    @classmethod
    def from_array(cls, values: np.ndarray) -> PolicySettings:
        slots, horizon, confidence = (float(v) for v in np.asarray(values, np.float32).ravel()[:3])
        return cls(int(slots), int(horizon), confidence if confidence > 0 else None)

    def to_array(self) -> np.ndarray:
        return np.array([self.slots, self.horizon, self.min_confidence or 0.0], np.float32)


@dataclass
class StepResult:
    probability: np.ndarray  # float32 (S, S)
    admitted: int  # memory slot written, or NO_SLOT
    seconds: dict[str, float]


class Streams:
    """Segmenters by stream ID over one shared `chain`; `idle_seconds`: the batcher's idle timeout."""

    def __init__(self, chain: StageChain, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.chain = chain
        self.size = chain.manifest.size
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.segmenters: dict[int, Segmenter] = {}
        self.last_seen: dict[int, float] = {}

    def step(self, stream: int, start: bool, rgb: np.ndarray, flow: np.ndarray, index: int,
             policy: PolicySettings) -> StepResult:
        """Segment frame `index` of `stream` (model inputs rgb, flow (3, S, S) float32); START (or an unknown
        stream) begins it with an empty memory under `policy`."""
        if start or stream not in self.segmenters:
            self.segmenters[stream] = Segmenter(self.chain, self._policy(policy))
        self.last_seen[stream] = self.clock()
        result = self.segmenters[stream].segment_inputs(rgb, flow, (self.size, self.size), index)
        admitted = NO_SLOT if result.admitted is None else result.admitted
        return StepResult(result.probability, admitted, result.seconds)

    def _policy(self, settings: PolicySettings) -> UniformPolicy | None:
        memory = self.chain.memory
        if memory is None:
            return None
        if not 1 <= settings.slots <= memory.capacity:
            raise DpaError(f"a stream asked for {settings.slots} memory slots; the graphs hold 1 to "
                           f"{memory.capacity}")
        return UniformPolicy(settings.slots, settings.horizon, settings.min_confidence)

    def end(self, stream: int) -> None:
        """Forget a stream (its END request was answered)."""
        self.segmenters.pop(stream, None)
        self.last_seen.pop(stream, None)

    def sweep(self) -> list[int]:
        """Forget the streams silent for longer than the idle timeout (the batcher has ended them); their IDs."""
        now = self.clock()
        stale = [stream for stream, seen in self.last_seen.items() if now - seen > self.idle_seconds]
        for stream in stale:
            self.end(stream)
        return stale
