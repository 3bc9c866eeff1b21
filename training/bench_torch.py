"""The public reference code's inference cost re-enacted in PyTorch for `dpa bench`, on the frames and flow the
runtime benchmark uses (`dpa.runtime.benchmark`). (PyTorch eager with cached memory is the pytorch backend through
the runtime's own chain: `dpa.commands.bench.eager_timer`.)

The reference-code re-enactment (`reference_code_frame`) repeats, per query frame, the work the public DPA code
(github.com/Hydragon516/DPA, `model/model_for_video.py`) does in every call of its `forward(image, flow,
image_ref, flow_ref, s)`, which is called once per query frame with that frame's N reference frames:
- `get_rgb_feature_memory` and `get_flow_feature_memory` run each of the N reference frames, one at a time
  (batch B, a Python loop over n), through VGG blocks 1–5 of the appearance encoder and of the motion encoder,
  under `torch.no_grad` — plain VGG, without the block-4 attention, which the query path has; nothing is cached
  between calls;
- the two `Temporal_Aggregation_Module`s apply K and V (1x1 convolutions) to each reference's block-5 features
  and take their prototypes, again per reference and per call (they then use the key prototypes as the values,
  a mistake SPEC §2.5 corrects; the cost is the same);
- then the query frame runs through the encoders, the attention and the decoder.
So the re-enactment costs, per query frame: 2N plain VGG-16 passes (blocks 1–5), N memory entries
(`memory_entry` per reference), then our model's query path (`encode` + `ima_block5` + `decode`), exactly N extra
passes of each encoder over the eager model. The query path is our model's (paper-iv has IMA at blocks 4 and 5,
which the released code has commented out), so the comparison is of the same network and differs only in what
the reference code recomputes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dpa.errors import DpaError
from dpa.runtime.benchmark.timers import Samples, Timer, TimingSettings, advance, per_frame_means
from dpa.sampling import frames_for_references
from dpa.training.model import DPA, MODALITIES


def describe(device: str, threads: int | None) -> dict:
    """What the PyTorch timers run on (for the report)."""
    return {"torch": torch.__version__, "device": device, "threads": threads,
            "cuda_device": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
            "mode": "torch.inference_mode, batch 1, float32"}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch intra-op threads set to `threads` (None: unchanged) inside the block, restored after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class StageClock:
    """Wall seconds per stage; synchronises CUDA around each stage so GPU work is counted where it is queued."""

    def __init__(self, device: str):
        self.seconds: dict[str, float] = {}
        self._synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def model_inputs(frames: Sequence[np.ndarray], flows: Sequence[np.ndarray], size: int,
                 device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB frames and their flow fields -> rgb, flow (L, 3, S, S) float32 on `device`, pre-processed exactly as
    the runtime does (`preprocess_rgb`, `flow_to_rgb` + `preprocess_flow`)."""
    from dpa.runtime.flow import flow_to_rgb
    from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb

    rgb = np.stack([preprocess_rgb(frame, size) for frame in frames])
    flow = np.stack([preprocess_flow(flow_to_rgb(field), size) for field in flows])
    return torch.from_numpy(rgb).to(device), torch.from_numpy(flow).to(device)


def stack_entries(model: DPA, entries: Sequence[dict]) -> tuple[dict, torch.Tensor]:
    """Memory entries of N frames (each modality -> (keys, values) (1, T, D)) -> the memory bank (modality ->
    (keys, values) (1, N, T, D)) and its validity (1, N), every slot valid."""
    memory = {m: tuple(torch.stack([entry[m][i][0] for entry in entries])[None] for i in (0, 1)) for m in MODALITIES}
    valid = torch.ones(1, len(entries), dtype=torch.bool, device=memory[MODALITIES[0]][0].device)
    return memory, valid


