"""`dpa compare`: the PyTorch fp32 model (the reference) and each backend x precision on the same clips.

Every run sees the same frames, the same flow (DIS, offline direction, computed once per clip) and the same
memory (the paper's reference frames k_i = floor(i (L-1) / (N-1)) of each clip); each builds its own memory
entries with its own graphs, as deployed. Per frame: the mask's IoU against the reference mask (both at the frame's
resolution; both empty counts 1.0), the probability map's error (at S x S), J/F/G against ground truth where the
clip has it (`dpa.training.evaluate.score_sequence`, protocol "all"), the error of every stage tensor the run
produced and the reference has (max abs, relative to the reference's largest magnitude, cosine), and the latency
(the graphs' seconds per frame; the memory priming is reported apart). For the fp16/int8 variants, the layers
that lose most are found in isolation (`dpa.calibration.layers`).

Each run is a `Segmenter` with the offline policy — the calls `segment_clip_offline` makes (prime the references,
then segment every frame, keep_values=True) — advanced one frame at a time for all runs together, so that only
one frame's tensors are held whatever the clip's length and model's size.

The reference is the pytorch backend (`dpa.training.torch_engine`): the same segmenter and chain as every run.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpa.calibration.clips import LabelledClip, load_labelled_clips, offline_flows
from dpa.errors import DpaError
from dpa.export.agreement import TensorError
from dpa.images import write_image
from dpa.progress import Bar

log = logging.getLogger(__name__)

REFERENCE_LABEL = "pytorch-fp32"
REPORT_FORMAT = "dpa-compare/1"
# Probability abs error histogram: [0, 1e-9) then log-spaced bins up to 1.
HISTOGRAM_EDGES = np.concatenate([[0.0], np.logspace(-9, 0, 37)])


def mask_iou(mask: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union of two bool (H, W) masks; 1.0 when both are empty."""
    mask, reference = np.asarray(mask, bool), np.asarray(reference, bool)
    if mask.shape != reference.shape:
        raise ValueError(f"masks differ in size: {mask.shape} vs {reference.shape}")
    union = np.count_nonzero(mask | reference)
    return 1.0 if union == 0 else np.count_nonzero(mask & reference) / union


@dataclass
class Run:
    """One backend x precision: its engine and chain, and what it measured over every clip."""

    backend: str
    precision: str
    engine: Any
    chain: Any
    label: str = ""
    stages: dict[str, TensorError] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES) - 1, np.int64))
    frame_latencies: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.label = self.label or f"{self.backend}-{self.precision}"

    def latency(self, seconds: dict[str, float]) -> float:
        """The graphs' seconds of one frame (encoder, ima, decoder; not flow, pre/post or memory priming)."""
        return sum(value for stage, value in seconds.items() if stage in self.chain.manifest.graphs)


@dataclass
class RunOnClip:
    """One run's segmenter on one clip and what it measured per frame (masks packed to bits)."""

    segmenter: Any
    prime_seconds: float | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    errors: list[tuple[float, float]] = field(default_factory=list)  # probability (max abs, mean abs)
    latencies: list[float] = field(default_factory=list)


@dataclass
class ClipState:
    """Everything `compare` tracks for one clip: the reference's and each run's `RunOnClip`, the frames whose
    graph inputs feed the layer analysis, and how many reference pixels are uncertain."""

    clip: LabelledClip
    flows: list[np.ndarray]
    reference: RunOnClip
    runs: dict[str, RunOnClip]
    layer_frames: set[int]
    reference_frames: list[int]
    uncertain: int = 0  # reference pixels (S x S) with probability in (0.3, 0.7): masks there flip easily


def _open_run(export_dir: str | Path, backend: str, precision: str, device: str, threads: int | None,
              engine_options: dict, label: str = "") -> Run:
    """The `precision` variant of `export_dir` on `backend` (pytorch included) as a Run with its chain."""
    from dpa.runtime.chain import StageChain
    from dpa.training.torch_engine import open_engine

    engine = open_engine(export_dir, backend, precision, device=device, threads=threads, **engine_options)
    return Run(backend, precision, engine, StageChain(engine), label)


@dataclass(order=True)
class _WorstFrame:
    """A candidate for the worst-frames figure (ordered by score, the lowest IoU over the runs)."""

    score: float
    clip: str = field(compare=False)
    index: int = field(compare=False)
    name: str = field(compare=False)
    frame: np.ndarray = field(compare=False, repr=False)
    masks: dict = field(compare=False, repr=False)  # label -> bool (H, W)
    ious: dict = field(compare=False)  # label -> IoU
    ground_truth: np.ndarray | None = field(compare=False, repr=False, default=None)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    write_image(path, mask.astype(np.uint8) * 255)


