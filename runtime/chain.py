"""Chain the stage graphs of an export directory frame by frame, as its manifest's `pipeline` says. Torch-free.

`StageChain` runs the graphs through any sessions that answer `run(output_names, feed) -> list of arrays`
(ONNX Runtime's `InferenceSession`, or a runtime engine with the same call); `MemoryBank` is the fixed-
capacity IFA memory with its validity mask, preallocated from the manifest's shapes. Which frames enter the
memory (the admission policy) is the caller's choice; `dpa check` uses the paper's offline sampling, the
runtime its live policies.

Values are named by their pipeline source: "frame/rgb", "<graph>/<output>", "memory/<bank tensor>".
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from dpa.errors import DpaError, require_module

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dpa-stage-graphs/1"
FORMS = ("functions", "plugin", "portable")
RUNNABLE_IN_ONNXRUNTIME = ("functions", "portable")


class Session(Protocol):
    """What the chain needs of an inference session (ONNX Runtime's InferenceSession has it)."""

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def load_manifest(directory: str | Path) -> dict:
    """The manifest of an export directory; DpaError when it is missing or not a DPA stage-graph manifest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DpaError(f"{path} not found: is {directory} a `dpa export` output directory?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DpaError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DpaError(f"{path} is not a {MANIFEST_FORMAT} manifest; re-export with `dpa export`")
    return manifest


def graph_file(directory: str | Path, manifest: dict, graph: str, form: str) -> Path:
    """The file of `graph` in `form`; DpaError when that form was not exported or the file is missing."""
    files = manifest["graphs"][graph]["files"]
    if form not in files:
        raise DpaError(f"form {form!r} was not exported to {directory} (exported: {', '.join(files)}); "
                       f"re-export with --form {form} or --form all")
    path = Path(directory) / files[form]
    if not path.is_file():
        raise DpaError(f"{path} is missing: the export directory is incomplete; re-export")
    return path


def onnxruntime_sessions(
    directory: str | Path, manifest: dict | None = None, form: str | None = None, threads: int | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> tuple[dict[str, Session], str]:
    """ONNX Runtime sessions for every graph of an export directory -> (graph -> session, the form used).

    form None: `functions` when exported, else `portable`. The `plugin` form needs TensorRT's plugins and
    cannot run here. threads: intra-op threads (None: ONNX Runtime's default).
    """
    ort = require_module("onnxruntime", "onnxruntime", "running the stage graphs in ONNX Runtime")
    manifest = manifest or load_manifest(directory)
    if form is None:
        exported = manifest["forms"]
        runnable = [f for f in RUNNABLE_IN_ONNXRUNTIME if f in exported]
        if not runnable:
            raise DpaError(f"{directory} holds only the {', '.join(exported)} form, which ONNX Runtime cannot run "
                           "(custom nodes without function bodies); re-export with --form functions or portable")
        form = runnable[0]
    if form not in RUNNABLE_IN_ONNXRUNTIME:
        raise DpaError(f"ONNX Runtime cannot run the {form!r} form (its custom nodes are TensorRT plugins); "
                       f"use one of {', '.join(RUNNABLE_IN_ONNXRUNTIME)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(str(graph_file(directory, manifest, name, form)), options, providers=list(providers))
        for name in manifest["graphs"]
    }
    return sessions, form


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype({"float32": np.float32, "float16": np.float16}.get(name, name))


class MemoryBank:
    """The IFA memory: per bank tensor a preallocated (1, N, T, D) array, and the validity mask (1, N).

    Slots are written with a frame's entry (the memory graph's outputs) and cleared by setting their
    validity to 0; a cleared slot's old contents stay and are ignored exactly by the decoder.
    """

    def __init__(self, manifest: dict):
        memory = manifest["pipeline"].get("memory")
        if not memory:
            raise DpaError(f"config {manifest['model']['config']['name']} has no IFA: it has no memory bank")
        decoder = {tensor["name"]: tensor for tensor in manifest["graphs"]["decoder"]["inputs"]}
        self.capacity: int = memory["capacity"]
        self.bank_to_entry: dict[str, str] = dict(memory["bank"])
        self.valid_name: str = memory["valid"]
        self.tensors = {
            name: np.zeros(decoder[name]["shape"], _numpy_dtype(decoder[name]["dtype"])) for name in self.bank_to_entry
        }
        self.valid = np.zeros(decoder[self.valid_name]["shape"], _numpy_dtype(decoder[self.valid_name]["dtype"]))

    @property
    def count(self) -> int:
        """Number of valid slots."""
        return int(np.count_nonzero(self.valid))

    def write(self, slot: int, entry: Mapping[str, np.ndarray]) -> None:
        """Store a frame's entry (entry output name -> (1, T, D)) in `slot` and mark it valid."""
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} outside a memory of {self.capacity} slots")
        for bank_name, entry_name in self.bank_to_entry.items():
            self.tensors[bank_name][:, slot] = entry[entry_name]
        self.valid[:, slot] = 1

    def clear(self, slot: int | None = None) -> None:
        """Mark one slot (or every slot) empty."""
        if slot is None:
            self.valid[:] = 0
        else:
            self.valid[:, slot] = 0

    def sources(self) -> dict[str, np.ndarray]:
        """The bank as pipeline values: "memory/<bank tensor>" and "memory/<valid>"."""
        values = {f"memory/{name}": array for name, array in self.tensors.items()}
        values[f"memory/{self.valid_name}"] = self.valid
        return values


