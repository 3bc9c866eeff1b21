"""`dpa triton`: a Triton model repository from an export.

Layout (version 1 of every model):

    REPO/
      README.md                     how to serve it, what each model is
      dpa/config.pbtxt              the sequence model: one stream per correlation ID, N stream slots
      dpa/1/model.py                (Python backend, `models/sequence_model.py`) memory per stream, BLS calls
      dpa_<graph>/config.pbtxt      one model per stage graph (encoder, ima, ifa_memory, decoder)
      dpa_<graph>/1/model.onnx      --backend onnxruntime or python (+ model.py: ONNX Runtime in the Python backend)
      dpa_<graph>/1/model.plan      --backend tensorrt (plans built on the serving GPU by `dpa build`)

The `dpa` model's config carries the export's manifest (parameter "manifest"): the client reads S, N and the
stage I/O from it, so `dpa run --server` needs no local export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dpa.errors import DpaError
from dpa.files import write_text_atomically
from dpa.manifest import Manifest, TensorSpec
from dpa.runtime.engine import resolve_variant

BACKENDS = ("python", "onnxruntime", "tensorrt")
SEQUENCE_MODEL = "dpa"
STAGE_PREFIX = "dpa_"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}


@dataclass(frozen=True)
class RepositorySettings:
    """backend: what runs the stage graphs (module doc); streams: stream slots of the sequence model (streams
    served at once; one more waits until one ends or idles out); instances: copies of every model (several
    streams computed at once); idle_seconds: a silent stream is ended after this; threads: ONNX Runtime threads
    per stage model instance (0: its default)."""

    backend: str = "python"
    precision: str = "fp32"
    streams: int = 4
    instances: int = 1
    idle_seconds: float = 30.0
    threads: int = 1


def stage_model_name(graph: str) -> str:
    return f"{STAGE_PREFIX}{graph}"


def _string(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset of it for ASCII text)."""
    return json.dumps(text, ensure_ascii=True)


def _tensors(kind: str, tensors: list[TensorSpec]) -> str:
    rows = []
    for tensor in tensors:
        if tensor.dtype not in TRITON_TYPES:
            raise DpaError(f"tensor {tensor.name} has dtype {tensor.dtype}, which this repository writer does not map")
        dims = ", ".join(str(d) for d in tensor.shape)
        rows.append(f'  {{ name: {_string(tensor.name)} data_type: {TRITON_TYPES[tensor.dtype]} dims: [ {dims} ] }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_string(key)} value {{ string_value: {_string(value)} }} }}\n"
                   for key, value in values.items())


def stage_model_config(graph, settings: RepositorySettings) -> str:
    """config.pbtxt of the model that runs one stage graph (a `GraphSpec`) on `settings.backend`."""
    name = stage_model_name(graph.name)
    kind = "KIND_GPU" if settings.backend == "tensorrt" else "KIND_CPU"
    head = {"python": 'backend: "python"\n',
            "onnxruntime": 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n',
            "tensorrt": 'backend: "tensorrt"\ndefault_model_filename: "model.plan"\n'}[settings.backend]
    parameters = {"graph": graph.name}
    if settings.backend == "python":
        parameters["threads"] = str(settings.threads)
    elif settings.backend == "onnxruntime" and settings.threads:
        parameters["intra_op_thread_count"] = str(settings.threads)
    return (f"name: {_string(name)}\n{head}max_batch_size: 0\n"
            + _tensors("input", list(graph.inputs)) + _tensors("output", list(graph.outputs))
            + f"instance_group [ {{ count: {settings.instances} kind: {kind} }} ]\n"
            + "version_policy { latest { num_versions: 1 } }\n" + _parameters(parameters))


def sequence_model_config(manifest: Manifest, settings: RepositorySettings) -> str:
    """config.pbtxt of the `dpa` sequence model (Python backend)."""
    size = manifest.size
    frame = [TensorSpec("RGB", (3, size, size), "float32"), TensorSpec("FLOW", (3, size, size), "float32"),
             TensorSpec("INDEX", (1,), "int64"), TensorSpec("POLICY", (3,), "float32")]
    answer = [TensorSpec("PROBABILITY", (size, size), "float32"), TensorSpec("ADMITTED", (1,), "int32"),
              TensorSpec("SERVER_MS", (1,), "float32")]
    controls = "\n".join([
        '    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },',
        '    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },',
        '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }',
    ])
    batching = (
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {int(settings.idle_seconds * 1e6)}\n"
        f"  control_input [\n{controls}\n  ]\n"
        # `oldest` holds a slot per stream: up to `streams` streams at once, each pinned to one instance
        f"  oldest {{ max_candidate_sequences: {settings.streams} max_queue_delay_microseconds: 0 }}\n"
        "}\n"
    )
    stage_models = {name: stage_model_name(name) for name in manifest.graphs}
    parameters = {"manifest": json.dumps(manifest.to_dict(), separators=(",", ":")),
                  "stage_models": json.dumps(stage_models), "streams": str(settings.streams)}
    return (f"name: {_string(SEQUENCE_MODEL)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            + _tensors("input", frame) + _tensors("output", answer) + batching
            + f"instance_group [ {{ count: {settings.instances} kind: KIND_CPU }} ]\n"
            + "version_policy { latest { num_versions: 1 } }\n" + _parameters(parameters))