def _score(names: list[str], ground_truth: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    from dpa.training.evaluate import score_sequence

    result = score_sequence(list(zip(names, ground_truth, masks, strict=True)), "all")
    return {"J_mean": result["J"]["mean"], "F_mean": result["F"]["mean"], "G": result["G"],
            "J_per_frame": [frame["J"] for frame in result["frames"].values()]}


def _graph_inputs(manifest) -> dict[str, dict[str, str]]:
    """graph -> {input: pipeline source} for every step and the memory graph."""
    inputs = {step.graph: dict(step.inputs) for step in manifest.pipeline.steps}
    memory = manifest.pipeline.memory
    if memory:
        inputs[memory.graph] = dict(memory.inputs)
    return inputs


def _check_choices(backends: list[str], precisions: list[str]) -> None:
    from dpa.manifest import PRECISIONS
    from dpa.runtime.engines import BACKENDS

    for backend in backends:
        if backend not in BACKENDS:
            raise DpaError(f"--backends {backend!r}: choose from {', '.join(BACKENDS)}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise DpaError(f"--precisions {precision!r}: choose from {', '.join(PRECISIONS)}")
    if not backends or not precisions:
        raise DpaError("give at least one backend and one precision")


def compare(
    checkpoint: str | None, export_dir: str | Path, clip_arguments: list[str], backends: list[str],
    precisions: list[str], out: str | Path, max_frames: int | None = None, synthetic_length: int = 12,
    layer_frames: int = 2, worst: int = 4, device: str = "auto", threads: int | None = None,
    engine_options: dict | None = None, progress: bool = True,
) -> dict:
    """Run the comparison and write the report folder `out` (report.json, report.md, PNG plots, masks/).

    checkpoint: the checkpoint `export_dir` (an fp32 export) was made from (None: the manifest's record, as
    `dpa check`); its variants are found by `dpa.runtime.engine.resolve_variant`. The reference is the pytorch
    backend on that checkpoint, run through the same chain as every other run. Returns the report (what
    report.json holds).
    """
    from dpa.calibration.report import write_report

    started = time.perf_counter()
    _check_choices(backends, precisions)
    out = _report_folder(out)
    manifest = _fp32_manifest(export_dir)
    runs = [_open_run(export_dir, backend, precision, device, threads, engine_options or {})
            for backend in backends for precision in precisions]
    reference_device = "cuda" if any(run.engine.device.startswith("cuda") for run in runs) else "cpu"
    reference = _open_run(export_dir, "pytorch", "fp32", reference_device, threads, {"checkpoint": checkpoint},
                          label=REFERENCE_LABEL)
    clips = load_labelled_clips(clip_arguments, manifest.size, synthetic_length, max_frames)
    measured = _compare_clips(clips, manifest, reference, runs, out, layer_frames, worst, progress)
    report = _report(export_dir, manifest, clips, reference, reference_device, runs, measured, threads)
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_report(report, out, measured.worst_frames, [run.label for run in runs], REFERENCE_LABEL)
    for run in [reference, *runs]:
        run.engine.close()
    return report


def _report_folder(out: str | Path) -> Path:
    """The report folder `out`, created; DpaError when it cannot be."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create the report folder {out}: {error}") from error
    return out


def _fp32_manifest(export_dir: str | Path):
    """The manifest of `export_dir`; DpaError unless it is an fp32 export."""
    from dpa.manifest import Manifest

    manifest = Manifest.load(export_dir)
    if manifest.precision != "fp32":
        raise DpaError(f"--export {export_dir} holds {manifest.precision} graphs; pass the fp32 export folder "
                       "(its variants are found in it)")
    return manifest


@dataclass
class _Measured:
    """What `compare` measured over every clip: one row per run and clip, the reference's record of each clip,
    the worst frames (worst first), how the flow was computed and the graph inputs kept for the layer analysis
    (graph -> feeds)."""

    rows: list[dict]
    references: list[dict]
    worst_frames: list[_WorstFrame]
    flow_source: str
    layer_feeds: dict[str, list[dict[str, np.ndarray]]]


def _compare_clips(clips: list[LabelledClip], manifest, reference: Run, runs: list[Run], out: Path,
                   layer_frames: int, worst: int, progress: bool) -> _Measured:
    """Every frame of every clip through the reference and the runs (a progress bar over frames), keeping the
    `worst` frames with the lowest IoU and the graph inputs of `layer_frames` frames per clip."""
    layer_feeds: dict[str, list[dict[str, np.ndarray]]] = {graph: [] for graph in _graph_inputs(manifest)}
    rows, references, worst_heap, flow_source = [], [], [], ""
    bar = Bar(sum(clip.length for clip in clips), "compare", "frame", enabled=progress)
    for clip in clips:
        flows, flow_source = offline_flows(clip.frames, manifest.size)
        state = _start_clip(clip, flows, reference, runs, layer_frames)
        for index in range(clip.length):
            candidate = _compare_frame(state, index, reference, runs, out, layer_feeds)
            if len(worst_heap) < worst:
                heapq.heappush(worst_heap, candidate)
            elif worst > 0:
                heapq.heappushpop(worst_heap, candidate)
            bar.advance()
        references.append(_finish_clip(state, reference, runs, rows, manifest.size))
    bar.close()
    return _Measured(rows, references, sorted(worst_heap, reverse=True), flow_source, layer_feeds)


def _report(export_dir: str | Path, manifest, clips: list[LabelledClip], reference: Run, reference_device: str,
            runs: list[Run], measured: _Measured, threads: int | None) -> dict:
    """The report (what report.json holds), "seconds" left None for the caller; runs the layer analysis."""
    memory = manifest.pipeline.memory
    rows = measured.rows
    report = {
        "format": REPORT_FORMAT,
        "export": str(Path(export_dir).resolve()),
        "checkpoint": reference.engine.details["weights"],
        "model": {"config": manifest.config_name, "size": manifest.size,
                  "memory": memory.capacity if memory else None},
        "flow": measured.flow_source,
        "memory_policy": "offline: the paper's reference frames k_i = floor(i (L-1) / (N-1)) of each clip, "
                         "entries built by each run's own graphs",
        "clips": [{"name": c.name, "source": c.source, "frames": c.length, "ground_truth": c.masks is not None}
                  for c in clips],
        "reference": {"backend": "pytorch", "precision": "fp32", "device": reference_device,
                      "latency_ms": 1e3 * float(np.median(reference.frame_latencies)), "clips": measured.references},
        "engines": {run.label: _describe_engine(run.engine) for run in runs},
        "rows": rows,
        "summary": [_summary(run, [row for row in rows if row["backend"] == run.backend
                                   and row["precision"] == run.precision]) for run in runs],
        "stages": _stages(runs),
        "layers": _layers(export_dir, runs, measured.layer_feeds, threads),
        "histograms": {"edges": HISTOGRAM_EDGES.tolist(),
                       "counts": {run.label: run.histogram.tolist() for run in runs}},
        "notes": _notes(runs, clips),
        "masks": "masks/<clip>/<run>/<frame>.png (0/255), reference run " + REFERENCE_LABEL,
        "latency": "ms per frame, median over frames: the graphs' wall seconds (encoder, ima, decoder); "
                   "memory priming (ifa_memory on the reference frames) apart as prime_ms",
        "seconds": None,
    }
    report["worst_frames"] = [{"clip": w.clip, "frame": w.index, "name": w.name, "ious": w.ious}
                              for w in measured.worst_frames]
    return report


def _start_clip(clip: LabelledClip, flows: list[np.ndarray], reference: Run, runs: list[Run],
                layer_frames: int) -> ClipState:
    """A segmenter per run (and the reference) with the clip's offline policy, its memory primed."""
    from dpa.runtime.memory import OfflinePolicy
    from dpa.runtime.segmenter import Segmenter

    memory = reference.chain.memory

    def start(run: Run) -> RunOnClip:
        policy = OfflinePolicy(clip.length, memory.capacity) if memory else None
        segmenter = Segmenter(run.chain, policy, keep_values=True)
        if policy is None:
            return RunOnClip(segmenter)
        seconds = segmenter.prime({i: (clip.frames[i], flows[i]) for i in set(policy.references)})
        return RunOnClip(segmenter, run.latency(seconds))

    chosen = np.linspace(0, clip.length - 1, min(layer_frames, clip.length)).round().astype(int).tolist()
    reference_state = start(reference)
    policy = reference_state.segmenter.policy
    return ClipState(clip, flows, reference_state, {run.label: start(run) for run in runs},
                     set(chosen) if layer_frames > 0 else set(), policy.references if policy else [])


def _compare_frame(state: ClipState, index: int, reference: Run, runs: list[Run], out: Path,
                   layer_feeds: dict[str, list]) -> _WorstFrame:
    """Segment frame `index` with the reference and every run; record masks, IoUs, errors, stage tensors,
    latencies; return the frame as a worst-frame candidate."""
    clip, frame = state.clip, state.clip.frames[index]
    name = clip.frame_names[index]
    rgb, flow = state.reference.segmenter.model_inputs(frame, state.flows[index])
    expected = state.reference.segmenter.segment_inputs(rgb, flow, frame.shape[:2], index)
    values = expected.values
    reference_probability = reference.chain.probability(values)
    state.uncertain += int(np.count_nonzero((reference_probability > 0.3) & (reference_probability < 0.7)))
    _record(state.reference, reference, expected, out / "masks" / clip.name / REFERENCE_LABEL / f"{name}.png")
    frame_masks, frame_ious = {REFERENCE_LABEL: expected.mask}, {}
    valid_source = f"memory/{reference.chain.memory.valid}" if reference.chain.memory else None
    for run in runs:
        measured = state.runs[run.label]
        result = measured.segmenter.segment_inputs(rgb, flow, frame.shape[:2], index)
        _record(measured, run, result, out / "masks" / clip.name / run.label / f"{name}.png")
        measured.ious.append(frame_ious.setdefault(run.label, mask_iou(result.mask, expected.mask)))
        frame_masks[run.label] = result.mask
        difference = np.abs(run.chain.probability(result.values).astype(np.float64)
                            - reference_probability.astype(np.float64))
        measured.errors.append((float(difference.max()), float(difference.mean())))
        run.histogram += np.histogram(np.clip(difference, 0.0, 1.0), HISTOGRAM_EDGES)[0]
        for tensor, array in result.values.items():
            if tensor.startswith("frame/") or tensor == valid_source or tensor not in values:
                continue
            if tensor.startswith("memory/") and index > 0:
                continue  # the bank is the same for every frame of the clip
            run.stages.setdefault(tensor, TensorError()).add(array, values[tensor])
    if index in state.layer_frames:
        for graph, sources in _graph_inputs(reference.chain.manifest).items():
            if all(source in values for source in sources.values()):
                layer_feeds[graph].append({input_name: values[source] for input_name, source in sources.items()})
    return _WorstFrame(-min(frame_ious.values()), clip.name, index, name, frame, frame_masks, frame_ious,
                       clip.masks[index] if clip.masks else None)


def _record(measured: RunOnClip, run: Run, result, mask_path: Path) -> None:
    measured.masks.append(np.packbits(result.mask))
    measured.latencies.append(run.latency(result.seconds))
    _write_mask(mask_path, result.mask)


def _finish_clip(state: ClipState, reference: Run, runs: list[Run], rows: list[dict], size: int) -> dict:
    """Score the clip's masks, append each run's row to `rows`; returns the reference's record of the clip."""
    clip = state.clip
    shape = clip.frames[0].shape[:2]

    def unpack(packed: list[np.ndarray]) -> list[np.ndarray]:
        return [np.unpackbits(m, count=shape[0] * shape[1]).reshape(shape).astype(bool) for m in packed]

    no_score = {"J_mean": None, "F_mean": None, "G": None}
    score = _score(clip.frame_names, clip.masks, unpack(state.reference.masks)) if clip.masks else no_score
    reference.frame_latencies.extend(state.reference.latencies)
    for run in runs:
        measured = state.runs[run.label]
        rows.append(_row(run, clip, measured.ious, measured.errors, measured.latencies, measured.prime_seconds,
                         unpack(measured.masks)))
        run.frame_latencies.extend(measured.latencies)
    return {"clip": clip.name, "source": clip.source, "frames": clip.length, "ground_truth": clip.masks is not None,
            "memory_frames": state.reference_frames, "J_mean": score["J_mean"], "F_mean": score["F_mean"],
            "G": score["G"], "latency_ms": 1e3 * float(np.median(state.reference.latencies)),
            "uncertain_share": state.uncertain / (clip.length * size * size)}


def _row(run: Run, clip: LabelledClip, ious: list[float], errors: list[tuple[float, float]],
         latencies: list[float], prime_seconds: float | None, masks: list[np.ndarray]) -> dict:
    score = _score(clip.frame_names, clip.masks, masks) if clip.masks else {"J_mean": None, "F_mean": None,
                                                                           "G": None}
    worst = int(np.argmin(ious))
    return {
        "backend": run.backend, "precision": run.precision, "clip": clip.name, "frames": clip.length,
        "iou_vs_reference_mean": float(np.mean(ious)), "iou_vs_reference_min": float(np.min(ious)),
        "iou_per_frame": [float(v) for v in ious],
        "worst_frame": {"index": worst, "name": clip.frame_names[worst], "iou": float(ious[worst])},
        "probability_max_abs": max(e[0] for e in errors),
        "probability_mean_abs": float(np.mean([e[1] for e in errors])),
        "J_mean": score["J_mean"], "F_mean": score["F_mean"], "G": score["G"],
        "latency_ms": 1e3 * float(np.median(latencies)), "latency_ms_mean": 1e3 * float(np.mean(latencies)),
        "prime_ms": 1e3 * prime_seconds if prime_seconds is not None else None,
    }


def _summary(run: Run, rows: list[dict]) -> dict:
    ious = [v for row in rows for v in row["iou_per_frame"]]
    scored = [row for row in rows if row["J_mean"] is not None]
    j_mean = float(np.mean([row["J_mean"] for row in scored])) if scored else None
    f_mean = float(np.mean([row["F_mean"] for row in scored])) if scored else None
    return {"backend": run.backend, "precision": run.precision, "clips": len(rows), "frames": len(ious),
            "iou_vs_reference_mean": float(np.mean(ious)), "iou_vs_reference_min": float(np.min(ious)),
            "J_mean": j_mean, "F_mean": f_mean, "G": (j_mean + f_mean) / 2 if scored else None,
            "probability_max_abs": max(row["probability_max_abs"] for row in rows),
            "latency_ms": 1e3 * float(np.median(run.frame_latencies))}


def _stages(runs: list[Run]) -> dict:
    stages = {}
    for run in runs:
        tensors = {name: error.to_dict() for name, error in sorted(run.stages.items())}
        worst_relative = max(tensors, key=lambda n: tensors[n]["relative"])
        worst_cosine = min(tensors, key=lambda n: tensors[n]["cosine_min"])
        stages[run.label] = {
            "backend": run.backend, "precision": run.precision, "tensors": tensors,
            "worst": {"tensor": worst_relative, "stage": worst_relative.split("/")[0],
                      "relative": tensors[worst_relative]["relative"], "by": "relative max abs"},
            "worst_cosine": {"tensor": worst_cosine, "stage": worst_cosine.split("/")[0],
                             "cosine_min": tensors[worst_cosine]["cosine_min"]},
        }
    return stages


def _layers(export_dir: str | Path, runs: list[Run], feeds: dict[str, list], threads: int | None,
            top: int = 5) -> dict:
    """precision -> graph -> the `top` layers with the largest added error (ONNX Runtime CPU, isolated feeds)."""
    from dpa.calibration.layers import layer_errors
    from dpa.manifest import Manifest
    from dpa.runtime.engine import resolve_variant

    fp32_manifest = Manifest.load(export_dir)
    layers = {}
    for precision in sorted({run.precision for run in runs} - {"fp32"}):
        variant = resolve_variant(export_dir, precision)
        variant_manifest = Manifest.load(variant)
        layers[precision] = {}
        for graph, graph_feeds in feeds.items():
            if not graph_feeds:
                continue
            rows = layer_errors(fp32_manifest.graph_file(export_dir, graph, "functions"),
                                variant_manifest.graph_file(variant, graph, "functions"), graph_feeds, threads)
            layers[precision][graph] = {"feeds": len(graph_feeds), "layers": len(rows), "top": rows[:top]}
    return layers


def _notes(runs: list[Run], clips: list[LabelledClip]) -> list[str]:
    notes = []
    compared = {clip.name for clip in clips}
    for run in runs:
        variant = run.engine.manifest.variant or {}
        calibrated = {clip["name"] for clip in variant.get("calibration_clips", [])}
        overlap = sorted(compared & calibrated)
        if overlap and run.precision == "int8":
            notes.append(f"{run.label}: clips {', '.join(overlap)} were also used to calibrate the int8 variant; "
                         "their numbers are optimistic")
        if run.precision == "int8" and run.backend == "onnxruntime" and run.engine.device == "cpu":
            notes.append(f"{run.label}: ONNX Runtime on the CPU evaluates the Q/DQ graph (fake quantization) in "
                         "float32 between the Q/DQ pairs; TensorRT runs int8 kernels, so its numbers differ slightly")
        if run.precision == "fp16" and run.backend == "onnxruntime" and run.engine.device == "cpu":
            notes.append(f"{run.label}: ONNX Runtime on the CPU computes float16 nodes that have no CPU float16 "
                         "kernel in float32 (rounding at their inputs and outputs); a GPU computes in float16")
    return notes


def _describe_engine(engine) -> dict:
    described = engine.describe()
    return {key: described[key] for key in ("backend", "precision", "device", "providers", "form", "directory",
                                            "versions") if key in described}
