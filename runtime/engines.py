"""One engine interface for the stage graphs, two backends: ONNX Runtime (CPU, CUDA and TensorRT execution
providers) and TensorRT (plans built from the graphs, `runtime/tensorrt_engine.py`). Torch-free.

An `Engine` holds one runner per graph of an export directory (`engine.sessions`, graph name -> runner). Every
runner answers `run(output_names, feed) -> list of arrays`, so `StageChain(engine.sessions, engine.manifest)`
chains them exactly as it chains ONNX Runtime sessions, and `infer(feed) -> {output name: array}` with the
wall time of its last call in `last_seconds` (synchronised with the GPU), as Polygraphy's runners do.

Precision lives in the graphs: `dpa export` writes fp32, `dpa calibrate` writes fp16 and int8 variants as
export directories of their own (`resolve_variant`). No builder flag turns an fp32 graph into fp16 here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dpa.errors import DpaError, require_module
from dpa.runtime.chain import RUNNABLE_IN_ONNXRUNTIME, graph_file, load_manifest

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("auto", "cpu", "cuda")
CACHE_ENVIRONMENT_VARIABLE = "DPA_CACHE"

# ONNX Runtime execution providers, by the short names the command line takes.
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU_PROVIDER, "cuda": CUDA_PROVIDER, "tensorrt": TENSORRT_PROVIDER}
GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)  # the order "auto" prefers them in


class Runner(Protocol):
    """One graph, ready to run: what StageChain, compare and bench call."""

    name: str
    input_names: list[str]
    output_names: list[str]
    last_seconds: float

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class GraphLoad:
    """How one graph became runnable: its file, the plan (TensorRT), seconds to build or load, and how."""

    graph: str
    file: Path
    seconds: float
    built: bool  # a TensorRT plan was built now (False: loaded from the cache, or an ONNX Runtime session)
    plan: Path | None = None
    providers: list[str] = field(default_factory=list)
    plugin_layers: int | None = None  # TensorRT: plugin layers in the network (None: unknown)


class Engine:
    """The stage graphs of one export directory on one backend, precision and device.

    sessions: graph name -> runner (see `Runner`); loads: graph name -> GraphLoad. Close it (or use it as a
    context manager) to free device buffers.
    """

    def __init__(self, backend: str, precision: str, device: str, directory: Path, manifest: dict,
                 sessions: dict[str, Runner], loads: dict[str, GraphLoad], form: str, providers: list[str],
                 versions: dict[str, str], details: dict | None = None,
                 close: Callable[[], None] | None = None):
        self.backend = backend
        self.precision = precision
        self.device = device
        self.directory = directory
        self.manifest = manifest
        self.sessions = sessions
        self.loads = loads
        self.form = form
        self.providers = providers
        self.versions = versions
        self.details = details or {}
        self._close = close

    def describe(self) -> dict:
        """What runs: backend, precision, device, providers in use, form, files and plans, versions."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "providers": list(self.providers),
            "form": self.form,
            "directory": str(self.directory),
            "graphs": {
                name: {"file": str(load.file), "plan": str(load.plan) if load.plan else None,
                       "seconds": round(load.seconds, 4), "built": load.built, "providers": load.providers,
                       "plugin_layers": load.plugin_layers}
                for name, load in self.loads.items()
            },
            "versions": dict(self.versions),
            **self.details,
        }

    def close(self) -> None:
        """Release sessions and device memory; the engine is unusable afterwards."""
        if self._close is not None:
            self._close()
            self._close = None
        self.sessions = {}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def manifest_precision(manifest: dict) -> str:
    """A manifest's precision ("fp32" for exports written before the field existed)."""
    return manifest.get("precision", "fp32")


