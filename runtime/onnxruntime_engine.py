"""ONNX Runtime backend: one InferenceSession per stage graph on the CPU, CUDA or TensorRT execution provider.
Torch-free; the one place a session is opened.

Chained graphs exchange OrtValues through I/O binding: on a GPU provider, intermediate tensors and the memory bank
stay in device memory and only the frame goes in and the probability comes out; on the CPU the same code binds
host memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpa.errors import DpaError, require_module
from dpa.manifest import RUNNABLE_IN_ONNXRUNTIME, Manifest
from dpa.runtime.engine import Engine, GraphLoad, default_cache_dir, parse_device

log = logging.getLogger(__name__)

# Execution providers, by the short names the command line takes.
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU_PROVIDER, "cuda": CUDA_PROVIDER, "tensorrt": TENSORRT_PROVIDER}
GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)  # the order "auto" prefers them in


def import_onnxruntime():
    return require_module("onnxruntime", "onnxruntime", "running the stage graphs in ONNX Runtime")


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


class OrtTransfer:
    """Tensors as OrtValues on one device ("cpu", or "cuda" and its index)."""

    def __init__(self, device_type: str = "cpu", device_id: int = 0):
        self.ort = import_onnxruntime()
        self.device_type = device_type
        self.device_id = device_id

    def upload(self, array: np.ndarray):
        """An OrtValue that owns a copy of `array` (ortvalue_from_numpy on the CPU would only borrow the array's
        memory, which is freed with the array)."""
        array = np.ascontiguousarray(array)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.device_type,
                                                               self.device_id)
        value.update_inplace(array)
        return value

    def download(self, tensor: Any) -> np.ndarray:
        return tensor.numpy() if isinstance(tensor, self.ort.OrtValue) else np.asarray(tensor)


class OnnxRuntimeRunner:
    """One ONNX Runtime session as a runner; `last_seconds` is the wall time of the last run (outputs
    synchronised, so a GPU provider has finished when it returns)."""

    def __init__(self, name: str, session, transfer: OrtTransfer):
        self.name = name
        self.session = session
        self.transfer = transfer
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

    def run_resident(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """OrtValues (or host arrays) in, OrtValues on the engine's device out, through I/O binding."""
        binding = self.session.io_binding()
        for name in self.input_names:
            value = feed[name]
            if isinstance(value, np.ndarray):
                value = self.transfer.upload(value)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.transfer.device_type, self.transfer.device_id)
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        self.last_seconds = time.perf_counter() - start
        return dict(zip(self.output_names, binding.get_outputs(), strict=True))


def session_options(threads: int | None):
    """SessionOptions for the stage graphs: `threads` intra-op threads (None: ONNX Runtime's default), and worker
    threads that sleep instead of spinning when their session is idle.

    The graphs of a frame run one after the other, each session with its own thread pool: spinning workers of the
    session that just finished take the cores from the one that runs next. On 2 cores the small model's chain took
    105 ms per frame with spinning and 45 ms without (encoder 57 -> 26 ms, decoder 47 -> 19 ms).
    """
    options = import_onnxruntime().SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def open_onnxruntime_engine(directory: Path, manifest: Manifest, precision: str, *, device: str = "auto",
                            threads: int | None = None, providers: Sequence[str] | None = None,
                            cache_dir: Path | None = None, plugin_library: str | os.PathLike | None = None,
                            form: str | None = None) -> Engine:
    """ONNX Runtime sessions for every graph of `directory` (see `dpa.runtime.engines.open_engine`).

    An explicitly asked provider (providers, or device cuda) that a session does not really use is a
    DpaError; with device auto the providers that did not load are logged and describe() shows what runs.
    """
    ort = import_onnxruntime()
    kind, index = parse_device(device)
    chosen = choose_providers(device, ort.get_available_providers(), providers)
    form = choose_onnxruntime_form(manifest.forms, form)
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
    options = session_options(threads)
    strict = [provider for provider in chosen if provider != CPU_PROVIDER] if kind != "auto" or providers else []
    sessions: dict[str, Any] = {}
    loads: dict[str, GraphLoad] = {}
    for name in manifest.graphs:
        path = manifest.graph_file(directory, name, form)
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
        sessions[name] = session
        loads[name] = GraphLoad(name, path, seconds, built=False, providers=list(in_use))
    in_use = list(next(iter(loads.values())).providers) if loads else []
    gpu = any(provider in GPU_PROVIDERS for provider in in_use)
    transfer = OrtTransfer("cuda", index) if gpu else OrtTransfer()
    runners = {name: OnnxRuntimeRunner(name, session, transfer) for name, session in sessions.items()}
    return Engine(backend="onnxruntime", precision=precision, device=f"cuda:{index}" if gpu else "cpu",
                  directory=directory, manifest=manifest, runners=runners, loads=loads, form=form, providers=in_use,
                  versions={"onnxruntime": ort.__version__}, transfer=transfer,
                  details={"threads": threads, "cache_dir": str(cache_dir) if TENSORRT_PROVIDER in in_use else None})
