"""Offline inference of a checkpoint on whole videos, with the paper's reference sampling (SPEC §3).

For a video of L frames the memory holds the N frames k_i = floor(i (L-1) / (N-1)); each reference's
entry comes from its own f5, computed once. Every frame is then encoded and decoded against that memory. The model
runs as the pytorch backend through the runtime's chain (`dpa.training.torch_engine`), graph by graph like an
export.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from dpa.errors import DpaError
from dpa.images import write_image
from dpa.progress import progress
from dpa.sampling import frames_for_references
from dpa.training.model import DPA

log = logging.getLogger(__name__)


class OfflinePredictor:
    """A model's offline inference over one video in memory, through the runtime's `Segmenter` and `StageChain` on
    the pytorch backend: the paper's reference frames primed into the memory, then every frame against it.
    Inputs are already pre-processed (SPEC §2.1)."""

    def __init__(self, model: DPA, device: str = "cpu"):
        from dpa.runtime.chain import StageChain
        from dpa.training.torch_engine import model_engine

        self.chain = StageChain(model_engine(model, device))

    def references(self, length: int) -> list[int]:
        """The frames whose entries fill the memory for a video of `length` frames (none without IFA)."""
        memory = self.chain.memory
        return frames_for_references(length, memory.capacity) if memory else []

    def predict(self, rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """rgb, flow (L, 3, S, S) float32 pre-processed -> foreground probabilities (L, S, S) float32."""
        from dpa.runtime.memory import OfflinePolicy
        from dpa.runtime.segmenter import Segmenter

        if rgb.shape != flow.shape or rgb.ndim != 4:
            raise DpaError(f"rgb {rgb.shape} and flow {flow.shape} must both be (L, 3, S, S)")
        memory = self.chain.memory
        policy = OfflinePolicy(len(rgb), memory.capacity) if memory else None
        segmenter = Segmenter(self.chain, policy)
        if policy is not None:
            segmenter.prime_inputs({i: (rgb[i], flow[i]) for i in set(policy.references)})
        size = rgb.shape[-2:]
        return np.stack([segmenter.segment_inputs(rgb[i], flow[i], size, i).probability for i in range(len(rgb))])


def render_offline_flow(frames: list[np.ndarray], estimator) -> list[np.ndarray]:
    """Flow images (H, W, 3) uint8 of RGB frames, offline direction (t -> t+1; the last frame -flow(t -> t-1))."""
    from dpa.runtime.flow import flow_to_rgb, offline_flow

    return [flow_to_rgb(offline_flow(frames, i, estimator)) for i in range(len(frames))]


def preprocess_video(
    frames: list[np.ndarray], flow_images: list[np.ndarray], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames and their flow images (uint8) -> model inputs rgb, flow (L, 3, S, S) float32 (SPEC §2.1)."""
    from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb

    rgb = np.stack([preprocess_rgb(frame, size) for frame in frames])
    flow = np.stack([preprocess_flow(image, size) for image in flow_images])
    return rgb, flow


def load_video(sequence, size: int, flow_mode: str = "auto", estimator=None):
    """Read and pre-process every frame of a `VideoSequence`.

    flow_mode: "files" (the sequence's pre-computed flow images; error when missing), "dis" (estimate
    with DIS now at the model's input size, `model_flow_estimator`, offline direction t -> t+1 as the
    training data), "auto" (files when every frame has one, else DIS).
    Returns (rgb (L,3,S,S), flow (L,3,S,S), frames RGB uint8 list, flow source name).
    """
    from dpa.images import read_rgb
    from dpa.runtime.flow import model_flow_estimator

    frames = [read_rgb(path) for path in sequence.rgb]
    have_files = all(path is not None and Path(path).is_file() for path in sequence.flow)
    if flow_mode == "files" and not have_files:
        raise DpaError(f"sequence {sequence.name} has no flow images: run `dpa flow` on the dataset or use --flow dis")
    if flow_mode == "files" or (flow_mode == "auto" and have_files):
        flow_images = [read_rgb(path) for path in sequence.flow]
        source = "files"
    else:
        estimator = estimator or model_flow_estimator(size)
        flow_images = render_offline_flow(frames, estimator)
        source = f"{estimator!r} (offline: forward flow t->t+1)"
    rgb, flow = preprocess_video(frames, flow_images, size)
    return rgb, flow, frames, source


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """`dpa eval --checkpoint CKPT --data DIR`: offline inference on every sequence, scored with DAVIS J/F.

    Masks are predicted at S, resized to the ground truth's resolution (bilinear on the probability)
    and thresholded at 0.5. Returns the `dpa.training.evaluate.summarise` result (plus "flow").
    """
    from dpa.runtime.flow import flow_size_estimator
    from dpa.runtime.preprocess import postprocess_probability
    from dpa.training.checkpoint import load_model
    from dpa.training.evaluate import read_mask, score_sequence, summarise
    from dpa.training.layouts import load_sequences
    from dpa.training.sequences import select_sequences

    model, _ = load_model(args.checkpoint)
    predictor = OfflinePredictor(model, getattr(args, "device", "cpu") or "cpu")
    sequences = load_sequences(args.data, layout=getattr(args, "layout", "auto"), split=getattr(args, "split", "val"),
                               flow_root=getattr(args, "flow_root", None))
    sequences = select_sequences(sequences, getattr(args, "sequences", None), getattr(args, "exclude", None) or ())
    save_dir = Path(args.save_masks) if getattr(args, "save_masks", None) else None
    estimator = flow_size_estimator(getattr(args, "flow_size", None), model.config.size)
    results, sources = {}, set()
    for sequence in progress(sequences, "eval", unit="sequence"):
        if any(mask is None for mask in sequence.masks):
            raise DpaError(f"sequence {sequence.name} lacks ground-truth masks for some frames")
        rgb, flow, _, source = load_video(sequence, model.config.size, getattr(args, "flow", "auto"), estimator)
        sources.add(source)
        probabilities = predictor.predict(rgb, flow)
        triples = []
        for frame, probability, mask_path in zip(sequence.frames, probabilities, sequence.masks, strict=True):
            gt = read_mask(mask_path)
            _, prediction = postprocess_probability(probability, *gt.shape)
            triples.append((frame, gt, prediction))
            if save_dir is not None:
                write_image(save_dir / sequence.name / f"{frame}.png", prediction.astype(np.uint8) * 255)
        results[sequence.name] = score_sequence(triples, args.protocol)
    summary = summarise(results, args.protocol)
    summary["flow"] = sorted(sources)
    summary["checkpoint"] = str(args.checkpoint)
    return summary