def resolve_variant(export_dir: str | os.PathLike, precision: str) -> Path:
    """The export directory that holds `precision`: export_dir itself when its manifest has that precision,
    else export_dir/<precision> (written by `dpa calibrate`) when its manifest has it; else DpaError."""
    if precision not in PRECISIONS:
        raise DpaError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    directory = Path(export_dir)
    own = manifest_precision(load_manifest(directory))
    if own == precision:
        return directory
    variant = directory / precision
    if (variant / "manifest.json").is_file() and manifest_precision(load_manifest(variant)) == precision:
        return variant
    raise DpaError(
        f"{directory} holds {own} graphs and no {precision} variant ({variant} has no {precision} manifest); "
        f"precision lives in the graphs: make the variant with "
        f"`dpa calibrate {directory} --frames <calibration frames> --out {directory}`"
    )


def default_cache_dir() -> Path:
    """Where built plans and timing caches go: $DPA_CACHE, else ~/.cache/dpa/engines."""
    return Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or Path.home() / ".cache" / "dpa" / "engines")


def parse_device(device: str) -> tuple[str, int]:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> (kind, GPU index)."""
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DpaError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)


def choose_onnxruntime_form(exported: Sequence[str], form: str | None = None) -> str:
    """The form ONNX Runtime runs: `form` when given and runnable, else functions, else portable."""
    if form is not None:
        if form not in RUNNABLE_IN_ONNXRUNTIME:
            raise DpaError(f"ONNX Runtime cannot run the {form!r} form (its custom nodes are TensorRT plugins); "
                           f"use one of {', '.join(RUNNABLE_IN_ONNXRUNTIME)}")
        if form not in exported:
            raise DpaError(f"form {form!r} was not exported (exported: {', '.join(exported)})")
        return form
    for candidate in RUNNABLE_IN_ONNXRUNTIME:
        if candidate in exported:
            return candidate
    raise DpaError(f"only the {', '.join(exported)} form was exported, which ONNX Runtime cannot run; "
                   "re-export with --form functions (or use --backend tensorrt with the plugin library)")


def choose_providers(device: str, available: Sequence[str], requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime providers, best first, with CPU last for nodes a GPU provider does not take.

    requested: provider names or short names (cpu, cuda, tensorrt); every one must be available. Otherwise
    by device: cpu -> CPU; cuda -> CUDA (must be available); auto -> TensorRT, CUDA, CPU among `available`.
    """
    kind, _ = parse_device(device)
    if requested:
        wanted = [PROVIDER_NAMES.get(name.lower(), name) for name in requested]
    elif kind == "cpu":
        wanted = [CPU_PROVIDER]
    elif kind == "cuda":
        wanted = [CUDA_PROVIDER]
    else:
        wanted = [provider for provider in GPU_PROVIDERS if provider in available]
    missing = [provider for provider in wanted if provider not in available]
    if missing:
        raise DpaError(
            f"ONNX Runtime provider {', '.join(missing)} was asked for but this onnxruntime has only "
            f"{', '.join(available)}; install onnxruntime-gpu (CUDA, TensorRT providers) or ask for the CPU"
        )
    if kind == "cpu" and any(provider in GPU_PROVIDERS for provider in wanted):
        raise DpaError("device cpu with a GPU execution provider: drop --device cpu or the GPU provider")
    return wanted + ([CPU_PROVIDER] if CPU_PROVIDER not in wanted else [])


def onnxruntime_provider_options(providers: Sequence[str], device_index: int, cache_dir: Path,
                                 plugin_library: Path | None = None) -> list[tuple[str, dict]]:
    """(provider, options) pairs for InferenceSession: the GPU index, and for the TensorRT provider its engine
    and timing caches in cache_dir/onnxruntime-tensorrt with fp16/int8 off (precision is in the graph)."""
    pairs = []
    for provider in providers:
        options: dict = {}
        if provider == CUDA_PROVIDER:
            options = {"device_id": str(device_index)}
        elif provider == TENSORRT_PROVIDER:
            trt_cache = cache_dir / "onnxruntime-tensorrt"
            options = {
                "device_id": str(device_index),
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(trt_cache),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(trt_cache),
                "trt_fp16_enable": "False",
                "trt_int8_enable": "False",
            }
            if plugin_library is not None:
                options["trt_extra_plugin_lib_paths"] = str(plugin_library)
        pairs.append((provider, options))
    return pairs


