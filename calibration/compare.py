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

torch is imported here only for the reference (`TorchReference`).
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpa.calibration.clips import LabelledClip, load_labelled_clips, offline_flows
from dpa.errors import DpaError
from dpa.export.agreement import TensorError

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


class TorchReference:
    """The fp32 PyTorch model run stage by stage like the graphs; values named by pipeline source
    ("frame/rgb", "encoder/f1", "ima/ima5_appearance", "memory/memory_keys_appearance", "decoder/probability")."""

    def __init__(self, model, manifest: dict, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config = model.config
        self.memory_spec = manifest["pipeline"].get("memory")
        self.memory = self.valid = None
        self.bank_values: dict[str, np.ndarray] = {}
        self.valid_source = f"memory/{self.memory_spec['valid']}" if self.memory_spec else None

    def _tensor(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array, np.float32))[None].to(self.device)

    def prime(self, inputs: dict[int, tuple[np.ndarray, np.ndarray]], references: list[int]) -> None:
        """Memory of the reference frames: inputs index -> (rgb, flow) (3, S, S); slot i holds references[i]."""
        from dpa.export.graphs import ENTRY_OUTPUTS
        from dpa.training.model import MODALITIES

        if not self.config.uses_ifa:
            return
        torch = self.torch
        entries = {}
        with torch.no_grad():
            for index in sorted(set(references)):
                encoded = self.model.encode(self._tensor(inputs[index][0]), self._tensor(inputs[index][1]))
                entries[index] = self.model.memory_entry(encoded.f5)
        self.memory = {m: tuple(torch.stack([entries[i][m][kind] for i in references], 1) for kind in (0, 1))
                       for m in MODALITIES}  # modality -> (keys, values) (1, N, T, D)
        self.valid = torch.ones(1, len(references), dtype=torch.bool, device=self.device)
        stacked = dict(zip(ENTRY_OUTPUTS, (*self.memory["appearance"], *self.memory["motion"]), strict=True))
        self.bank_values = {f"memory/{bank}": stacked[entry].cpu().numpy()
                            for bank, entry in self.memory_spec["bank"].items()}
        self.bank_values[self.valid_source] = np.ones((1, len(references)), np.float32)

    def frame(self, rgb: np.ndarray, flow: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """One frame's values (see the class) and the seconds encode + ima + decode took."""
        from dpa.training.model import MODALITIES

        torch = self.torch
        rgb_tensor, flow_tensor = self._tensor(rgb), self._tensor(flow)
        with torch.no_grad():
            started = time.perf_counter()
            encoded = self.model.encode(rgb_tensor, flow_tensor)
            ima5 = self.model.ima_block5(encoded.f5) if self.config.uses_ima else None
            probability = torch.sigmoid(self.model.decode(encoded, ima5, self.memory, self.valid)["p1"])
            probability = probability.cpu().numpy()
            seconds = time.perf_counter() - started
        values = {"frame/rgb": rgb[None], "frame/flow": flow[None], "decoder/probability": probability}
        values.update({f"encoder/{name}": t.cpu().numpy() for name, t in zip(("f1", "f2", "f3"), encoded.skips,
                                                                             strict=True)})
        for m in MODALITIES:
            values[f"encoder/f4_{m}"] = encoded.f4[m].cpu().numpy()
            values[f"encoder/f5_{m}"] = encoded.f5[m].cpu().numpy()
            if ima5 is not None:
                values[f"ima/ima5_{m}"] = ima5[m].cpu().numpy()
        values.update(self.bank_values)
        return values, seconds


@dataclass
class Run:
    """One backend x precision: its engine and chain, and what it measured."""

    backend: str
    precision: str
    engine: object
    chain: object
    label: str = ""
    stages: dict[str, TensorError] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES) - 1, np.int64))
    frame_latencies: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.label = f"{self.backend}-{self.precision}"


