"""`dpa check`: an export directory's stage graphs, chained in ONNX Runtime (CPU), against the PyTorch model.

Frames come from a clip folder (a sequence folder with JPEGImages/, or a folder of images) or a synthetic clip;
flow is DIS in the offline direction, as offline inference computes it. The memory holds the paper's reference
frames k_i = floor(i (L-1) / (N-1)) of the whole clip, the same frames on both sides; each side builds its
entries with its own encoder and memory graph, so errors propagate along the chain as in deployment.

Tolerances (fp32 on both sides):
- probability map: max abs error <= 1e-4 (SPEC §4.1), chained and for the decoder graph in isolation.
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
  (A 1e-5 bound against PyTorch fp32 is below fp32's own reach for the untrained full-width decoder: on a
  blackswan frame, PyTorch fp32 differed from float64 by 3.9e-5 and ONNX Runtime by 2.7e-5. The trained tiny
  checkpoint meets it: 2.8e-6.)

`--fp64` also evaluates the whole chain in float64 and reports how far each fp32 implementation (PyTorch, ONNX
Runtime) is from it: when the probability tolerance is exceeded, this says whether the graphs are wrong or the
network amplifies fp32 rounding (untrained full-width networks do: their logits reach |100|s).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dpa.errors import DpaError
from dpa.export.agreement import TensorError
from dpa.export.frames import load_clip, preprocess_clip, synthetic_clip
from dpa.export.graphs import ENTRY_OUTPUTS, PROBABILITY
from dpa.runtime.chain import MemoryBank, StageChain, load_manifest, onnxruntime_sessions
from dpa.runtime.memory import frames_for_references
from dpa.training.model import DPA, MODALITIES, Encoded

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

    def ok(self, probability: bool) -> bool:
        if probability:
            return self.max_abs <= PROBABILITY_TOLERANCE
        return self.relative <= RELATIVE_TOLERANCE and self.cosine >= COSINE_TOLERANCE

    def to_dict(self, probability: bool) -> dict:
        return {"max_abs": self.max_abs, "cosine": self.cosine, "relative": self.relative, "scale": self.scale,
                "frames": self.frames, "ok": self.ok(probability)}


class Comparisons(dict):
    """output name -> Agreement; `add` compares an ONNX Runtime array with a PyTorch tensor."""

    def add(self, name: str, actual: np.ndarray, expected: torch.Tensor) -> None:
        self.setdefault(name, Agreement()).add(actual, expected.numpy())

    def report(self) -> dict[str, dict]:
        return {name: agreement.to_dict(name == f"decoder/{PROBABILITY}") for name, agreement in self.items()}


def resolve_weights(directory: str | Path, manifest: dict, checkpoint: str | None) -> tuple[DPA, dict]:
    """The PyTorch model the graphs of `directory` were exported from, at the manifest's S and N.

    checkpoint None: the manifest's record — the seeded initialisation, or the checkpoint it names (a relative
    path is looked up in `directory` first: `dpa export --init calibrated` stores its weights there). The
    weights must hash to the manifest's `weights_sha256`.
    """
    from dpa.export.exporter import weights_sha256
    from dpa.files import file_sha256
    from dpa.training.checkpoint import load_checkpoint, load_state
    from dpa.training.config import ModelConfig
    from dpa.training.model import build_model

    config = ModelConfig.from_dict(manifest["model"]["config"])
    recorded = manifest["checkpoint"]
    if checkpoint is None and recorded["path"] is None:
        model = build_model(config, seed=recorded["seed"])
        source = {"path": None, "random_init": True, "seed": recorded["seed"]}
    else:
        if checkpoint is None:
            path = Path(recorded["path"])
            checkpoint = str(Path(directory) / path if (Path(directory) / path).is_file() else path)
        payload = load_checkpoint(checkpoint)
        sha = file_sha256(payload["path"])
        if recorded["sha256"] and sha != recorded["sha256"]:
            log.warning("checkpoint %s (sha256 %s…) is not the exported file (sha256 %s…); comparing the weights",
                        payload["path"], sha[:12], recorded["sha256"][:12])
        model = DPA(config)
        load_state(model, payload["model"], source=payload["path"])
        source = {"path": payload["path"], "sha256": sha, "random_init": recorded["random_init"]}
    if weights_sha256(model) != manifest["model"]["weights_sha256"]:
        raise DpaError("these weights are not the ones the graphs were exported from (weights sha256 differs); "
                       "pass the checkpoint given to `dpa export`")
    return model.eval(), source


def _encoder_values(encoded: Encoded) -> dict[str, torch.Tensor]:
    """The encoder graph's outputs, by name, from the PyTorch stage."""
    values = dict(zip(("f1", "f2", "f3"), encoded.skips, strict=True))
    values.update({f"f4_{m}": encoded.f4[m] for m in MODALITIES})
    values.update({f"f5_{m}": encoded.f5[m] for m in MODALITIES})
    return values