class OnnxRuntimeRunner:
    """One ONNX Runtime session as a runner; `last_seconds` is the wall time of the last run (numpy in and
    out, so a GPU provider has finished when it returns)."""

    def __init__(self, name: str, session):
        self.name = name
        self.session = session
        self.input_names = [tensor.name for tensor in session.get_inputs()]
        self.output_names = [tensor.name for tensor in session.get_outputs()]
        self.last_seconds = 0.0

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        outputs = self.session.run(output_names, dict(feed))
        self.last_seconds = time.perf_counter() - start
        return outputs

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(self.output_names, feed), strict=True))


def open_onnxruntime_engine(directory: Path, manifest: dict, precision: str, device: str = "auto",
                            threads: int | None = None, providers: Sequence[str] | None = None,
                            cache_dir: Path | None = None, plugin_library: str | os.PathLike | None = None,
                            form: str | None = None) -> Engine:
    """ONNX Runtime sessions for every graph of `directory` (see open_engine).

    An explicitly asked provider (providers, or device cuda) that a session does not really use is a
    DpaError; with device auto the providers that did not load are logged and describe() shows what runs.
    """
    ort = require_module("onnxruntime", "onnxruntime", "running the stage graphs in ONNX Runtime")
    kind, index = parse_device(device)
    chosen = choose_providers(device, ort.get_available_providers(), providers)
    form = choose_onnxruntime_form(manifest["forms"], form)
    plugins = None
    if plugin_library is not None and TENSORRT_PROVIDER in chosen:
        from dpa.runtime.plugins import find_plugin_library

        plugins = find_plugin_library(plugin_library)
    elif plugin_library is not None:
        log.info("plugin library %s unused: ONNX Runtime runs the function bodies without the TensorRT "
                 "provider", plugin_library)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if TENSORRT_PROVIDER in chosen:
        (cache_dir / "onnxruntime-tensorrt").mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    strict = [provider for provider in chosen if provider != CPU_PROVIDER] if kind != "auto" or providers else []
    sessions: dict[str, Runner] = {}
    loads: dict[str, GraphLoad] = {}
    for name in manifest["graphs"]:
        path = graph_file(directory, manifest, name, form)
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(str(path), options, providers=onnxruntime_provider_options(
                chosen, index, cache_dir, plugins))
        except Exception as error:  # ONNX Runtime raises its own exception types for bad graphs and providers
            raise DpaError(f"ONNX Runtime cannot load {path}: {error}") from error
        seconds = time.perf_counter() - start
        in_use = session.get_providers()
        not_loaded = [provider for provider in chosen if provider not in in_use]
        if any(provider in strict for provider in not_loaded):
            raise DpaError(f"{path}: ONNX Runtime did not start {', '.join(not_loaded)} (running on "
                           f"{', '.join(in_use)}); check the CUDA/cuDNN/TensorRT libraries that onnxruntime-gpu "
                           "needs, or ask for another device")
        if not_loaded:
            log.warning("%s: %s did not load; running on %s", name, ", ".join(not_loaded), ", ".join(in_use))
        sessions[name] = OnnxRuntimeRunner(name, session)
        loads[name] = GraphLoad(name, path, seconds, built=False, providers=list(in_use))
    in_use = list(next(iter(loads.values())).providers) if loads else []
    gpu = any(provider in GPU_PROVIDERS for provider in in_use)
    return Engine("onnxruntime", precision, f"cuda:{index}" if gpu else "cpu", directory, manifest, sessions,
                  loads, form, in_use, {"onnxruntime": ort.__version__},
                  {"threads": threads, "cache_dir": str(cache_dir) if TENSORRT_PROVIDER in in_use else None})


