"""The export -> runtime contract: `manifest.json` of an export directory, as typed, frozen data. Torch-free.

`dpa export` writes it (one `GraphSpec` per stage graph, the `Pipeline` that chains them per frame, the model
and the weights it came from); `dpa calibrate` writes variants of it (fp16, int8) with a `variant` record;
every engine, `dpa check`, `dpa compare` and `dpa bench` read it through `Manifest.load`. This module is the one
definition of the file's format, the graph forms and the precisions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpa.errors import DpaError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dpa-stage-graphs/1"
FORMS = ("functions", "plugin", "portable")  # custom nodes + function bodies; custom nodes only; standard ops
RUNNABLE_IN_ONNXRUNTIME = ("functions", "portable")
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "int64")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape and dtype name (float32, float16, int64)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @classmethod
    def from_dict(cls, data: Mapping) -> TensorSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """One stage graph: its file per exported form, its I/O, the custom nodes per form (op type -> count), and
    what the export recorded about it (`details`: bytes, seconds, verification)."""

    name: str
    files: Mapping[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    custom_nodes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(tensor for tensor in self.inputs if tensor.name == name)

    @classmethod
    def from_dict(cls, name: str, data: Mapping) -> GraphSpec:
        known = ("file", "files", "inputs", "outputs", "custom_nodes")
        return cls(
            name=name,
            files=dict(data["files"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            custom_nodes={form: dict(counts) for form, counts in data.get("custom_nodes", {}).items()},
            details={key: value for key, value in data.items() if key not in known},
        )

    def to_dict(self) -> dict:
        return {
            "file": next(iter(self.files.values())),
            "files": dict(self.files),
            **{key: value for key, value in self.details.items() if key in ("bytes",)},
            "inputs": [tensor.to_dict() for tensor in self.inputs],
            "outputs": [tensor.to_dict() for tensor in self.outputs],
            "custom_nodes": {form: dict(counts) for form, counts in self.custom_nodes.items()},
            **{key: value for key, value in self.details.items() if key not in ("bytes",)},
        }


@dataclass(frozen=True)
class Step:
    """One graph run per frame: each input is taken from a source, "frame/<input>", "<graph>/<output>" or
    "memory/<bank tensor>"."""

    graph: str
    inputs: Mapping[str, str]

    @property
    def reads_memory(self) -> bool:
        return any(source.startswith("memory/") for source in self.inputs.values())


@dataclass(frozen=True)
class MemorySpec:
    """The IFA memory bank: N slots along `slot_axis` of each bank tensor (decoder inputs), filled with the outputs
    of `graph` run on a frame's own tensors (`inputs`), `bank` mapping bank tensor -> entry output, `valid` the
    validity input (1 = slot holds an entry, 0 = ignored exactly). empty_bank: what a frame uses when no slot is
    valid ("current_frame": its own entry)."""

    capacity: int
    graph: str
    inputs: Mapping[str, str]
    bank: Mapping[str, str]
    valid: str
    slot_axis: int = 1
    empty_bank: str = "current_frame"
    admission: str = ""


@dataclass(frozen=True)
class Pipeline:
    """How a runtime chains the graphs for one frame; `output` is the probability map's source."""

    frame_inputs: tuple[str, ...]
    steps: tuple[Step, ...]
    output: str
    memory: MemorySpec | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> Pipeline:
        memory = data.get("memory")
        return cls(
            frame_inputs=tuple(data["frame_inputs"]),
            steps=tuple(Step(step["graph"], dict(step["inputs"])) for step in data["steps"]),
            output=str(data["output"]),
            memory=None if not memory else MemorySpec(
                capacity=int(memory["capacity"]), graph=memory["graph"], inputs=dict(memory["inputs"]),
                bank=dict(memory["bank"]), valid=memory["valid"], slot_axis=int(memory.get("slot_axis", 1)),
                empty_bank=memory.get("empty_bank", "current_frame"), admission=memory.get("admission", ""),
            ),
        )

    def to_dict(self) -> dict:
        memory = None
        if self.memory is not None:
            memory = {"capacity": self.memory.capacity, "graph": self.memory.graph, "inputs": dict(self.memory.inputs),
                      "slot_axis": self.memory.slot_axis, "bank": dict(self.memory.bank), "valid": self.memory.valid,
                      "admission": self.memory.admission, "empty_bank": self.memory.empty_bank}
        return {"frame_inputs": list(self.frame_inputs),
                "steps": [{"graph": step.graph, "inputs": dict(step.inputs)} for step in self.steps],
                "output": self.output, "memory": memory}

    def step(self, graph: str) -> Step:
        return next(step for step in self.steps if step.graph == graph)