def _torch_sources(encoded: Encoded, ima5: dict | None) -> dict[str, np.ndarray]:
    """PyTorch stage outputs as pipeline values ("encoder/…", "ima/…"), to feed a graph in isolation."""
    values = {f"encoder/{name}": t.numpy() for name, t in _encoder_values(encoded).items()}
    if ima5 is not None:
        values.update({f"ima/ima5_{m}": ima5[m].numpy() for m in MODALITIES})
    return values


def _step_inputs(manifest: dict, graph: str) -> dict[str, str]:
    """input name -> pipeline source of `graph` (a step, or the memory graph)."""
    memory = manifest["pipeline"]["memory"]
    if memory and graph == memory["graph"]:
        return memory["inputs"]
    return next(step["inputs"] for step in manifest["pipeline"]["steps"] if step["graph"] == graph)


def check_export(
    directory: str | Path, checkpoint: str | None = None, clip: str | Path | None = None, frames: int = 8,
    clip_length: int = 12, seed: int = 0, form: str | None = None, threads: int | None = None,
    progress: bool = True, fp64: bool = False,
) -> dict:
    """Compare the graphs of `directory` with PyTorch on `frames` frames spread over the clip. Returns the report.

    clip: a clip folder, or None for a synthetic clip of `clip_length` frames (seed `seed`) at S pixels.
    "outputs": the graphs chained (each fed by the graphs before it, as deployed); "isolated": each graph fed
    PyTorch's tensors, which separates a graph's own error from the network's amplification of its inputs'.
    fp64: also run the PyTorch chain in float64 and report both fp32 implementations' distance to it.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    manifest = load_manifest(directory)
    model, weights = resolve_weights(directory, manifest, checkpoint)
    config = model.config
    sessions, form = onnxruntime_sessions(directory, manifest, form=form, threads=threads)
    chain = StageChain(sessions, manifest)
    source = load_clip(clip) if clip is not None else synthetic_clip(clip_length, config.size, seed)
    length = len(source.frames)
    checked = sorted({int(round(i)) for i in np.linspace(0, length - 1, min(frames, length))})
    references = frames_for_references(length, config.memory) if config.uses_ifa else []
    rgb, flow, flow_source = preprocess_clip(source, sorted(set(checked) | set(references)), config.size)
    log.info("checking %s (%s form) on %s: frames %s, references %s", directory, form, source.source, checked,
             references)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, np.float32))[None]

    chained, isolated, exact_comparisons = Comparisons(), Comparisons(), Comparisons()
    exact = _float64(model) if fp64 else None
    exact_entries: list[dict[str, torch.Tensor]] = []
    bar = tqdm(total=len(references) + len(checked), desc="check", unit="frame", disable=not progress)
    bank = torch_bank = None
    torch_entries: list[dict[str, torch.Tensor]] = []
    torch_memory = torch_valid = None
    with torch.no_grad():
        if config.uses_ifa:
            bank, torch_bank = MemoryBank(manifest), MemoryBank(manifest)
            for slot, index in enumerate(references):
                entry = chain.memory_entry(chain.frame_values(rgb[index], flow[index]))
                bank.write(slot, entry)
                encoded = model.encode(tensor(rgb[index]), tensor(flow[index]))
                expected = model.memory_entry(encoded.f5)
                torch_entry = dict(zip(ENTRY_OUTPUTS, (*expected["appearance"], *expected["motion"]), strict=True))
                torch_entries.append(torch_entry)
                if exact is not None:
                    encoded64 = exact.encode(tensor(rgb[index]).double(), tensor(flow[index]).double())
                    entry64 = exact.memory_entry(encoded64.f5)
                    exact_entries.append(dict(zip(ENTRY_OUTPUTS, (*entry64["appearance"], *entry64["motion"]),
                                                  strict=True)))
                torch_bank.write(slot, {name: t.numpy() for name, t in torch_entry.items()})
                alone = chain.run_graph("ifa_memory", _step_inputs(manifest, "ifa_memory"),
                                        _torch_sources(encoded, None))
                for name in ENTRY_OUTPUTS:
                    chained.add(f"ifa_memory/{name}", entry[name], torch_entry[name])
                    isolated.add(f"ifa_memory/{name}", alone[f"ifa_memory/{name}"], torch_entry[name])
                bar.update()
            torch_memory = {
                m: tuple(torch.stack([e[f"{kind}_{m}"] for e in torch_entries], 1) for kind in ("keys", "values"))
                for m in MODALITIES
            }
            torch_valid = torch.ones(1, len(references), dtype=torch.bool)
        first_query = None
        for index in checked:
            values = chain.process(rgb[index], flow[index], bank)
            encoded = model.encode(tensor(rgb[index]), tensor(flow[index]))
            for name, expected in _encoder_values(encoded).items():
                chained.add(f"encoder/{name}", values[f"encoder/{name}"], expected)
            ima5 = model.ima_block5(encoded.f5) if config.uses_ima else None
            torch_values = _torch_sources(encoded, ima5)
            if ima5 is not None:
                alone = chain.run_graph("ima", _step_inputs(manifest, "ima"), torch_values)
                for m in MODALITIES:
                    chained.add(f"ima/ima5_{m}", values[f"ima/ima5_{m}"], ima5[m])
                    isolated.add(f"ima/ima5_{m}", alone[f"ima/ima5_{m}"], ima5[m])
            probability = torch.sigmoid(model.decode(encoded, ima5, torch_memory, torch_valid)["p1"])
            chained.add(f"decoder/{PROBABILITY}", values[f"decoder/{PROBABILITY}"], probability)
            if torch_bank is not None:
                torch_values.update(torch_bank.sources())
            alone = chain.run_graph("decoder", _step_inputs(manifest, "decoder"), torch_values)
            isolated.add(f"decoder/{PROBABILITY}", alone[f"decoder/{PROBABILITY}"], probability)
            if exact is not None:
                encoded64 = exact.encode(tensor(rgb[index]).double(), tensor(flow[index]).double())
                ima64 = exact.ima_block5(encoded64.f5) if config.uses_ima else None
                probability64 = torch.from_numpy(_decode(exact, encoded64, ima64, exact_entries, torch.float64))
                exact_comparisons.add("pytorch_fp32", probability.double().numpy(), probability64)
                exact_comparisons.add("onnxruntime", values[f"decoder/{PROBABILITY}"], probability64)
            if first_query is None:
                first_query = (encoded, ima5)
            bar.update()
        bar.close()
        validity = _memory_validity(model, chain, manifest, first_query, torch_entries, seed)

    outputs, isolated_outputs = chained.report(), isolated.report()
    report = {
        "ok": all(o["ok"] for o in [*outputs.values(), *isolated_outputs.values()]) and validity.get("ok", True),
        "outputs": outputs,
        "probability_max_abs": outputs[f"decoder/{PROBABILITY}"]["max_abs"],
        "isolated": isolated_outputs,
        "memory_validity": validity,
        "float64": {name: {"max_abs": a.max_abs, "cosine": a.cosine} for name, a in exact_comparisons.items()},
        "tolerances": {
            "probability_max_abs": PROBABILITY_TOLERANCE,
            "intermediate_relative_max_abs": RELATIVE_TOLERANCE,
            "intermediate_cosine_min": COSINE_TOLERANCE,
            "memory_validity_garbage_effect": 0.0,
            "memory_validity_max_abs": PROBABILITY_TOLERANCE,
        },
        "directory": str(directory),
        "form": form,
        "config": config.name,
        "size": config.size,
        "memory": config.memory,
        "weights": weights,
        "clip": {"name": source.name, "source": source.source, "length": length,
                 "frame_size": list(source.frames[0].shape[:2])},
        "flow": flow_source,
        "frames": checked,
        "reference_frames": references,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return report


def _float64(model: DPA) -> DPA:
    """A float64 copy of the model: the exact evaluation of the same network, free of fp32 rounding."""
    return copy.deepcopy(model).double().eval()


def _decode(model: DPA, encoded: Encoded, ima5: dict | None, entries: list[dict], dtype: torch.dtype) -> np.ndarray:
    """PyTorch probability (float64 array) of a query frame with `entries` (all valid; none without IFA) as its
    memory, computed in `dtype`."""
    cast = {k: v.to(dtype) for k, v in _encoder_values(encoded).items()}
    encoded = Encoded(skips=(cast["f1"], cast["f2"], cast["f3"]), f4={m: cast[f"f4_{m}"] for m in MODALITIES},
                      f5={m: cast[f"f5_{m}"] for m in MODALITIES})
    ima5 = {m: t.to(dtype) for m, t in ima5.items()} if ima5 is not None else None
    memory = valid = None
    if entries:
        memory = {
            m: tuple(torch.stack([e[f"{kind}_{m}"] for e in entries], 1).to(dtype) for kind in ("keys", "values"))
            for m in MODALITIES
        }
        valid = torch.ones(1, len(entries), dtype=torch.bool)
    return torch.sigmoid(model.decode(encoded, ima5, memory, valid)["p1"]).double().numpy()


def _memory_validity(
    model: DPA, chain: StageChain, manifest: dict, query: tuple | None, torch_entries: list[dict], seed: int
) -> dict:
    """k = 1 … N: the decoder graph with k valid slots among N and garbage in the others.

    garbage_effect: against the same bank with zeros instead of garbage — must be exactly 0 (nothing of an
    empty slot reaches the result). max_abs / max_abs_fp64: against PyTorch (fp32 / float64) with those k
    references alone. The decoder graph is fed the PyTorch model's tensors for the query frame.
    """
    config = model.config
    if not config.uses_ifa or query is None:
        return {}
    encoded, ima5 = query
    exact = _float64(model)
    rng = np.random.default_rng(seed)
    inputs = _step_inputs(manifest, "decoder")
    capacity = config.memory
    errors, errors_fp64, effects = {}, {}, {}
    for k in range(1, capacity + 1):
        chosen = [torch_entries[i % len(torch_entries)] for i in range(k)]
        slots = list(range(capacity - 1, capacity - 1 - k, -1))  # the last k, in reverse: position is irrelevant
        probabilities = []
        for fill in ("garbage", "zeros"):
            bank = MemoryBank(manifest)
            for array in bank.tensors.values():
                if fill == "garbage":
                    garbage = rng.standard_normal(array.shape).astype(array.dtype) * 1e3
                    if config.ifa == "prototype":
                        garbage.reshape(-1)[::7] = np.nan
                        garbage.reshape(-1)[3::11] = np.inf
                    array[...] = garbage
            for slot, entry in zip(slots, chosen, strict=True):
                bank.write(slot, {name: t.numpy() for name, t in entry.items()})
            values = _torch_sources(encoded, ima5)
            values.update(bank.sources())
            probabilities.append(chain.run_graph("decoder", inputs, values)[f"decoder/{PROBABILITY}"])
        actual = probabilities[0].astype(np.float64)
        errors[str(k)] = float(np.abs(actual - _decode(model, encoded, ima5, chosen, torch.float32)).max())
        errors_fp64[str(k)] = float(np.abs(actual - _decode(exact, encoded, ima5, chosen, torch.float64)).max())
        effects[str(k)] = float(np.abs(probabilities[0] - probabilities[1]).max())
    return {
        "max_abs": errors,
        "max_abs_fp64": errors_fp64,
        "garbage_effect": effects,
        "garbage": _garbage_kind(config),
        "ok": all(e <= PROBABILITY_TOLERANCE for e in errors.values()) and not any(effects.values()),
    }


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
