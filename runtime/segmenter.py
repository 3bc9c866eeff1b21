"""One video's segmentation state: the stage chain, the memory bank and its admission policy, frame in -> mask out.

Torch-free. Per frame (SPEC §4.3): render the flow field -> pre-process -> encoder -> ima -> decoder against
the memory bank -> probability -> mask -> memory update. Where the flow comes from (the offline look-ahead or
the live look-back) is the caller's business (`dpa.runtime.flow.offline_flow` / `live_flow`): the segmenter
takes the flow field of the frame.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from dpa.errors import DpaError
from dpa.runtime.chain import StageChain
from dpa.runtime.flow import flow_to_rgb
from dpa.runtime.memory import OfflinePolicy, UniformPolicy, mask_confidence
from dpa.runtime.preprocess import postprocess_probability, preprocess_flow, preprocess_rgb


@dataclass
class FrameResult:
    """What one processed frame gives.

    probability: float32 (H, W) at the frame's resolution; mask: bool (H, W) (probability > 0.5);
    seconds: stage -> wall seconds (flow: rendering the field, pre, encoder, ima, decoder, ifa_memory when run,
    post);
    admitted: the memory slot the frame was written to, or None; values: every pipeline value of the frame
    by source name ("encoder/f1", …) when the segmenter keeps them, else empty.
    """

    probability: np.ndarray
    mask: np.ndarray
    confidence: float
    seconds: dict[str, float]
    admitted: int | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)


def timed_model_inputs(frame: np.ndarray, flow: np.ndarray, size: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """`Segmenter.model_inputs` with its stage times: rgb, flow (3, S, S) float32 and {"flow": the rendering of
    the flow field, "pre": the resizing and normalisation}, in seconds."""
    started = time.perf_counter()
    flow_image = flow_to_rgb(flow)
    rendered = time.perf_counter()
    rgb, flow_input = preprocess_rgb(frame, size), preprocess_flow(flow_image, size)
    return rgb, flow_input, {"flow": rendered - started, "pre": time.perf_counter() - rendered}


class Segmenter:
    """Segments the frames of one video in order. `chain` runs the graphs (any backend).

    policy: `UniformPolicy` (live: the segmenter admits frames as it goes) or `OfflinePolicy` (the caller
    first gives the reference frames to `prime`, then every frame to `segment`); None for configurations
    without IFA. keep_values: keep every intermediate tensor in the results (for `dpa compare`).
    """

    def __init__(self, chain: StageChain, policy: UniformPolicy | OfflinePolicy | None, keep_values: bool = False):
        self.chain = chain
        self.size: int = chain.manifest.size
        self.policy = policy
        self.keep_values = keep_values
        self.bank = chain.new_bank() if chain.memory else None
        if self.bank is not None and policy is not None and policy.capacity > self.bank.capacity:
            raise DpaError(f"memory policy capacity {policy.capacity} exceeds the graphs' {self.bank.capacity}; "
                           f"re-export with --memory {policy.capacity}")
        if isinstance(policy, OfflinePolicy) and policy.capacity != self.bank.capacity:
            raise DpaError(f"the offline policy fills all {self.bank.capacity} slots of the graphs' memory, "
                           f"got a policy of {policy.capacity}")

    def model_inputs(self, frame: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB frame (H, W, 3) and its flow field (H, W, 2) -> model inputs rgb, flow (3, S, S) float32."""
        return preprocess_rgb(frame, self.size), preprocess_flow(flow_to_rgb(flow), self.size)

    def prime(self, references: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Offline policy: write the memory entry of every reference frame.

        references: frame index -> (frame uint8 (H, W, 3), flow field (H, W, 2)), for every index in
        `policy.references`. Returns stage -> seconds spent.
        """
        if not isinstance(self.policy, OfflinePolicy):
            raise DpaError("prime() is for the offline policy")
        missing = sorted(set(self.policy.references) - set(references))
        if missing:
            raise DpaError(f"reference frames {missing} were not given")
        started = time.perf_counter()
        inputs = {index: self.model_inputs(*references[index]) for index in set(self.policy.references)}
        return {"pre": time.perf_counter() - started, **self.prime_inputs(inputs)}

    def prime_inputs(self, inputs: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """`prime` from model inputs already made (frame index -> rgb, flow (3, S, S) float32); stage -> seconds."""
        if not isinstance(self.policy, OfflinePolicy):
            raise DpaError("prime() is for the offline policy")
        self.chain.reset_seconds()
        for index in sorted(set(self.policy.references)):
            entry = self.chain.memory_entry(self.chain.frame_values(*inputs[index]))
            for slot in self.policy.slots_of(index):
                self.bank.write(slot, entry)
        return self.chain.reset_seconds()

    def segment(self, frame: np.ndarray, flow: np.ndarray, index: int) -> FrameResult:
        """Segment frame number `index` (uint8 RGB (H, W, 3)) given its flow field (H, W, 2); with the uniform
        policy, admit it to the memory when the policy says so."""
        rgb, flow_input, seconds = timed_model_inputs(frame, flow, self.size)
        return self.segment_inputs(rgb, flow_input, frame.shape[:2], index, seconds)

    def segment_inputs(self, rgb: np.ndarray, flow: np.ndarray, frame_size: tuple[int, int], index: int,
                       seconds: dict[str, float] | None = None) -> FrameResult:
        """`segment` from model inputs already made by `model_inputs` (rgb, flow (3, S, S) float32) for a frame of
        frame_size = (height, width); for callers that run several engines on the same inputs. `seconds`: stage
        times spent so far, added to the result's."""
        seconds = dict(seconds or {})
        self.chain.reset_seconds()
        values = self.chain.process(rgb, flow, self.bank)
        probability = self.chain.probability(values)
        if not np.isfinite(probability).all():
            raise DpaError(f"frame {index}: the probability map has NaN or Inf values "
                           f"({int(np.count_nonzero(~np.isfinite(probability)))} of {probability.size}); "
                           "the engine or its precision variant is broken — compare it with `dpa compare`")
        started = time.perf_counter()
        full, mask = postprocess_probability(probability, *frame_size)
        confidence = mask_confidence(probability)
        seconds["post"] = time.perf_counter() - started
        admitted = None
        if self.bank is not None and isinstance(self.policy, UniformPolicy):
            decision = self.policy.consider(index, confidence)
            if decision is not None:
                self.bank.write(decision.slot, self.chain.memory_entry(values))
                admitted = decision.slot
        seconds.update(self.chain.reset_seconds())
        return FrameResult(full, mask, confidence, seconds, admitted,
                           self.chain.download(values) if self.keep_values else {})

    def reset(self) -> None:
        """Empty the memory (a caps change or a reconnect): the next frame references itself."""
        if self.bank is not None:
            self.bank.clear()
        if isinstance(self.policy, UniformPolicy):
            self.policy.reset()


def segment_clip_offline(
    chain: StageChain, frames: list[np.ndarray], flows: list[np.ndarray], keep_values: bool = False, progress=None
) -> tuple[list[FrameResult], OfflinePolicy | None]:
    """Offline inference of a whole clip in memory with the paper's reference sampling.

    frames: uint8 RGB (H, W, 3); flows: their flow fields (H, W, 2), offline direction (`offline_flow`).
    progress: an optional callable run after each frame. Returns the results per frame and the policy.
    """
    if len(frames) != len(flows) or not frames:
        raise DpaError(f"need one flow per frame, got {len(frames)} frames and {len(flows)} flows")
    policy = OfflinePolicy(len(frames), chain.memory.capacity) if chain.memory else None
    segmenter = Segmenter(chain, policy, keep_values=keep_values)
    if policy is not None:
        segmenter.prime({i: (frames[i], flows[i]) for i in set(policy.references)})
    results = []
    for index, (frame, flow) in enumerate(zip(frames, flows, strict=True)):
        results.append(segmenter.segment(frame, flow, index))
        if progress is not None:
            progress()
    return results, policy