@dataclass(frozen=True)
class ModelRecord:
    """The network the graphs were exported from: its configuration (as `ModelConfig.to_dict()`), parameter count
    and the sha256 of its weights (`dpa.export.exporter.weights_sha256`)."""

    config: Mapping[str, Any]
    parameters: int
    weights_sha256: str

    @property
    def name(self) -> str:
        return str(self.config.get("name", "?"))


@dataclass(frozen=True)
class WeightsRecord:
    """Where the exported weights came from. init: "checkpoint", "random" (seeded initialisation) or "calibrated"
    (that initialisation scale-calibrated, saved next to the graphs as `path`, relative to the export)."""

    init: str
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    step: int | None = None
    calibration: str | None = None

    @property
    def random_init(self) -> bool:
        return self.init != "checkpoint"

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "random_init": self.random_init, "init": self.init,
                "seed": self.seed, "step": self.step, "calibration": self.calibration}


@dataclass(frozen=True)
class Manifest:
    """An export directory's manifest (see the module doc). `graphs` keeps the chaining order; `variant` is set
    on fp16/int8 variants written by `dpa calibrate` (what they were made from and how); `record` holds what
    the writer noted for people (creation time, producer versions, timings)."""

    size: int
    memory: int
    graphs: Mapping[str, GraphSpec]
    pipeline: Pipeline
    model: ModelRecord
    checkpoint: WeightsRecord
    precision: str = "fp32"
    forms: tuple[str, ...] = ("functions",)
    batch: int = 1
    opset: int = 18
    custom_ops: Mapping[str, Any] = field(default_factory=dict)
    variant: Mapping[str, Any] | None = None
    record: Mapping[str, Any] = field(default_factory=dict)

    # ---- reading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """The manifest of an export directory; DpaError when it is missing, unreadable or not a DPA manifest."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise DpaError(f"{path} not found: is {directory} a `dpa export` output directory?")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DpaError(f"cannot read {path}: {error}") from error
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise DpaError(f"{where} is not a {MANIFEST_FORMAT} manifest; re-export with `dpa export`")
        try:
            model = data["model"]
            manifest = cls(
                size=int(data["size"]),
                memory=int(data["memory"]),
                graphs={name: GraphSpec.from_dict(name, graph) for name, graph in data["graphs"].items()},
                pipeline=Pipeline.from_dict(data["pipeline"]),
                model=ModelRecord(dict(model["config"]), int(model["parameters"]), str(model["weights_sha256"])),
                checkpoint=WeightsRecord(**{key: value for key, value in data["checkpoint"].items()
                                            if key != "random_init"}),
                precision=data.get("precision", "fp32"),
                forms=tuple(data["forms"]),
                batch=int(data.get("batch", 1)),
                opset=int(data.get("opset", 18)),
                custom_ops=dict(data.get("custom_ops", {})),
                variant=data.get("variant"),
                record={key: data[key] for key in ("created", "producer", "export_seconds") if key in data},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DpaError(f"{where} is incomplete or malformed ({type(error).__name__}: {error}); "
                           "re-export with `dpa export`") from error
        manifest.validate(where)
        return manifest

    def validate(self, where: str = "manifest") -> None:
        """DpaError when the manifest contradicts itself: unknown forms or precision, steps naming graphs or
        sources that do not exist, or a memory bank that does not match the decoder's inputs."""
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        problems += [f"unknown form {form!r}" for form in self.forms if form not in FORMS]
        for graph in self.graphs.values():
            problems += [f"graph {graph.name} has no file for form {form}" for form in self.forms
                         if form not in graph.files]
            problems += [f"graph {graph.name} tensor {tensor.name} has dtype {tensor.dtype}"
                         for tensor in graph.inputs + graph.outputs if tensor.dtype not in DTYPES]
        known = {f"frame/{name}" for name in self.pipeline.frame_inputs}
        memory = self.pipeline.memory
        if memory is not None:
            known |= {f"memory/{name}" for name in (*memory.bank, memory.valid)}
        for step in self.pipeline.steps:
            graph = self.graphs.get(step.graph)
            if graph is None:
                problems.append(f"pipeline step names graph {step.graph}, which is not exported")
                continue
            problems += [f"graph {step.graph} input {name} has no source" for name in graph.input_names
                         if name not in step.inputs]
            problems += [f"graph {step.graph} input {name} reads {source}, which nothing produces before it"
                         for name, source in step.inputs.items() if source not in known]
            known |= {f"{graph.name}/{name}" for name in graph.output_names}
        if self.pipeline.output not in known:
            problems.append(f"pipeline output {self.pipeline.output} is never produced")
        if memory is not None:
            if memory.graph not in self.graphs:
                problems.append(f"memory graph {memory.graph} is not exported")
            if memory.capacity != self.memory:
                problems.append(f"memory capacity {memory.capacity} differs from N = {self.memory}")
        if problems:
            raise DpaError(f"{where} is inconsistent: " + "; ".join(problems[:5]) + "; re-export with `dpa export`")

    # ---- using -------------------------------------------------------------------------------------------
    @property
    def config_name(self) -> str:
        return self.model.name

    @property
    def memory_spec(self) -> MemorySpec | None:
        return self.pipeline.memory

    def graph_file(self, directory: str | Path, graph: str, form: str, verify: bool = True) -> Path:
        """The file of `graph` in `form`; DpaError when that form was not exported, the file is missing or (with
        `verify`) its bytes are not those the export recorded (sha256): a file replaced or damaged since."""
        files = self.graphs[graph].files
        if form not in files:
            raise DpaError(f"form {form!r} was not exported to {directory} (exported: {', '.join(files)}); "
                           f"re-export with --form {form} or --form all")
        path = Path(directory) / files[form]
        if not path.is_file():
            raise DpaError(f"{path} is missing: the export directory is incomplete; re-export")
        expected = self.graphs[graph].details.get("sha256", {}).get(files[form])
        if verify and expected is not None:
            from dpa.files import file_sha256

            if file_sha256(path) != expected:
                raise DpaError(f"{path} is not the file that was exported (its sha256 differs from the manifest's): "
                               "it was replaced or damaged since; re-export (or re-run `dpa calibrate` for a "
                               "variant)")
        return path

    def file_hashes(self) -> dict[str, dict[str, str]]:
        """graph -> {file: sha256} as recorded at export (empty for exports made before hashes were recorded)."""
        return {name: dict(graph.details.get("sha256", {})) for name, graph in self.graphs.items()}

    def with_changes(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    # ---- writing -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data: dict[str, Any] = {"format": MANIFEST_FORMAT}
        data.update({key: value for key, value in self.record.items() if key in ("created", "producer")})
        data.update({
            "model": {"config": dict(self.model.config), "parameters": self.model.parameters,
                      "weights_sha256": self.model.weights_sha256},
            "checkpoint": self.checkpoint.to_dict(),
            "size": self.size, "memory": self.memory, "batch": self.batch, "opset": self.opset,
            "precision": self.precision, "forms": list(self.forms),
            "form": self.forms[0] if len(self.forms) == 1 else "all",
            "custom_ops": dict(self.custom_ops),
            "graphs": {name: graph.to_dict() for name, graph in self.graphs.items()},
            "pipeline": self.pipeline.to_dict(),
        })
        if "export_seconds" in self.record:
            data["export_seconds"] = self.record["export_seconds"]
        if self.variant is not None:
            data["variant"] = dict(self.variant)
        return data

    def save(self, directory: str | Path) -> Path:
        """Write `directory/manifest.json` (the whole file at once: a reader never sees half of it)."""
        from dpa.files import write_text_atomically

        path = Path(directory) / MANIFEST_NAME
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path
