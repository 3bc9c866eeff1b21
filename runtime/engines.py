"""One factory for every backend: `open_engine(export_dir, backend, precision, ...)` -> `Engine`. Torch-free.

The runtime's backends are ONNX Runtime (`onnxruntime_engine`) and TensorRT (`tensorrt_engine`). Layers above the
runtime add theirs by passing a larger `openers` table: `dpa.training.torch_engine.open_engine` is this function
with PyTorch added, so `dpa check`, `dpa compare` and `dpa bench` open PyTorch exactly as they open the others.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpa.errors import DpaError
from dpa.manifest import Manifest
from dpa.runtime.engine import Engine, default_cache_dir, parse_device, resolve_variant
from dpa.runtime.onnxruntime_engine import CUDA_PROVIDER, open_onnxruntime_engine
from dpa.runtime.tensorrt_engine import open_tensorrt_engine
from dpa.runtime.tensorrt_policy import cuda_python_installed

log = logging.getLogger(__name__)

Opener = Callable[..., Engine]  # (directory, manifest, precision, *, device, cache_dir, plugin_library, form, ...)


def _open_tensorrt(directory: Path, manifest: Manifest, precision: str, *, device: str, cache_dir: Path,
                   plugin_library, form, threads=None, providers=None) -> Engine:
    if providers:
        raise DpaError("providers are ONNX Runtime's; the tensorrt backend takes none")
    return open_tensorrt_engine(directory, manifest, precision, device=device, cache_dir=cache_dir,
                                plugin_library=plugin_library, form=form)


RUNTIME_OPENERS: Mapping[str, Opener] = {"onnxruntime": open_onnxruntime_engine, "tensorrt": _open_tensorrt}
BACKENDS = tuple(RUNTIME_OPENERS)


def open_engine(export_dir: str | os.PathLike, backend: str = "onnxruntime", precision: str = "fp32", *,
                device: str = "auto", threads: int | None = None, providers: Sequence[str] | None = None,
                cache_dir: str | os.PathLike | None = None, plugin_library: str | os.PathLike | None = None,
                form: str | None = None, openers: Mapping[str, Opener] = RUNTIME_OPENERS, **options) -> Engine:
    """Open the `precision` variant of an export directory (`resolve_variant`) on `backend`.

    backend: one of `openers` (the runtime's: onnxruntime, tensorrt) or auto (`best_backend()`).
    device: auto | cpu | cuda | cuda:N. threads: intra-op threads. providers: ONNX Runtime providers (names or
    cpu/cuda/tensorrt). cache_dir: TensorRT plans and timing cache, ONNX Runtime's TensorRT-provider caches
    (default default_cache_dir()). plugin_library: libdpa_plugins.so or its folder (TensorRT; default: searched,
    used when found). form: the exported form to run (default: chosen per backend). options: passed on to the
    backend's opener (e.g. PyTorch's checkpoint).
    """
    if backend == "auto" and parse_device(device)[0] == "cpu":
        backend = "onnxruntime"
    elif backend == "auto":
        choice = best_backend()
        backend, device = choice.backend, device if device != "auto" else choice.device
        log.info("backend: %s on %s (%s)", backend, device, choice.reason)
    if backend not in openers:
        raise DpaError(f"backend {backend!r}: choose one of {', '.join(openers)} or auto")
    parse_device(device)
    directory = resolve_variant(export_dir, precision)
    manifest = Manifest.load(directory)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return openers[backend](directory, manifest, precision, device=device, threads=threads, providers=providers,
                            cache_dir=cache, plugin_library=plugin_library, form=form, **options)


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

    missing = ([] if importlib.util.find_spec("tensorrt") else ["tensorrt"]) + \
        ([] if cuda_python_installed() else ["cuda-python"])
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
