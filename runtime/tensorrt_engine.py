"""TensorRT backend: a plan per stage graph, built with the plugin library, cached by a hash of everything that
invalidates it, and run with cuda-python on one stream with buffers allocated once. Needs an NVIDIA GPU.

Written against the TensorRT 10.x and 11.x Python API (enum names only, no precision builder flags on 11.x).
The pure decisions — plan hash and file names, the form to build, the builder flags per TensorRT version, the
cuda-python that matches the installed TensorRT — are plain functions tested without TensorRT; the rest is a thin
layer over TensorRT and the CUDA runtime.
This module imports without tensorrt and cuda-python; they are imported when an engine is opened.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dpa.errors import DpaError, require_module
from dpa.files import file_sha256, write_bytes_atomically
from dpa.manifest import GraphSpec, Manifest
from dpa.runtime.engine import Engine, GraphLoad, parse_device
from dpa.runtime.tensorrt_policy import (
    DPKG_STATUS,
    INSTALL_HINT,
    BuilderPolicy,
    BuildSettings,
    FormChoice,
    GpuInfo,
    PlanInputs,
    builder_policy,
    check_cuda_driver,
    check_cuda_python,
    choose_tensorrt_form,
    cuda_python_hint,
    cuda_version_string,
    normalized_name,
    parse_dpkg_status,
    plan_file_name,
    tensorrt_cuda_major,
    timing_cache_name,
)

log = logging.getLogger(__name__)

# --- TensorRT and CUDA: everything below needs them ---------------------------------------------------------

def import_tensorrt() -> ModuleType:
    """The tensorrt module, or DpaError naming the package."""
    return require_module("tensorrt", "tensorrt", f"the TensorRT backend ({INSTALL_HINT})")


def installed_distributions() -> dict[str, str]:
    """Installed Python distributions, normalized name -> version."""
    return {normalized_name(distribution.metadata["Name"]): distribution.version
            for distribution in importlib.metadata.distributions() if distribution.metadata["Name"]}


def installed_debian_packages() -> dict[str, str]:
    """Installed Debian packages, name -> version ({} where there is no dpkg)."""
    return parse_dpkg_status(DPKG_STATUS.read_text(errors="replace")) if DPKG_STATUS.is_file() else {}


def import_cudart(cuda_major: int | None) -> ModuleType:
    """cuda-python's CUDA runtime module (cuda.bindings.runtime, or cuda.cudart before cuda-python 12.6), or
    DpaError naming the cuda-python for TensorRT's CUDA major `cuda_major`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise DpaError(f"the TensorRT backend needs cuda-python ({error}): {cuda_python_hint(cuda_major)}"
                           ) from error
        return cudart
    return runtime


class Cuda:
    """The few CUDA runtime calls the runner needs, on GPU `device`, with errors turned into DpaError.

    The current device is a per-thread setting of the CUDA runtime: use_device() makes `device` current in the
    calling thread, once per thread (a thread-local flag: the check costs an attribute look-up per call)."""

    def __init__(self, cudart: ModuleType, device: int = 0):
        self.cudart = cudart
        self.device = device
        self._thread = threading.local()

    def call(self, function: str, *arguments):
        """cudart.<function>(*arguments) -> its results after the status (None, one value, or a tuple)."""
        status, *results = getattr(self.cudart, function)(*arguments)
        if status != self.cudart.cudaError_t.cudaSuccess:
            name = self.cudart.cudaGetErrorName(status)[1]
            raise DpaError(f"CUDA {function} failed: {name.decode() if isinstance(name, bytes) else name}")
        return None if not results else results[0] if len(results) == 1 else tuple(results)

    def use_device(self) -> None:
        """cudaSetDevice(device) in the calling thread, unless this thread already did."""
        if getattr(self._thread, "device_set", False):
            return
        self.call("cudaSetDevice", self.device)
        self._thread.device_set = True

    def gpu(self) -> GpuInfo:
        count = self.call("cudaGetDeviceCount")
        if self.device >= count:
            raise DpaError(f"GPU cuda:{self.device} asked for, {count} visible")
        properties = self.call("cudaGetDeviceProperties", self.device)
        name = properties.name
        name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        return GpuInfo(name.strip(), (int(properties.major), int(properties.minor)))


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in GPU memory: its address, shape and dtype. Runner outputs point into the runner's own buffers
    (valid until the runner runs again); uploads own their memory, freed when the tensor is collected."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class CudaTransfer:
    """Tensors as `DeviceTensor`s on the engine's GPU: upload copies a host array into new device memory, download
    copies a device tensor back (both synchronous)."""

    def __init__(self, cuda: Cuda):
        self.cuda = cuda

    def upload(self, array: np.ndarray) -> DeviceTensor:
        self.cuda.use_device()
        array = np.ascontiguousarray(array)
        pointer = self.cuda.call("cudaMalloc", max(array.nbytes, 1))
        tensor = DeviceTensor(pointer, tuple(array.shape), array.dtype)
        weakref.finalize(tensor, self.cuda.call, "cudaFree", pointer)
        kind = self.cuda.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.cuda.call("cudaMemcpy", pointer, array.ctypes.data, array.nbytes, kind)
        return tensor

    def download(self, tensor: Any) -> np.ndarray:
        if not isinstance(tensor, DeviceTensor):
            return np.asarray(tensor)
        self.cuda.use_device()
        host = np.empty(tensor.shape, tensor.dtype)
        kind = self.cuda.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.cuda.call("cudaMemcpy", host.ctypes.data, tensor.pointer, host.nbytes, kind)
        return host