class StageChain:
    """Runs a manifest's graphs in pipeline order through `sessions` (graph name -> session)."""

    def __init__(self, sessions: Mapping[str, Session], manifest: dict):
        missing = sorted(set(manifest["graphs"]) - set(sessions))
        if missing:
            raise DpaError(f"no session for graphs {missing}")
        self.sessions = sessions
        self.manifest = manifest
        self.pipeline = manifest["pipeline"]
        self.memory = self.pipeline.get("memory")
        self._inputs = {name: graph["inputs"] for name, graph in manifest["graphs"].items()}
        self._outputs = {
            name: [tensor["name"] for tensor in graph["outputs"]] for name, graph in manifest["graphs"].items()
        }
        self.seconds: dict[str, float] = {}  # graph -> wall seconds of its runs since `reset_seconds`

    def run_graph(
        self, graph: str, sources: Mapping[str, str], values: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run `graph` with each input taken from values[sources[input]]; returns {"graph/output": array}."""
        feed = {}
        for tensor in self._inputs[graph]:
            source = sources[tensor["name"]]
            if source not in values:
                raise DpaError(f"graph {graph} input {tensor['name']} needs {source}, which is not computed yet")
            feed[tensor["name"]] = _conform(values[source], tensor, f"{graph}/{tensor['name']}")
        started = time.perf_counter()
        outputs = self.sessions[graph].run(self._outputs[graph], feed)
        self.seconds[graph] = self.seconds.get(graph, 0.0) + time.perf_counter() - started
        return {f"{graph}/{name}": array for name, array in zip(self._outputs[graph], outputs, strict=True)}

    def reset_seconds(self) -> dict[str, float]:
        """The per-graph seconds accumulated since the last call (graph -> seconds), then start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds

    def frame_values(self, rgb: np.ndarray, flow: np.ndarray) -> dict[str, np.ndarray]:
        """The pipeline's frame inputs: rgb, flow (3, S, S) or (1, 3, S, S) float32 pre-processed."""
        return {"frame/rgb": rgb, "frame/flow": flow}

    def memory_entry(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A frame's memory entry (entry output name -> (1, T, D)), running the steps it depends on first.

        `values` (the frame's values so far) is updated with everything computed.
        """
        if not self.memory:
            raise DpaError("this configuration has no IFA memory")
        needed = set(self.memory["inputs"].values())
        for step in self.pipeline["steps"]:
            if needed <= values.keys():
                break
            if any(source.startswith("memory/") for source in step["inputs"].values()):
                break
            values.update(self.run_graph(step["graph"], step["inputs"], values))
        graph = self.memory["graph"]
        outputs = self.run_graph(graph, self.memory["inputs"], values)
        values.update(outputs)
        return {name.split("/", 1)[1]: array for name, array in outputs.items()}

    def process(self, rgb: np.ndarray, flow: np.ndarray, bank: MemoryBank | None = None) -> dict[str, np.ndarray]:
        """Run every step for one frame against the memory bank; returns all values by source name.

        The probability map is values[pipeline["output"]] (1, 1, S, S). An empty (or absent) bank uses the
        current frame as its only reference (`empty_bank: current_frame`), like the PyTorch model.
        """
        values = self.frame_values(rgb, flow)
        for step in self.pipeline["steps"]:
            if self.memory and any(source.startswith("memory/") for source in step["inputs"].values()):
                if bank is None or bank.count == 0:
                    if self.memory.get("empty_bank") != "current_frame":
                        raise DpaError("the memory bank is empty and the pipeline names no empty-bank policy")
                    own = MemoryBank(self.manifest)
                    own.write(0, self.memory_entry(values))
                    values.update(own.sources())
                else:
                    values.update(bank.sources())
            if not all(f"{step['graph']}/{name}" in values for name in self._outputs[step["graph"]]):
                values.update(self.run_graph(step["graph"], step["inputs"], values))
        return values

    def probability(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The (S, S) foreground probability of a processed frame."""
        return values[self.pipeline["output"]][0, 0]


def _conform(array: np.ndarray, tensor: dict, label: str) -> np.ndarray:
    """array as the contiguous, exactly shaped and typed feed that `tensor` (a manifest entry) declares."""
    array = np.asarray(array)
    shape = tuple(tensor["shape"])
    if array.shape != shape:
        if array.size != int(np.prod(shape)):
            raise DpaError(f"{label}: got shape {array.shape}, the graph needs {shape}")
        array = array.reshape(shape)
    return np.ascontiguousarray(array, dtype=_numpy_dtype(tensor["dtype"]))