def query_frame(model: DPA, rgb: torch.Tensor, flow: torch.Tensor, memory: dict | None, valid: torch.Tensor | None,
                clock: StageClock) -> torch.Tensor:
    """One query frame (1, 3, S, S) x2 against a memory -> probability (1, 1, S, S); stages encoder, ima, decoder
    (the same cut as the stage graphs)."""
    with clock.stage("encoder"):
        encoded = model.encode(rgb, flow)
    ima5 = None
    if model.config.uses_ima:
        with clock.stage("ima"):
            ima5 = model.ima_block5(encoded.f5)
    with clock.stage("decoder"):
        return torch.sigmoid(model.decode(encoded, ima5, memory, valid)["p1"])


def reference_code_features(model: DPA, modality: str, frame: torch.Tensor) -> torch.Tensor:
    """A reference frame (1, 3, S, S) through the plain VGG blocks 1–5 of one encoder (no block-4 attention), as the
    public code's get_rgb_feature_memory / get_flow_feature_memory -> f5 (1, 512w, S/16, S/16)."""
    features = frame
    for block in model.encoders[modality].blocks:
        features = block(features)
    return features


def reference_code_frame(model: DPA, rgb: torch.Tensor, flow: torch.Tensor, reference_rgb: torch.Tensor,
                         reference_flow: torch.Tensor, clock: StageClock) -> torch.Tensor:
    """One query frame (1, 3, S, S) x2 the way the public code computes it (see the module docstring): the N
    reference frames (N, 3, S, S) x2 re-encoded one by one through both encoders (stage "references"), their
    memory entries recomputed (stage "reference_memory"), then the query (`query_frame`). Returns the
    probability (1, 1, S, S)."""
    memory = valid = None
    if model.config.uses_ifa:
        streams = {"appearance": reference_rgb, "motion": reference_flow}
        count = reference_rgb.shape[0]
        with clock.stage("references"):
            features = [{m: reference_code_features(model, m, streams[m][n:n + 1]) for m in MODALITIES}
                        for n in range(count)]
        with clock.stage("reference_memory"):
            memory, valid = stack_entries(model, [model.memory_entry(f5) for f5 in features])
    return query_frame(model, rgb, flow, memory, valid, clock)


def reference_code_timer(model: DPA, frames: Sequence[np.ndarray], flows: Sequence[np.ndarray],
                         settings: TimingSettings, device: str = "cpu", name: str = "reference_code") -> Timer:
    """The public reference code's per-frame cost re-enacted (`reference_code_frame`): per query frame the N
    references re-encoded through both encoders and their entries recomputed, then the query. Every frame runs
    under inference_mode with `settings.threads` threads, the first `warmup` untimed; the inputs are pre-processed
    once, when the timer is made."""
    config = model.config
    samples = Samples(name, f"the public DPA code's inference re-enacted in PyTorch ({config.name}): per query "
                      f"frame the N = {config.memory} reference frames re-encoded one by one through both "
                      "plain VGG encoders and their K/V prototypes recomputed, then encode + ima_block5 + decode",
                      settings.frames, settings.warmup)
    if len(frames) != settings.clip_length:
        raise DpaError(f"need {settings.clip_length} frames (warm-up + timed), got {len(frames)}")
    model = model.eval().to(device)
    references = frames_for_references(len(frames), config.memory)
    with torch.inference_mode():
        rgb, flow = model_inputs(frames, flows, config.size, device)
        reference_rgb, reference_flow = rgb[references], flow[references]
    samples.info["device"] = device

    def repeat(bar) -> None:
        with torch.inference_mode(), torch_threads(settings.threads):
            records, whole = [], 0.0
            for index in range(len(frames)):
                clock = StageClock(device)
                started = time.perf_counter()
                reference_code_frame(model, rgb[index:index + 1], flow[index:index + 1], reference_rgb,
                                     reference_flow, clock)
                elapsed = time.perf_counter() - started
                advance(bar)
                if index >= settings.warmup:
                    whole += elapsed
                    records.append(clock.seconds)
            samples.add_repeat(whole / settings.frames, per_frame_means(records, settings.frames))

    return Timer(samples, repeat, len(frames))