def model_source(name: str) -> str:
    """The text of a Python-backend model file shipped in `dpa.runtime.triton.models`."""
    return (resources.files("dpa.runtime.triton") / "models" / name).read_text()


def write_repository(export_dir: str | Path, out: str | Path, settings: RepositorySettings,
                     plans: dict[str, Path] | None = None) -> Path:
    """Write the repository (module doc) for the `settings.precision` variant of `export_dir` into `out` (an
    empty or new folder); `plans`: graph -> TensorRT plan file, required for the tensorrt backend."""
    if settings.backend not in BACKENDS:
        raise DpaError(f"--backend {settings.backend!r}: choose one of {', '.join(BACKENDS)}")
    if settings.streams < 1 or settings.instances < 1:
        raise DpaError("a repository serves at least one stream with at least one instance")
    directory = resolve_variant(export_dir, settings.precision)
    manifest = Manifest.load(directory)
    if settings.backend == "tensorrt" and set(plans or {}) != set(manifest.graphs):
        raise DpaError("the tensorrt backend needs a TensorRT plan for every graph, built on the serving GPU")
    out = Path(out)
    for graph in manifest.graphs.values():
        folder = out / stage_model_name(graph.name)
        write_text_atomically(folder / "config.pbtxt", stage_model_config(graph, settings))
        version = folder / "1"
        version.mkdir(parents=True, exist_ok=True)
        if settings.backend == "tensorrt":
            shutil.copyfile(plans[graph.name], version / "model.plan")
        else:
            form = "functions" if "functions" in manifest.forms else "portable"
            shutil.copyfile(manifest.graph_file(directory, graph.name, form), version / "model.onnx")
        if settings.backend == "python":
            write_text_atomically(version / "model.py", model_source("stage_model.py"))
    write_text_atomically(out / SEQUENCE_MODEL / "config.pbtxt", sequence_model_config(manifest, settings))
    write_text_atomically(out / SEQUENCE_MODEL / "1" / "model.py", model_source("sequence_model.py"))
    write_text_atomically(out / "README.md", repository_readme(manifest, settings, directory))
    return out


def repository_readme(manifest: Manifest, settings: RepositorySettings, directory: Path) -> str:
    graphs = ", ".join(stage_model_name(name) for name in manifest.graphs)
    backend_notes = {
        "python": "The stage models run ONNX Runtime inside Triton's Python backend (any Triton server, "
                  "including the nvidia-pytriton wheel's, which has no other backend).",
        "onnxruntime": "The stage models run on Triton's onnxruntime backend (the NGC tritonserver container). "
                       "The graphs are in the functions form: their custom nodes carry standard-op bodies, so "
                       "no custom-op library is needed.",
        "tensorrt": "The stage models are TensorRT plans built on the serving GPU (`dpa build`); they only run "
                    "on that GPU model with that TensorRT version. Graphs in the plugin form also need the "
                    "plugin library: start tritonserver with "
                    "`--backend-config=tensorrt,plugins=/path/libdpa_plugins.so`.",
    }
    return f"""# DPA on Triton Inference Server

Made by `dpa triton` from `{directory}` ({manifest.config_name}, S {manifest.size}, N {manifest.memory},
{manifest.precision}).

- `{SEQUENCE_MODEL}`: the sequence model (Python backend). One stream per correlation ID, up to {settings.streams}
  at once ({settings.instances} instance(s)); each stream has its own memory bank and admission policy. A stream
  silent for {settings.idle_seconds:g} s is ended and its memory freed.
- {graphs}: the stage graphs. {backend_notes[settings.backend]}

Serve it with `dpa serve {'{'}this folder{'}'} --port 8001` (or `tritonserver --model-repository ...`); the model
code needs the `dpa-edge` package importable by the server's Python backend. Clients: `dpa run SOURCE SINK
--server grpc://HOST:8001`, one correlation ID per run.

DeepStream's nvinferserver does not pass correlation IDs to Triton, so it cannot keep a memory per camera: run
one `dpa run --server` client per camera (each may read the camera itself) instead.
"""
