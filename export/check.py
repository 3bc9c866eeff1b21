"""`dpa check`: an export directory's stage graphs, chained in ONNX Runtime (CPU), against the PyTorch model.

Frames come from a clip folder (a sequence folder with JPEGImages/, or a folder of images) or a synthetic clip;
flow is DIS in the offline direction, as offline inference computes it. The memory holds the paper's reference
frames k_i = floor(i (L-1) / (N-1)) of the whole clip, the same frames on both sides; each side builds its
entries with its own encoder and memory graph, so errors propagate along the chain as in deployment.

Tolerances (fp32 on both sides):
- probability map: max abs error <= max(1e-4 (SPEC §4.1), 2 d), chained and for the decoder graph in isolation,
  where d is PyTorch fp32's own largest distance to a float64 evaluation of the same network on the checked frames.
  d is fp32 rounding at the magnitude of the network's logits and features: ~1e-6 for the trained models, but up
  to ~1e-4 for untrained full-width networks, whose logits reach tens to hundreds (calibrated paper-iv on
  blackswan: d = 6.6e-5, ONNX Runtime vs PyTorch 8.0e-5, 1.01e-4 on other frames). Two correct fp32
  implementations each lie within d of the exact result, hence within 2 d of each other; an export error (a wrong
  weight, layout or op) is orders of magnitude beyond it, and the float64 evaluation shows which of the two
  implementations strays.
- every intermediate output: max abs error <= 1e-4 x the largest magnitude of that PyTorch tensor, and cosine
  similarity >= 0.99999. Features are unbounded and their scale differs per layer, stream and checkpoint, so
  the bound is relative to the tensor's own range. Two correct fp32 implementations differ by the rounding of
  their summation orders (oneDNN vs MLAS convolutions, fused kernels): measured 3e-7 … 5e-6 relative for the
  tiny and paper-iv graphs, 20x below the bound; a wrong weight, layout, op or attribute gives errors of order 1
  relative and a cosine well below 0.999.
- memory validity, k valid of N slots for k = 1 … N with garbage in the others (NaN and Inf included where the
  op contract promises that garbage cannot leak): the decoder's output must not change at all when the garbage
  is replaced by zeros (bit for bit), and must equal PyTorch with those k references alone within the
  probability tolerance. The distance to PyTorch is also reported against a float64 evaluation of the network.

The whole chain is always evaluated in float64 too (PyTorch on the same weights), and the report says how far each
fp32 implementation (PyTorch, ONNX Runtime) is from it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.export.agreement import TensorError
from dpa.export.frames import load_clip, preprocess_clip, synthetic_clip
from dpa.manifest import Manifest
from dpa.progress import Bar
from dpa.runtime.chain import StageChain
from dpa.runtime.engines import open_engine
from dpa.runtime.memory import MemoryBank
from dpa.sampling import frames_for_references
from dpa.training.stages import ENTRY_OUTPUTS, PROBABILITY
from dpa.training.torch_engine import engine_model, model_engine, open_torch_engine

log = logging.getLogger(__name__)

PROBABILITY_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-4
COSINE_TOLERANCE = 0.99999


class Agreement(TensorError):
    """One output over frames (worst max abs error, worst cosine, largest reference value) and its verdict
    against the export tolerances."""

    @property
    def cosine(self) -> float:
        return self.cosine_min

    def ok(self, probability_tolerance: float | None) -> bool:
        """probability_tolerance: the bound of a probability map, None for an intermediate tensor."""
        if probability_tolerance is not None:
            return self.max_abs <= probability_tolerance
        return self.relative <= RELATIVE_TOLERANCE and self.cosine >= COSINE_TOLERANCE

    def to_dict(self, probability_tolerance: float | None) -> dict:
        return {"max_abs": self.max_abs, "cosine": self.cosine, "relative": self.relative, "scale": self.scale,
                "frames": self.frames, "ok": self.ok(probability_tolerance)}


class Comparisons(dict):
    """output name -> Agreement; `add` compares an array with its reference."""

    def add(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        self.setdefault(name, Agreement()).add(actual, expected)

    def report(self, probability_tolerance: float) -> dict[str, dict]:
        return {name: agreement.to_dict(probability_tolerance if name == f"decoder/{PROBABILITY}" else None)
                for name, agreement in self.items()}


class _Side:
    """One backend of the comparison: its chain, its memory bank (the same reference frames on every side) and the
    host copies of what it computed for the current frame."""

    def __init__(self, chain: StageChain):
        self.chain = chain
        self.bank = chain.new_bank() if chain.memory else None
        self.entries: list[dict[str, np.ndarray]] = []
        self.values: dict[str, np.ndarray] = {}

    def admit(self, slot: int, rgb: np.ndarray, flow: np.ndarray) -> dict[str, np.ndarray]:
        entry = self.chain.memory_entry(self.chain.frame_values(rgb, flow))
        self.bank.write(slot, entry)
        entry = {name: self.chain.transfer.download(tensor) for name, tensor in entry.items()}
        self.entries.append(entry)
        return entry

    def process(self, rgb: np.ndarray, flow: np.ndarray) -> dict[str, np.ndarray]:
        self.values = self.chain.download(self.chain.process(rgb, flow, self.bank))
        return self.values

    def probability(self) -> np.ndarray:
        return self.values[f"decoder/{PROBABILITY}"]


def _isolated(chain: StageChain, graph: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`graph` of `chain` fed another side's host values (its inputs' sources), outputs as host arrays."""
    memory = chain.memory
    sources = memory.inputs if memory and graph == memory.graph else chain.pipeline.step(graph).inputs
    return chain.download(chain.run_graph(graph, sources, values))