def _open_chain(export_dir: str | Path, backend: str, precision: str, device: str, threads: int | None,
                engine_options: dict):
    """(StageChain, Engine) for the `precision` variant of `export_dir` on `backend` (dpa.runtime.engines)."""
    from dpa.runtime.chain import StageChain
    from dpa.runtime.engines import open_engine

    engine = open_engine(export_dir, backend=backend, precision=precision, device=device, threads=threads,
                         **engine_options)
    return StageChain(engine.sessions, engine.manifest), engine


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
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask.astype(np.uint8) * 255):
        raise DpaError(f"cannot write {path}; check that the report folder is writable")


def _score(names: list[str], ground_truth: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    from dpa.training.evaluate import score_sequence

    result = score_sequence(list(zip(names, ground_truth, masks, strict=True)), "all")
    return {"J_mean": result["J"]["mean"], "F_mean": result["F"]["mean"], "G": result["G"],
            "J_per_frame": [frame["J"] for frame in result["frames"].values()]}


def _graph_inputs(manifest: dict) -> dict[str, dict[str, str]]:
    """graph -> {input: pipeline source} for every step and the memory graph."""
    inputs = {step["graph"]: step["inputs"] for step in manifest["pipeline"]["steps"]}
    memory = manifest["pipeline"].get("memory")
    if memory:
        inputs[memory["graph"]] = memory["inputs"]
    return inputs


def compare(
    checkpoint: str | None, export_dir: str | Path, clip_arguments: list[str], backends: list[str],
    precisions: list[str], out: str | Path, max_frames: int | None = None, synthetic_length: int = 12,
    layer_frames: int = 2, worst: int = 4, device: str = "auto", threads: int | None = None,
    engine_options: dict | None = None, progress: bool = True,
) -> dict:
    """Run the comparison and write the report folder `out` (report.json, report.md, PNG plots, masks/).

    checkpoint: the checkpoint `export_dir` (an fp32 export) was made from (None: the manifest's record, as
    `dpa check`); its variants are found by `dpa.runtime.engines.resolve_variant`. Returns the report (what
    report.json holds).
    """
    import torch
    from tqdm import tqdm

    from dpa.calibration.report import write_report
    from dpa.export.check import resolve_weights
    from dpa.runtime.chain import load_manifest
    from dpa.runtime.engines import BACKENDS, PRECISIONS
    from dpa.runtime.memory import OfflinePolicy, frames_for_references
    from dpa.runtime.preprocess import postprocess_probability
    from dpa.runtime.segmenter import Segmenter

    started = time.perf_counter()
    for backend in backends:
        if backend not in BACKENDS:
            raise DpaError(f"--backends {backend!r}: choose from {', '.join(BACKENDS)}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise DpaError(f"--precisions {precision!r}: choose from {', '.join(PRECISIONS)}")
    if not backends or not precisions:
        raise DpaError("give at least one backend and one precision")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create the report folder {out}: {error}") from error
    manifest = load_manifest(export_dir)
    if manifest.get("precision", "fp32") != "fp32":
        raise DpaError(f"--export {export_dir} holds {manifest['precision']} graphs; pass the fp32 export folder "
                       "(its variants are found in it)")
    if threads:
        torch.set_num_threads(threads)
    model, weights = resolve_weights(export_dir, manifest, checkpoint)
    size, memory = manifest["size"], manifest["pipeline"].get("memory")
    runs = []
    for backend in backends:
        for precision in precisions:
            chain, engine = _open_chain(export_dir, backend, precision, device, threads, engine_options or {})
            runs.append(Run(backend, precision, engine, chain))
    clips = load_labelled_clips(clip_arguments, size, synthetic_length, max_frames)
    reference_device = "cuda" if any(run.engine.device.startswith("cuda") for run in runs) else "cpu"
    reference = TorchReference(model, manifest, reference_device)
    graph_inputs = _graph_inputs(manifest)
    layer_feeds: dict[str, list[dict[str, np.ndarray]]] = {graph: [] for graph in graph_inputs}
    rows, references, worst_heap, flow_source = [], [], [], ""
    reference_latencies: list[float] = []
    bar = tqdm(total=sum(clip.length for clip in clips), desc="compare", unit="frame", disable=not progress)
    for clip in clips:
        flows, flow_source = offline_flows(clip.frames)
        segmenters = {}
        prime_seconds = {}
        for run in runs:
            policy = OfflinePolicy(clip.length, memory["capacity"]) if memory else None
            segmenters[run.label] = Segmenter(run.chain, policy, keep_values=True)
            if policy is not None:
                seconds = segmenters[run.label].prime({i: (clip.frames[i], flows[i]) for i in set(policy.references)})
                prime_seconds[run.label] = sum(v for k, v in seconds.items() if k in run.chain.manifest["graphs"])
        first = next(iter(segmenters.values()))
        reference_frames = frames_for_references(clip.length, memory["capacity"]) if memory else []
        reference.prime({i: first.model_inputs(clip.frames[i], flows[i]) for i in set(reference_frames)},
                        reference_frames)
        chosen_for_layers = set(np.linspace(0, clip.length - 1, min(layer_frames, clip.length)).round().astype(int)
                                .tolist()) if layer_frames > 0 else set()
        masks = {label: [] for label in [REFERENCE_LABEL, *segmenters]}
        ious = {run.label: [] for run in runs}
        errors = {run.label: [] for run in runs}
        clip_latencies = {run.label: [] for run in runs}
        clip_reference_latencies = []
        uncertain = 0  # reference pixels (S x S) with probability in (0.3, 0.7): masks there flip easily
        for index, (frame, flow) in enumerate(zip(clip.frames, flows, strict=True)):
            rgb, flow_input = first.model_inputs(frame, flow)
            values, seconds = reference.frame(rgb, flow_input)
            clip_reference_latencies.append(seconds)
            reference_probability = values["decoder/probability"][0, 0]
            uncertain += int(np.count_nonzero((reference_probability > 0.3) & (reference_probability < 0.7)))
            _, reference_mask = postprocess_probability(reference_probability, *frame.shape[:2])
            _write_mask(out / "masks" / clip.name / REFERENCE_LABEL / f"{clip.frame_names[index]}.png",
                        reference_mask)
            masks[REFERENCE_LABEL].append(np.packbits(reference_mask))
            frame_masks, frame_ious = {REFERENCE_LABEL: reference_mask}, {}
            for run in runs:
                result = segmenters[run.label].segment_inputs(rgb, flow_input, frame.shape[:2], index)
                iou = mask_iou(result.mask, reference_mask)
                ious[run.label].append(iou)
                frame_ious[run.label] = iou
                frame_masks[run.label] = result.mask
                masks[run.label].append(np.packbits(result.mask))
                _write_mask(out / "masks" / clip.name / run.label / f"{clip.frame_names[index]}.png", result.mask)
                difference = np.abs(run.chain.probability(result.values).astype(np.float64)
                                    - reference_probability.astype(np.float64))
                errors[run.label].append((float(difference.max()), float(difference.mean())))
                run.histogram += np.histogram(np.clip(difference, 0.0, 1.0), HISTOGRAM_EDGES)[0]
                for name, array in result.values.items():
                    if name.startswith("frame/") or name == reference.valid_source or name not in values:
                        continue
                    if name.startswith("memory/") and index > 0:
                        continue  # the bank is the same for every frame of the clip
                    run.stages.setdefault(name, TensorError()).add(array, values[name])
                latency = sum(s for stage, s in result.seconds.items() if stage in run.chain.manifest["graphs"])
                clip_latencies[run.label].append(latency)
            if index in chosen_for_layers:
                for graph, sources in graph_inputs.items():
                    if all(source in values for source in sources.values()):
                        layer_feeds[graph].append({name: values[source] for name, source in sources.items()})
            candidate = _WorstFrame(-min(frame_ious.values()), clip.name, index, clip.frame_names[index], frame,
                                    frame_masks, frame_ious, clip.masks[index] if clip.masks else None)
            if len(worst_heap) < worst:
                heapq.heappush(worst_heap, candidate)
            elif worst > 0:
                heapq.heappushpop(worst_heap, candidate)
            bar.update()
        shape = clip.frames[0].shape[:2]
        unpacked = {label: [np.unpackbits(m, count=shape[0] * shape[1]).reshape(shape).astype(bool) for m in packed]
                    for label, packed in masks.items()}
        reference_score = (_score(clip.frame_names, clip.masks, unpacked[REFERENCE_LABEL]) if clip.masks
                           else {"J_mean": None, "F_mean": None, "G": None})
        references.append({"clip": clip.name, "source": clip.source, "frames": clip.length,
                           "ground_truth": clip.masks is not None, "memory_frames": reference_frames,
                           "J_mean": reference_score["J_mean"], "F_mean": reference_score["F_mean"],
                           "G": reference_score["G"], "latency_ms": 1e3 * float(np.median(clip_reference_latencies)),
                           "uncertain_share": uncertain / (clip.length * size * size)})
        reference_latencies.extend(clip_reference_latencies)
        for run in runs:
            rows.append(_row(run, clip, ious[run.label], errors[run.label], clip_latencies[run.label],
                             prime_seconds.get(run.label), unpacked[run.label]))
            run.frame_latencies.extend(clip_latencies[run.label])
    bar.close()
    report = {
        "format": REPORT_FORMAT,
        "export": str(Path(export_dir).resolve()),
        "checkpoint": weights,
        "model": {"config": manifest["model"]["config"]["name"], "size": size,
                  "memory": memory["capacity"] if memory else None},
        "flow": flow_source,
        "memory_policy": "offline: the paper's reference frames k_i = floor(i (L-1) / (N-1)) of each clip, "
                         "entries built by each run's own graphs",
        "clips": [{"name": c.name, "source": c.source, "frames": c.length, "ground_truth": c.masks is not None}
                  for c in clips],
        "reference": {"backend": "pytorch", "precision": "fp32", "device": reference_device,
                      "latency_ms": 1e3 * float(np.median(reference_latencies)), "clips": references},
        "engines": {run.label: _describe_engine(run.engine) for run in runs},
        "rows": rows,
        "summary": [_summary(run, [row for row in rows if row["backend"] == run.backend
                                   and row["precision"] == run.precision]) for run in runs],
        "stages": _stages(runs),
        "layers": _layers(export_dir, runs, layer_feeds, threads),
        "histograms": {"edges": HISTOGRAM_EDGES.tolist(),
                       "counts": {run.label: run.histogram.tolist() for run in runs}},
        "notes": _notes(runs, clips),
        "masks": "masks/<clip>/<run>/<frame>.png (0/255), reference run " + REFERENCE_LABEL,
        "latency": "ms per frame, median over frames: the graphs' wall seconds (encoder, ima, decoder); "
                   "memory priming (ifa_memory on the reference frames) apart as prime_ms",
        "seconds": None,
    }
    worst_frames = sorted(worst_heap, reverse=True)
    report["worst_frames"] = [{"clip": w.clip, "frame": w.index, "name": w.name, "ious": w.ious}
                              for w in worst_frames]
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_report(report, out, worst_frames, [run.label for run in runs], REFERENCE_LABEL)
    return report


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
    from dpa.runtime.chain import graph_file, load_manifest
    from dpa.runtime.engines import resolve_variant

    fp32_manifest = load_manifest(export_dir)
    layers = {}
    for precision in sorted({run.precision for run in runs} - {"fp32"}):
        variant = resolve_variant(export_dir, precision)
        variant_manifest = load_manifest(variant)
        layers[precision] = {}
        for graph, graph_feeds in feeds.items():
            if not graph_feeds:
                continue
            rows = layer_errors(graph_file(export_dir, fp32_manifest, graph, "functions"),
                                graph_file(variant, variant_manifest, graph, "functions"), graph_feeds, threads)
            layers[precision][graph] = {"feeds": len(graph_feeds), "layers": len(rows), "top": rows[:top]}
    return layers


def _notes(runs: list[Run], clips: list[LabelledClip]) -> list[str]:
    notes = []
    compared = {clip.name for clip in clips}
    for run in runs:
        variant = run.engine.manifest.get("variant") or {}
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