class TensorRTRunner:
    """One plan: an execution context, device buffers and pinned host arrays for every I/O tensor (allocated
    once), run on the engine's stream. `last_seconds`: wall time of the last call from the first copy in to
    the stream synchronisation after the last copy out."""

    def __init__(self, name: str, engine, cuda: Cuda, stream, tensorrt: ModuleType):
        self.name = name
        self.engine = engine
        self.cuda = cuda
        self.stream = stream
        cuda.use_device()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise DpaError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        self.last_seconds = 0.0
        try:
            for tensor in names:
                self._allocate(tensor, tensorrt)
        except BaseException:
            self.close()
            raise

    def _allocate(self, tensor: str, tensorrt: ModuleType) -> None:
        """The pinned host array and the device buffer of one I/O tensor, bound to the context."""
        shape = tuple(self.engine.get_tensor_shape(tensor))
        if any(size < 0 for size in shape):
            raise DpaError(f"{self.name}: tensor {tensor} has a dynamic shape {shape}; the stage graphs are static")
        dtype = np.dtype(tensorrt.nptype(self.engine.get_tensor_dtype(tensor)))
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        pointer = self.cuda.call("cudaMallocHost", nbytes)
        buffer = (ctypes.c_byte * nbytes).from_address(pointer)
        self.host[tensor] = np.frombuffer(buffer, dtype, count=count).reshape(shape)
        self.device[tensor] = self.cuda.call("cudaMalloc", nbytes)
        if not self.context.set_tensor_address(tensor, self.device[tensor]):
            raise DpaError(f"{self.name}: TensorRT refused the address of tensor {tensor}")

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self.input_names if name not in feed]
        unknown = [name for name in feed if name not in self.host or name in self.output_names]
        if missing or unknown:
            raise DpaError(f"graph {self.name}: missing inputs {missing}, unknown inputs {unknown}")
        wanted = output_names or self.output_names
        self.cuda.use_device()
        cudart, stream = self.cuda.cudart, self.stream
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        start = time.perf_counter()
        for name in self.input_names:
            host = self.host[name]
            np.copyto(host, np.asarray(feed[name]).reshape(host.shape), casting="same_kind")
            self.cuda.call("cudaMemcpyAsync", self.device[name], host.ctypes.data, host.nbytes, to_device, stream)
            if not self.context.set_tensor_address(name, self.device[name]):  # run_resident may have moved it
                raise DpaError(f"{self.name}: TensorRT refused the address of tensor {name}")
        if not self.context.execute_async_v3(int(stream)):
            raise DpaError(f"TensorRT failed to enqueue graph {self.name}")
        for name in wanted:
            host = self.host[name]
            self.cuda.call("cudaMemcpyAsync", host.ctypes.data, self.device[name], host.nbytes, to_host, stream)
        self.cuda.call("cudaStreamSynchronize", stream)
        self.last_seconds = time.perf_counter() - start
        return [self.host[name].copy() for name in wanted]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(self.output_names, feed), strict=True))

    def run_resident(self, feed: Mapping[str, Any]) -> dict[str, DeviceTensor]:
        """Device tensors (or host arrays) in, device tensors out: a device input is read where it lies (its
        address is bound, nothing is copied), a host array is copied into this runner's input buffer. The
        outputs are this runner's own buffers, valid until it runs again."""
        self.cuda.use_device()
        cudart, stream = self.cuda.cudart, self.stream
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        start = time.perf_counter()
        for name in self.input_names:
            value = feed[name]
            if isinstance(value, DeviceTensor):
                if value.shape != self.host[name].shape or np.dtype(value.dtype) != self.host[name].dtype:
                    raise DpaError(f"graph {self.name} input {name}: got {value.shape} {value.dtype}, the plan takes "
                                   f"{self.host[name].shape} {self.host[name].dtype}")
                address = value.pointer
            else:
                host = self.host[name]
                np.copyto(host, np.asarray(value).reshape(host.shape), casting="same_kind")
                self.cuda.call("cudaMemcpyAsync", self.device[name], host.ctypes.data, host.nbytes, to_device, stream)
                address = self.device[name]
            if not self.context.set_tensor_address(name, address):
                raise DpaError(f"{self.name}: TensorRT refused the address of tensor {name}")
        if not self.context.execute_async_v3(int(stream)):
            raise DpaError(f"TensorRT failed to enqueue graph {self.name}")
        self.cuda.call("cudaStreamSynchronize", stream)
        self.last_seconds = time.perf_counter() - start
        return {name: DeviceTensor(self.device[name], self.host[name].shape, self.host[name].dtype)
                for name in self.output_names}

    def close(self) -> None:
        self.cuda.use_device()
        for pointer in self.device.values():
            self.cuda.call("cudaFree", pointer)
        for array in self.host.values():
            self.cuda.call("cudaFreeHost", array.ctypes.data)
        self.device, self.host = {}, {}
        self.context = None


