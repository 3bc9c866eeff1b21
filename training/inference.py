"""Offline inference of a checkpoint on whole videos, with the paper's reference sampling (SPEC §3).

For a video of L frames the memory holds the N frames k_i = floor(i (L-1) / (N-1)); each reference's
entry comes from its own f5, computed once. Every frame is then encoded and decoded against that memory.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from dpa.errors import DpaError
from dpa.runtime.memory import frames_for_references
from dpa.training.model import DPA, MODALITIES

log = logging.getLogger(__name__)


class OfflinePredictor:
    """Runs a DPA model over one video in memory. Inputs are already pre-processed (SPEC §2.1)."""

    def __init__(self, model: DPA, device: str | torch.device = "cpu", batch_size: int = 4):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def memory_for(self, rgb: np.ndarray, flow: np.ndarray) -> tuple[dict | None, torch.Tensor | None, list[int]]:
        """Memory bank of the reference frames of a video: modality -> (keys, values) (1, N, T, D)."""
        config = self.model.config
        if not config.uses_ifa:
            return None, None, []
        indices = frames_for_references(len(rgb), config.memory)
        encoded = self.model.encode(self._tensor(rgb[indices]), self._tensor(flow[indices]))
        entries = self.model.memory_entry(encoded.f5)
        memory = {m: tuple(t[None] for t in entries[m]) for m in MODALITIES}  # (1, N, T, D)
        valid = torch.ones(1, len(indices), dtype=torch.bool, device=self.device)
        return memory, valid, indices

    @torch.no_grad()
    def predict(self, rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """rgb, flow (L, 3, S, S) float32 pre-processed -> foreground probabilities (L, S, S) float32."""
        if rgb.shape != flow.shape or rgb.ndim != 4:
            raise DpaError(f"rgb {rgb.shape} and flow {flow.shape} must both be (L, 3, S, S)")
        memory, valid, _ = self.memory_for(rgb, flow)
        probabilities = []
        for start in range(0, len(rgb), self.batch_size):
            batch_rgb = self._tensor(rgb[start : start + self.batch_size])
            batch = batch_rgb.shape[0]
            encoded = self.model.encode(batch_rgb, self._tensor(flow[start : start + self.batch_size]))
            ima5 = self.model.ima_block5(encoded.f5) if self.model.config.uses_ima else None
            batch_memory = batch_valid = None
            if memory is not None:
                batch_memory = {m: tuple(t.expand(batch, *t.shape[1:]) for t in memory[m]) for m in MODALITIES}
                batch_valid = valid.expand(batch, -1)
            logits = self.model.decode(encoded, ima5, batch_memory, batch_valid)["p1"]
            probabilities.append(torch.sigmoid(logits)[:, 0].float().cpu().numpy())
        return np.concatenate(probabilities)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)


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
    with DIS now, offline direction t -> t+1 as the training data), "auto" (files when every frame has
    one, else DIS). Returns (rgb (L,3,S,S), flow (L,3,S,S), frames RGB uint8 list, flow source name).
    """
    from dpa.runtime.flow import create_flow_estimator
    from dpa.runtime.preprocess import read_rgb

    frames = [read_rgb(path) for path in sequence.rgb]
    have_files = all(path is not None and Path(path).is_file() for path in sequence.flow)
    if flow_mode == "files" and not have_files:
        raise DpaError(f"sequence {sequence.name} has no flow images: run `dpa flow` on the dataset or use --flow dis")
    if flow_mode == "files" or (flow_mode == "auto" and have_files):
        flow_images = [read_rgb(path) for path in sequence.flow]
        source = "files"
    else:
        estimator = estimator or create_flow_estimator("dis")
        flow_images = render_offline_flow(frames, estimator)
        source = f"{estimator.name} (offline: forward flow t->t+1)"
    rgb, flow = preprocess_video(frames, flow_images, size)
    return rgb, flow, frames, source


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """`dpa eval --checkpoint CKPT --data DIR`: offline inference on every sequence, scored with DAVIS J/F.

    Masks are predicted at S, resized to the ground truth's resolution (bilinear on the probability)
    and thresholded at 0.5. Returns the `dpa.training.evaluate.summarise` result (plus "flow").
    """
    from tqdm import tqdm

    from dpa.runtime.preprocess import postprocess_probability
    from dpa.training.checkpoint import load_model
    from dpa.training.datasets import load_sequences
    from dpa.training.evaluate import read_mask, score_sequence, summarise

    model, _ = load_model(args.checkpoint)
    predictor = OfflinePredictor(model, getattr(args, "device", "cpu") or "cpu")
    sequences = load_sequences(args.data, layout=getattr(args, "layout", "auto"), split=getattr(args, "split", "val"))
    save_dir = Path(args.save_masks) if getattr(args, "save_masks", None) else None
    results, sources = {}, set()
    for sequence in tqdm(sequences, desc="eval", unit="seq"):
        if any(mask is None for mask in sequence.masks):
            raise DpaError(f"sequence {sequence.name} lacks ground-truth masks for some frames")
        rgb, flow, _, source = load_video(sequence, model.config.size, getattr(args, "flow", "auto"))
        sources.add(source)
        probabilities = predictor.predict(rgb, flow)
        triples = []
        for frame, probability, mask_path in zip(sequence.frames, probabilities, sequence.masks, strict=True):
            gt = read_mask(mask_path)
            _, prediction = postprocess_probability(probability, *gt.shape)
            triples.append((frame, gt, prediction))
            if save_dir is not None:
                import cv2

                target = save_dir / sequence.name / f"{frame}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), prediction.astype(np.uint8) * 255)
        results[sequence.name] = score_sequence(triples, args.protocol)
    summary = summarise(results, args.protocol)
    summary["flow"] = sorted(sources)
    summary["checkpoint"] = str(args.checkpoint)
    return summary