@dataclass
class _Check:
    """The sides of one check (ONNX Runtime, PyTorch, optionally float64 PyTorch) and what is compared between them:
    `chained` (each graph fed by the graphs before it), `isolated` (each ONNX Runtime graph fed PyTorch's
    tensors) and `exact` (both fp32 sides against float64)."""

    onnxruntime: _Side
    pytorch: _Side
    exact: _Side
    chained: Comparisons = field(default_factory=Comparisons)
    isolated: Comparisons = field(default_factory=Comparisons)
    exact_comparisons: Comparisons = field(default_factory=Comparisons)

    def reference(self, slot: int, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Admit a reference frame into `slot` on every side; compare its memory entry."""
        entry, expected = (side.admit(slot, rgb, flow) for side in (self.onnxruntime, self.pytorch))
        self.exact.admit(slot, rgb, flow)
        alone = _isolated(self.onnxruntime.chain, "ifa_memory", _encoder_sources(self.pytorch.chain, rgb, flow))
        for name in ENTRY_OUTPUTS:
            self.chained.add(f"ifa_memory/{name}", entry[name], expected[name])
            self.isolated.add(f"ifa_memory/{name}", alone[f"ifa_memory/{name}"], expected[name])

    def query(self, rgb: np.ndarray, flow: np.ndarray, uses_ima: bool) -> None:
        """Segment a frame on every side against the memory; compare every graph output, chained and isolated."""
        for side in (self.onnxruntime, self.pytorch, self.exact):
            side.process(rgb, flow)
        expected, probability = self.pytorch.values, f"decoder/{PROBABILITY}"
        for name, value in expected.items():
            if name.startswith(("encoder/", "ima/")) or name == probability:
                self.chained.add(name, self.onnxruntime.values[name], value)
        sources = {name: value for name, value in expected.items() if name.startswith(("encoder/", "ima/"))}
        if uses_ima:
            alone = _isolated(self.onnxruntime.chain, "ima", sources)
            for name in alone:
                self.isolated.add(name, alone[name], expected[name])
        if self.pytorch.bank is not None:
            sources.update(self.pytorch.bank.host_sources())
        alone = _isolated(self.onnxruntime.chain, "decoder", sources)
        self.isolated.add(probability, alone[probability], expected[probability])
        exact = self.exact.probability()
        self.exact_comparisons.add("pytorch_fp32", self.pytorch.probability().astype(np.float64), exact)
        self.exact_comparisons.add("onnxruntime", self.onnxruntime.probability(), exact)

    def probability_tolerance(self) -> float:
        """max(1e-4, 2 d), d = PyTorch fp32's largest distance to float64 on the frames checked so far."""
        return max(PROBABILITY_TOLERANCE, 2 * self.exact_comparisons["pytorch_fp32"].max_abs)


def check_export(
    directory: str | Path, checkpoint: str | None = None, clip: str | Path | None = None, frames: int = 8,
    clip_length: int = 12, seed: int = 0, form: str | None = None, threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Compare the graphs of `directory` with PyTorch on `frames` frames spread over the clip. Returns the report.

    Both sides are engines chained by the same `StageChain`: ONNX Runtime (CPU) on the graphs, PyTorch on the
    model they were exported from (`open_torch_engine`). clip: a clip folder, or None for a synthetic clip of
    `clip_length` frames (seed `seed`) at S pixels. "outputs": the graphs chained (each fed by the graphs before
    it, as deployed); "isolated": each graph fed PyTorch's tensors, which separates a graph's own error from the
    network's amplification of its inputs'. The PyTorch chain also runs in float64: both fp32 implementations'
    distance to it is reported, and it sets the probability tolerance (module doc).
    """
    start = time.perf_counter()
    manifest = Manifest.load(directory)
    ort_engine = open_engine(directory, "onnxruntime", device="cpu", threads=threads, form=form)
    torch_engine = open_torch_engine(Path(directory), manifest, "fp32", device="cpu", checkpoint=checkpoint)
    model = engine_model(torch_engine)
    config = model.config
    exact = _Side(StageChain(model_engine(model, "cpu", torch.float64, manifest)))
    check = _Check(_Side(StageChain(ort_engine)), _Side(StageChain(torch_engine)), exact)
    source = load_clip(clip) if clip is not None else synthetic_clip(clip_length, config.size, seed)
    length = len(source.frames)
    checked = sorted({int(round(i)) for i in np.linspace(0, length - 1, min(frames, length))})
    references = frames_for_references(length, config.memory) if config.uses_ifa else []
    rgb, flow, flow_source = preprocess_clip(source, sorted(set(checked) | set(references)), config.size)
    log.info("checking %s (%s form) on %s: frames %s, references %s", directory, ort_engine.form, source.source,
             checked, references)
    with Bar(len(references) + len(checked), "check", "frame", enabled=progress) as bar:
        for slot, index in enumerate(references):
            check.reference(slot, rgb[index], flow[index])
            bar.advance()
        for index in checked:
            check.query(rgb[index], flow[index], config.uses_ima)
            bar.advance()
    first = checked[0]
    tolerance = check.probability_tolerance()
    validity = _memory_validity(config, check.onnxruntime.chain, check.pytorch, rgb[first], flow[first], model, seed,
                                tolerance)
    ort_engine.close()
    return {
        **_verdicts(check, validity, tolerance),
        "directory": str(directory),
        "form": ort_engine.form,
        "config": config.name,
        "size": config.size,
        "memory": config.memory,
        "weights": torch_engine.details["weights"],
        "clip": {"name": source.name, "source": source.source, "length": length,
                 "frame_size": list(source.frames[0].shape[:2])},
        "flow": flow_source,
        "frames": checked,
        "reference_frames": references,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _verdicts(check: _Check, validity: dict, tolerance: float) -> dict:
    """The report's comparisons, their tolerances and the overall verdict."""
    outputs, isolated = check.chained.report(tolerance), check.isolated.report(tolerance)
    return {
        "ok": all(o["ok"] for o in [*outputs.values(), *isolated.values()]) and validity.get("ok", True),
        "outputs": outputs,
        "probability_max_abs": outputs[f"decoder/{PROBABILITY}"]["max_abs"],
        "isolated": isolated,
        "memory_validity": validity,
        "float64": {name: {"max_abs": a.max_abs, "cosine": a.cosine} for name, a in check.exact_comparisons.items()},
        "tolerances": {
            "probability_max_abs": tolerance,
            "probability_fp32_rounding": check.exact_comparisons["pytorch_fp32"].max_abs,
            "probability_rule": f"max({PROBABILITY_TOLERANCE:g}, 2 x PyTorch fp32's distance to float64)",
            "intermediate_relative_max_abs": RELATIVE_TOLERANCE,
            "intermediate_cosine_min": COSINE_TOLERANCE,
            "memory_validity_garbage_effect": 0.0,
            "memory_validity_max_abs": tolerance,
        },
    }


def _encoder_sources(chain: StageChain, rgb: np.ndarray, flow: np.ndarray) -> dict[str, np.ndarray]:
    """The encoder outputs of one frame on `chain`, as host pipeline values ("encoder/…")."""
    step = chain.pipeline.steps[0]
    return chain.download(chain.run_graph(step.graph, step.inputs, chain.frame_values(rgb, flow)))


def _memory_validity(config, chain: StageChain, pytorch: _Side, rgb: np.ndarray, flow: np.ndarray, model,
                     seed: int, tolerance: float) -> dict:
    """k = 1 … N: the decoder graph with k valid slots among N and garbage in the others.

    garbage_effect: against the same bank with zeros instead of garbage — must be exactly 0 (nothing of an
    empty slot reaches the result). max_abs / max_abs_fp64: against PyTorch (fp32 / float64) with those k
    references alone. The decoder graph is fed the PyTorch model's tensors for the query frame.
    """
    if not config.uses_ifa or not pytorch.entries:
        return {}
    pytorch.process(rgb, flow)
    query = {name: value for name, value in pytorch.values.items() if name.startswith(("encoder/", "ima/"))}
    exact_chain = StageChain(model_engine(model, "cpu", torch.float64, pytorch.chain.manifest))
    rng = np.random.default_rng(seed)
    capacity = config.memory
    errors, errors_fp64, effects = {}, {}, {}
    for k in range(1, capacity + 1):
        chosen = [pytorch.entries[i % len(pytorch.entries)] for i in range(k)]
        slots = list(range(capacity - 1, capacity - 1 - k, -1))  # the last k, in reverse: position is irrelevant
        probabilities = []
        for fill in ("garbage", "zeros"):
            bank = MemoryBank(chain.manifest)
            for array in bank.tensors.values():
                if fill == "garbage":
                    garbage = rng.standard_normal(array.shape).astype(array.dtype) * 1e3
                    if config.ifa == "prototype":
                        garbage.reshape(-1)[::7] = np.nan
                        garbage.reshape(-1)[3::11] = np.inf
                    array[...] = garbage
            for slot, entry in zip(slots, chosen, strict=True):
                bank.write(slot, entry)
            probabilities.append(_isolated(chain, "decoder", {**query, **bank.sources()})[f"decoder/{PROBABILITY}"])
        actual = probabilities[0].astype(np.float64)
        errors[str(k)] = float(np.abs(actual - _decode_alone(pytorch.chain, query, chosen)).max())
        errors_fp64[str(k)] = float(np.abs(actual - _decode_alone(exact_chain, query, chosen)).max())
        effects[str(k)] = float(np.abs(probabilities[0] - probabilities[1]).max())
    return {
        "max_abs": errors,
        "max_abs_fp64": errors_fp64,
        "garbage_effect": effects,
        "garbage": _garbage_kind(config),
        "ok": all(e <= tolerance for e in errors.values()) and not any(effects.values()),
    }


def _decode_alone(chain: StageChain, query: dict[str, np.ndarray], entries: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The PyTorch decoder of `chain` (any N: it is PyTorch) with exactly `entries` as its memory, all valid, on
    the query frame's host values (fp32 PyTorch's, computed in the chain's dtype); the probability as float64."""
    memory = chain.memory
    transfer = chain.transfer
    values: dict[str, Any] = {name: transfer.upload(value) for name, value in query.items()}
    for bank_name, entry_name in memory.bank.items():
        values[f"memory/{bank_name}"] = transfer.upload(np.stack([entry[entry_name] for entry in entries], 1))
    values[f"memory/{memory.valid}"] = transfer.upload(np.ones((1, len(entries)), np.float32))
    outputs = chain.run_graph("decoder", chain.pipeline.step("decoder").inputs, values)
    return transfer.download(outputs[f"decoder/{PROBABILITY}"]).astype(np.float64)


def _garbage_kind(config) -> str:
    # The prototype read is the custom op, whose contract keeps NaN/Inf in empty slots out of the result; the
    # "plain" ablation's read is exported from PyTorch's masked softmax, where 0 x NaN would still be NaN.
    return "normal x 1e3, NaN and Inf" if config.ifa == "prototype" else "normal x 1e3 (finite)"


def format_report(report: dict) -> str:
    """A table of the report for the terminal."""
    lines = [f"{'output (chained)':<34} {'max abs':>10} {'relative':>10} {'cosine':>12}  ok"]

    def rows(outputs: dict) -> None:
        for name, output in outputs.items():
            lines.append(f"{name:<34} {output['max_abs']:>10.3e} {output['relative']:>10.3e} "
                         f"{output['cosine']:>12.9f}  {'yes' if output['ok'] else 'NO'}")

    rows(report["outputs"])
    lines.append("isolated (each graph fed PyTorch's tensors):")
    rows(report["isolated"])
    validity = report["memory_validity"]
    if validity:
        lines.append(
            f"memory validity k=1..{report['memory']} (garbage: {validity['garbage']}): garbage effect "
            f"{max(validity['garbage_effect'].values()):.1e}; probability max abs vs PyTorch with the k alone "
            f"{max(validity['max_abs'].values()):.3e} (fp32), {max(validity['max_abs_fp64'].values()):.3e} (float64)"
            f"  {'yes' if validity['ok'] else 'NO'}"
        )
    for name, agreement in report["float64"].items():
        lines.append(f"probability {name} vs float64 PyTorch: max abs {agreement['max_abs']:.3e}")
    tolerances = report["tolerances"]
    lines.append(
        f"probability max abs {report['probability_max_abs']:.3e} (tolerance {tolerances['probability_max_abs']:g}); "
        f"intermediates: relative <= {tolerances['intermediate_relative_max_abs']:g}, cosine >= "
        f"{tolerances['intermediate_cosine_min']}; {len(report['frames'])} frames of {report['clip']['name']} "
        f"({report['clip']['length']} in the clip), references {report['reference_frames']}, {report['seconds']} s"
    )
    lines.append("OK" if report["ok"] else "FAILED: a tolerance is exceeded")
    return "\n".join(lines)
