"""Chain the stage graphs of an engine frame by frame, as its manifest's `pipeline` says. Torch-free.

Values are named by their pipeline source: "frame/rgb", "<graph>/<output>", "memory/<bank tensor>". Between the
graphs they stay the engine's own tensors (`Runner.run_resident`): device memory on a GPU backend, so a frame
crosses to the device once (its rgb and flow) and back once (the probability map). Which frames enter the memory
bank (the admission policy) is the caller's choice: `dpa check` and offline inference use the paper's offline
sampling, the runtime its live policies (`dpa.runtime.memory`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from dpa.errors import DpaError
from dpa.manifest import TensorSpec
from dpa.runtime.engine import Engine
from dpa.runtime.memory import MemoryBank


class StageChain:
    """Runs an engine's graphs in pipeline order."""

    def __init__(self, engine: Engine):
        manifest = engine.manifest
        missing = sorted(set(manifest.graphs) - set(engine.runners))
        if missing:
            raise DpaError(f"no runner for graphs {missing}")
        self.engine = engine
        self.runners = engine.runners
        self.manifest = manifest
        self.transfer = engine.transfer
        self.pipeline = manifest.pipeline
        self.memory = manifest.pipeline.memory
        self.seconds: dict[str, float] = {}  # graph -> wall seconds of its runs since `reset_seconds`
        self._frame_specs = {source.split("/", 1)[1]: manifest.graphs[step.graph].input(name)
                             for step in self.pipeline.steps for name, source in step.inputs.items()
                             if source.startswith("frame/")}

    def run_graph(self, graph: str, sources: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
        """Run `graph` with each input taken from values[sources[input]] (the engine's tensors, or host arrays,
        which are conformed to the manifest's shape and dtype); returns {"graph/output": tensor}."""
        spec = self.manifest.graphs[graph]
        feed = {}
        for tensor in spec.inputs:
            source = sources[tensor.name]
            if source not in values:
                raise DpaError(f"graph {graph} input {tensor.name} needs {source}, which is not computed yet")
            value = values[source]
            feed[tensor.name] = conform(value, tensor, f"{graph}/{tensor.name}") if isinstance(value, np.ndarray) \
                else value
        started = time.perf_counter()
        outputs = self.runners[graph].run_resident(feed)
        self.seconds[graph] = self.seconds.get(graph, 0.0) + time.perf_counter() - started
        return {f"{graph}/{name}": outputs[name] for name in spec.output_names}

    def reset_seconds(self) -> dict[str, float]:
        """The per-graph seconds accumulated since the last call (graph -> seconds), then start again from zero."""
        seconds, self.seconds = self.seconds, {}
        return seconds

    def frame_values(self, rgb: np.ndarray, flow: np.ndarray) -> dict[str, np.ndarray]:
        """The pipeline's frame inputs from rgb, flow (3, S, S) or (1, 3, S, S) float32 pre-processed, shaped and
        typed as the graph that reads them takes them (host arrays: each runner copies them in)."""
        return {f"frame/{name}": conform(array, self._frame_specs[name], f"frame/{name}")
                for name, array in (("rgb", rgb), ("flow", flow))}

    def memory_entry(self, values: dict[str, Any]) -> dict[str, Any]:
        """A frame's memory entry (entry output name -> (1, T, D) tensor), running the steps it depends on first.

        `values` (the frame's values so far) is updated with everything computed.
        """
        if not self.memory:
            raise DpaError("this configuration has no IFA memory")
        needed = set(self.memory.inputs.values())
        for step in self.pipeline.steps:
            if needed <= values.keys() or step.reads_memory:
                break
            values.update(self.run_graph(step.graph, step.inputs, values))
        outputs = self.run_graph(self.memory.graph, self.memory.inputs, values)
        values.update(outputs)
        return {name.split("/", 1)[1]: tensor for name, tensor in outputs.items()}

    def new_bank(self) -> MemoryBank:
        """An empty memory bank for this chain's graphs, its tensors on the engine's device."""
        return MemoryBank(self.manifest, self.transfer)

    def process(self, rgb: np.ndarray, flow: np.ndarray, bank: MemoryBank | None = None) -> dict[str, Any]:
        """Run every step for one frame against the memory bank; returns all values by source name.

        The probability map is `probability(values)`. An empty (or absent) bank uses the current frame as its only
        reference (`empty_bank: current_frame`), like the PyTorch model.
        """
        values: dict[str, Any] = self.frame_values(rgb, flow)
        for step in self.pipeline.steps:
            if self.memory and step.reads_memory:
                if bank is None or bank.count == 0:
                    if self.memory.empty_bank != "current_frame":
                        raise DpaError("the memory bank is empty and the pipeline names no empty-bank policy")
                    own = self.new_bank()
                    own.write(0, self.memory_entry(values))
                    values.update(own.sources())
                else:
                    values.update(bank.sources())
            if not all(f"{step.graph}/{name}" in values for name in self.manifest.graphs[step.graph].output_names):
                values.update(self.run_graph(step.graph, step.inputs, values))
        return values

    def probability(self, values: Mapping[str, Any]) -> np.ndarray:
        """The (S, S) foreground probability of a processed frame (the one tensor that comes back to the host)."""
        return self.transfer.download(values[self.pipeline.output])[0, 0]

    def download(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every value as a host array (for `dpa compare`, which looks at each intermediate tensor)."""
        return {name: self.transfer.download(value) for name, value in values.items()}


def conform(array: np.ndarray, tensor: TensorSpec, label: str) -> np.ndarray:
    """array as the contiguous, exactly shaped and typed feed that `tensor` (a manifest entry) declares."""
    array = np.asarray(array)
    if array.shape != tensor.shape:
        if array.size != int(np.prod(tensor.shape)):
            raise DpaError(f"{label}: got shape {array.shape}, the graph needs {tensor.shape}")
        array = array.reshape(tensor.shape)
    return np.ascontiguousarray(array, dtype=tensor.numpy_dtype)