def open_engine(export_dir: str | os.PathLike, backend: str = "onnxruntime", precision: str = "fp32",
                device: str = "auto", threads: int | None = None, providers: Sequence[str] | None = None,
                cache_dir: str | os.PathLike | None = None, plugin_library: str | os.PathLike | None = None,
                form: str | None = None) -> Engine:
    """Open the `precision` variant of an export directory (resolve_variant) on `backend`.

    backend: onnxruntime | tensorrt | auto (best_backend()). device: auto | cpu | cuda | cuda:N.
    threads: ONNX Runtime intra-op threads. providers: ONNX Runtime providers (names or cpu/cuda/tensorrt).
    cache_dir: TensorRT plans and timing cache, ONNX Runtime's TensorRT-provider caches (default
    default_cache_dir()). plugin_library: libdpa_plugins.so or its folder (TensorRT; default: searched, used
    when found). form: the exported form to run (default: chosen per backend).
    """
    if backend == "auto" and parse_device(device)[0] == "cpu":
        backend = "onnxruntime"
    elif backend == "auto":
        choice = best_backend()
        backend, device = choice.backend, device if device != "auto" else choice.device
        log.info("backend: %s on %s (%s)", backend, device, choice.reason)
    if backend not in BACKENDS:
        raise DpaError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)} or auto")
    parse_device(device)
    directory = resolve_variant(export_dir, precision)
    manifest = load_manifest(directory)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if backend == "onnxruntime":
        return open_onnxruntime_engine(directory, manifest, precision, device, threads, providers, cache,
                                       plugin_library, form)
    if providers:
        raise DpaError("providers are ONNX Runtime's; the tensorrt backend takes none")
    from dpa.runtime.tensorrt_engine import open_tensorrt_engine

    return open_tensorrt_engine(directory, manifest, precision, device, cache, plugin_library, form)


def visible_gpus() -> int:
    """How many CUDA GPUs the driver shows (0 without a driver); asks libcuda directly, no Python package."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@dataclass(frozen=True)
class BackendChoice:
    """What `best_backend` picked and why (for the run summary)."""

    backend: str
    device: str
    reason: str


def best_backend() -> BackendChoice:
    """TensorRT when tensorrt and cuda-python import and a GPU is visible; else ONNX Runtime on the GPU when
    it has a CUDA or TensorRT provider and a GPU is visible; else ONNX Runtime on the CPU."""
    gpus = visible_gpus()
    missing = [package for module, package in (("tensorrt", "tensorrt"), ("cuda", "cuda-python"))
               if importlib.util.find_spec(module) is None]
    if gpus and not missing:
        import tensorrt

        return BackendChoice("tensorrt", "cuda:0", f"TensorRT {tensorrt.__version__} and a GPU are present")
    why = "no GPU visible" if not gpus else f"{' and '.join(missing)} not installed"
    if importlib.util.find_spec("onnxruntime") is None:
        raise DpaError(f"no engine backend: {why} and onnxruntime is not installed; pip install onnxruntime")
    import onnxruntime

    if gpus and CUDA_PROVIDER in onnxruntime.get_available_providers():
        return BackendChoice("onnxruntime", "cuda:0", f"{why}; ONNX Runtime with its CUDA provider")
    if gpus:
        why += "; onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    return BackendChoice("onnxruntime", "cpu", f"{why}; ONNX Runtime on the CPU")


def zero_feed(graph: dict) -> dict[str, np.ndarray]:
    """Zeros for every input of a manifest graph entry, in its shapes and dtypes."""
    return {tensor["name"]: np.zeros(tensor["shape"], np.dtype(tensor["dtype"])) for tensor in graph["inputs"]}


def check_engine(engine: Engine) -> dict[str, float]:
    """Run every graph once on zero feeds; graph -> seconds. DpaError naming the graph and output when an
    output has NaN or Inf, or the wrong shape."""
    seconds = {}
    for name, graph in engine.manifest["graphs"].items():
        runner = engine.sessions[name]
        outputs = runner.infer(zero_feed(graph))
        for tensor in graph["outputs"]:
            array = outputs[tensor["name"]]
            if tuple(array.shape) != tuple(tensor["shape"]):
                raise DpaError(f"graph {name} output {tensor['name']} has shape {tuple(array.shape)}, the manifest "
                               f"says {tuple(tensor['shape'])}")
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise DpaError(f"graph {name} output {tensor['name']}: {bad} of {array.size} values are NaN or Inf "
                               f"on zero inputs ({engine.backend}, {engine.precision}, {engine.device})")
        seconds[name] = runner.last_seconds
    return seconds