def load_plugins(tensorrt: ModuleType, plugin_library: str | os.PathLike | None) -> Path | None:
    """Register libdpa_plugins.so with TensorRT (once per process: see register_tensorrt_plugins); its path, or None.

    plugin_library None: the library this process already registered, else the one find_plugin_library finds;
    None when there is none or the one found has no TensorRT plugins (logged). A given library that cannot be
    used, or a found one built against another TensorRT major, is a DpaError."""
    from dpa.runtime.plugins import (
        find_plugin_library,
        has_tensorrt_plugins,
        load_plugin_library,
        register_tensorrt_plugins,
        registered_plugin_library,
    )

    if plugin_library is None and registered_plugin_library() is not None:
        return registered_plugin_library()
    try:
        path = find_plugin_library(plugin_library)
    except DpaError:
        if plugin_library is not None:
            raise
        log.info("libdpa_plugins.so not found: the custom nodes run as their function bodies")
        return None
    library = load_plugin_library(path)
    if not has_tensorrt_plugins(library) and plugin_library is None:
        log.warning("%s was built without TensorRT plugins (no TensorRT headers): not used", path)
        return None
    register_tensorrt_plugins(path, tensorrt, library)
    return path


def _parse_errors(parser) -> str:
    errors = [parser.get_error(i) for i in range(min(parser.num_errors, 5))]
    return "; ".join(error.desc() if hasattr(error, "desc") else str(error) for error in errors)


def attach_timing_cache(config, cached: bytes):
    """The timing cache made from `cached` (a serialised cache, b"" for none) and set on the builder config; an
    empty one when TensorRT rejects `cached` (create_timing_cache returns None or set_timing_cache False: logged).
    DpaError when even an empty one fails."""
    for data in (cached, b"") if cached else (b"",):
        timing_cache = config.create_timing_cache(data)
        if timing_cache is not None and config.set_timing_cache(timing_cache, False):
            return timing_cache
        if data:
            log.warning("the timing cache does not match this TensorRT/GPU or is damaged; starting an empty one")
    raise DpaError("TensorRT could not create an empty timing cache (out of memory?); see TensorRT's messages")


def build_plan(tensorrt: ModuleType, logger, onnx_path: Path, policy: BuilderPolicy, settings: BuildSettings,
               timing_cache_bytes: bytes) -> tuple[bytes, bytes, int]:
    """Build one plan from an ONNX file -> (plan, updated timing cache, plugin layers in the network)."""
    builder = tensorrt.Builder(logger)
    flags = 0
    if policy.strongly_typed and hasattr(tensorrt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = tensorrt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise DpaError(f"TensorRT cannot parse {onnx_path}: {_parse_errors(parser)}")
    plugin_types = {getattr(tensorrt.LayerType, name) for name in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
                    if hasattr(tensorrt.LayerType, name)}
    plugin_layers = sum(network.get_layer(i).type in plugin_types for i in range(network.num_layers))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(tensorrt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for flag in policy.set_flags:
        config.set_flag(getattr(tensorrt.BuilderFlag, flag))
    for flag in policy.clear_flags:
        if hasattr(tensorrt.BuilderFlag, flag):
            config.clear_flag(getattr(tensorrt.BuilderFlag, flag))
    timing_cache = attach_timing_cache(config, timing_cache_bytes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DpaError(f"TensorRT failed to build a plan from {onnx_path} (see the TensorRT messages above)")
    return bytes(memoryview(plan)), bytes(memoryview(timing_cache.serialize())), plugin_layers


@dataclass
class _PlanCache:
    """Where the plans of one engine are looked up and built: the cache folder, the timing cache, and everything
    a plan's hash covers."""

    tensorrt: ModuleType
    logger: Any
    cache_dir: Path
    timing_path: Path
    policy: BuilderPolicy
    settings: BuildSettings
    gpu: GpuInfo
    precision: str
    choice: FormChoice
    plugins: Path | None

    def plan(self, name: str, graph: GraphSpec, onnx_path: Path) -> tuple[bytes, bool, dict, Path]:
        """(serialised plan, whether it was built now, its build record, its path): loaded when a plan with the
        same hash is cached, else built, saved and recorded (the timing cache is updated)."""
        version = self.tensorrt.__version__
        inputs = PlanInputs(file_sha256(onnx_path), self.precision, self.choice.form, version, self.gpu,
                            file_sha256(self.plugins) if self.plugins else None, self.settings)
        plan_path = self.cache_dir / plan_file_name(name, inputs)
        record_path = plan_path.with_suffix(".json")
        if plan_path.is_file():
            record = json.loads(record_path.read_text()) if record_path.is_file() else {}
            return plan_path.read_bytes(), False, record, plan_path
        log.info("building the %s plan (%s, %s form); this takes a while", name, self.precision, self.choice.form)
        start = time.perf_counter()
        timing = self.timing_path.read_bytes() if self.timing_path.is_file() else b""
        plan, timing, plugin_layers = build_plan(self.tensorrt, self.logger, onnx_path, self.policy, self.settings,
                                                 timing)
        if self.choice.uses_plugins and not plugin_layers and sum(graph.custom_nodes.get(self.choice.form,
                                                                                        {}).values()):
            log.warning("%s: TensorRT imported no plugin layer although %s", name, self.choice.note)
        write_bytes_atomically(plan_path, plan)
        write_bytes_atomically(self.timing_path, timing)
        record = {"graph": name, "onnx": str(onnx_path), "plan_inputs": asdict(inputs),
                  "plugin_library": str(self.plugins) if self.plugins else None, "plugin_layers": plugin_layers,
                  "build_seconds": round(time.perf_counter() - start, 3)}
        write_bytes_atomically(record_path, (json.dumps(record, indent=2) + "\n").encode())
        return plan, True, record, plan_path


def open_tensorrt_engine(directory: Path, manifest: Manifest, precision: str, *, device: str, cache_dir: Path,
                         plugin_library: str | os.PathLike | None = None, form: str | None = None,
                         settings: BuildSettings | None = None) -> Engine:
    """Plans for every graph of `directory` (loaded from cache_dir when their hash matches, else built and
    saved there with the timing cache), each as a TensorRTRunner on one CUDA stream (settings: the builder's
    workspace and optimisation level, default `BuildSettings()`).

    Long on purpose (~65 lines): every CUDA and TensorRT resource it creates is released by the local `close`,
    on failure part-way as on the engine's close, so they share one scope."""
    settings = settings or BuildSettings()
    kind, index = parse_device(device)
    if kind == "cpu":
        raise DpaError("TensorRT runs on an NVIDIA GPU; use --backend onnxruntime for the CPU")
    tensorrt = import_tensorrt()
    version = tensorrt.__version__
    cuda, versions = _paired_cuda(version, index)
    policy = builder_policy(version, precision, settings)
    gpu = cuda.gpu()
    cuda.use_device()
    plugins = load_plugins(tensorrt, plugin_library)
    choice = choose_tensorrt_form(manifest.forms, plugins is not None, version, form)
    log.info("TensorRT %s on %s: %s form (%s), %s", version, gpu.name, choice.form, choice.note,
             "strongly typed" if policy.strongly_typed else f"weakly typed, flags {policy.set_flags}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create the engine cache {cache_dir}: {error}; pass --cache DIR") from error
    logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    cache = _PlanCache(tensorrt, logger, cache_dir, cache_dir / timing_cache_name(version, gpu), policy, settings,
                       gpu, precision, choice, plugins)
    runtime = tensorrt.Runtime(logger)
    stream = cuda.call("cudaStreamCreate")
    engines, runners, loads = {}, {}, {}
    resources = [runtime, logger]

    def close() -> None:  # contexts, then engines, then the runtime that deserialised them, then the stream
        cuda.use_device()
        for runner in runners.values():
            runner.close()
        runners.clear()
        engines.clear()
        resources.clear()
        cuda.call("cudaStreamDestroy", stream)

    try:
        for name, graph in manifest.graphs.items():
            start = time.perf_counter()
            onnx_path = manifest.graph_file(directory, name, choice.form)
            plan, built, record, plan_path = cache.plan(name, graph, onnx_path)
            engines[name] = runtime.deserialize_cuda_engine(plan)
            if engines[name] is None:
                raise DpaError(f"TensorRT {version} cannot deserialise {plan_path} (corrupt, or built by another "
                               "TensorRT or plugin library); delete it and run `dpa build` again")
            runners[name] = TensorRTRunner(name, engines[name], cuda, stream, tensorrt)
            _check_against_manifest(runners[name], graph, plan_path)
            loads[name] = GraphLoad(name, onnx_path, time.perf_counter() - start, built, plan_path,
                                    [f"TensorRT {version}"], record.get("plugin_layers"))
    except BaseException:
        close()
        raise
    details = {"cache_dir": str(cache_dir), "timing_cache": str(cache.timing_path), "gpu": gpu.name,
               "compute_capability": "{}.{}".format(*gpu.compute_capability),
               "plugin_library": str(plugins) if plugins else None, "form_note": choice.note,
               "strongly_typed": policy.strongly_typed, "builder_flags": list(policy.set_flags),
               "settings": asdict(settings)}
    return Engine(backend="tensorrt", precision=precision, device=f"cuda:{index}", directory=directory,
                  manifest=manifest, runners=runners, loads=loads, form=choice.form, providers=[f"TensorRT {version}"],
                  versions=versions, details=details, transfer=CudaTransfer(cuda), close=close)


def _paired_cuda(tensorrt_version: str, index: int) -> tuple[Cuda, dict[str, str]]:
    """The CUDA runtime of cuda-python on GPU `index`, once cuda-python is known to pair with TensorRT's CUDA
    flavour and the driver to support it (checked before any other CUDA call), and the version labels.

    cuda_driver is the newest CUDA the driver supports. cudaRuntimeGetVersion answers for cuda-python's own
    runtime, not for the CUDA TensorRT was built with (tensorrt_cuda_major, from the installed packages)."""
    distributions = installed_distributions()
    cuda_major = tensorrt_cuda_major(distributions, installed_debian_packages())
    cuda_python = distributions.get("cuda-bindings") or distributions.get("cuda-python")
    check_cuda_python(cuda_python, tensorrt_version, cuda_major)
    cuda = Cuda(import_cudart(cuda_major), index)
    driver_version = cuda.call("cudaDriverGetVersion")
    check_cuda_driver(cuda_python, driver_version, cuda_major)
    versions = {"tensorrt": tensorrt_version,
                "tensorrt_cuda_major": str(cuda_major) if cuda_major is not None else "unknown",
                "cuda_driver": cuda_version_string(driver_version),
                "cuda_python": cuda_python or "unknown",
                "cuda_python_runtime": cuda_version_string(cuda.call("cudaRuntimeGetVersion"))}
    return cuda, versions


def _check_against_manifest(runner: TensorRTRunner, graph: GraphSpec, plan_path: Path) -> None:
    expected = {tensor.name: tensor.shape for tensor in graph.inputs + graph.outputs}
    actual = {name: array.shape for name, array in runner.host.items()}
    if actual != expected:
        raise DpaError(f"{plan_path} does not match the manifest (plan I/O {actual}, manifest {expected}); "
                       "delete it and run `dpa build` again")
