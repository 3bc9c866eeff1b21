"""What every backend answers: a `Runner` per stage graph, an `Engine` holding them, and where their tensors live.
Torch-free.

An `Engine` holds one runner per graph of an export directory (`engine.runners`, graph name -> runner). Every
runner answers, as Polygraphy's runners do:
- `run(output_names, feed) -> list of arrays` and `infer(feed) -> {output name: array}`: numpy in and out, with
  the wall time of the last call in `last_seconds` (synchronised with the device);
- `run_resident(feed) -> {output name: tensor}`: the backend's own tensors in and out (numpy on ONNX Runtime's
  CPU provider, OrtValues bound to the device on its GPU providers, device buffers on TensorRT, torch tensors on
  PyTorch), so a chain of graphs keeps its intermediate tensors and the memory bank where the backend computes.
`engine.transfer` moves tensors across: `upload(array)` (a frame in) and `download(tensor)` (a mask out).

Precision lives in the graphs: `dpa export` writes fp32, `dpa calibrate` writes fp16 and int8 variants as export
directories of their own (`resolve_variant`). Backends are opened by `dpa.runtime.engines.open_engine`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpa.errors import DpaError
from dpa.manifest import MANIFEST_NAME, PRECISIONS, Manifest

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CACHE_ENVIRONMENT_VARIABLE = "DPA_CACHE"


class Transfer(Protocol):
    """How an engine's tensors cross to and from host memory."""

    def upload(self, array: np.ndarray) -> Any: ...

    def download(self, tensor: Any) -> np.ndarray: ...


class HostTransfer:
    """Tensors that are numpy arrays already (a backend computing in host memory)."""

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def download(self, tensor: Any) -> np.ndarray:
        return np.asarray(tensor)


HOST = HostTransfer()


class Runner(Protocol):
    """One graph, ready to run: what StageChain, check, compare and bench call."""

    name: str
    input_names: list[str]
    output_names: list[str]
    last_seconds: float

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_resident(self, feed: Mapping[str, Any]) -> dict[str, Any]: ...


class HostRunner:
    """`infer` and `run_resident` for a runner that computes in host memory and defines `run`."""

    output_names: list[str]

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(self.output_names, feed), strict=True))

    def run_resident(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        return self.infer(feed)


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

    runners: graph name -> runner (see `Runner`); loads: graph name -> GraphLoad; transfer: how the runners'
    tensors reach the host. Close it (or use it as a context manager) to free device buffers.
    """

    def __init__(self, *, backend: str, precision: str, device: str, directory: Path, manifest: Manifest,
                 runners: Mapping[str, Runner], loads: Mapping[str, GraphLoad] | None = None, form: str,
                 providers: list[str] | None = None, versions: Mapping[str, str] | None = None,
                 details: Mapping | None = None, transfer: Transfer = HOST,
                 close: Callable[[], None] | None = None):
        self.backend = backend
        self.precision = precision
        self.device = device
        self.directory = Path(directory)
        self.manifest = manifest
        self.runners: dict[str, Runner] = dict(runners)
        self.loads = dict(loads or {})
        self.form = form
        self.providers = list(providers or [])
        self.versions = dict(versions or {})
        self.details = dict(details or {})
        self.transfer = transfer
        self._close = close

    def with_runners(self, runners: Mapping[str, Runner]) -> Engine:
        """The same engine answering through other runners (e.g. wrappers that record what they are fed); closing
        it does not close this one."""
        return Engine(backend=self.backend, precision=self.precision, device=self.device, directory=self.directory,
                      manifest=self.manifest, runners=runners, loads=self.loads, form=self.form,
                      providers=self.providers, versions=self.versions, details=self.details,
                      transfer=self.transfer)

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
        self.runners = {}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def resolve_variant(export_dir: str | os.PathLike, precision: str) -> Path:
    """The export directory that holds `precision`: export_dir itself when its manifest has that precision,
    else export_dir/<precision> (written by `dpa calibrate`) when its manifest has it; else DpaError."""
    if precision not in PRECISIONS:
        raise DpaError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    directory = Path(export_dir)
    own = Manifest.load(directory).precision
    if own == precision:
        return directory
    variant = directory / precision
    if (variant / MANIFEST_NAME).is_file() and (manifest := Manifest.load(variant)).precision == precision:
        check_variant_source(directory, variant, manifest)
        return variant
    raise DpaError(
        f"{directory} holds {own} graphs and no {precision} variant ({variant} has no {precision} manifest); "
        f"precision lives in the graphs: make the variant with "
        f"`dpa calibrate {directory} --frames <calibration frames> --out {directory}`"
    )


def check_variant_source(directory: Path, variant: Path, manifest: Manifest) -> None:
    """DpaError when the fp32 graphs in `directory` are not those the variant was calibrated from (re-exported
    since): its graphs would belong to another model."""
    recorded = (manifest.variant or {}).get("source_sha256")
    if recorded is None:
        log.warning("%s does not record which fp32 files it was made from (made by an older dpa calibrate); re-run "
                    "`dpa calibrate` to have that checked", variant)
        return
    if recorded != Manifest.load(directory).file_hashes():
        raise DpaError(f"{variant} was calibrated from other fp32 graphs than {directory} holds now (re-exported "
                       f"since); make it again: `dpa calibrate {directory} --frames <calibration frames> --out "
                       f"{directory} --overwrite`")


def default_cache_dir() -> Path:
    """Where built plans and timing caches go: $DPA_CACHE, else ~/.cache/dpa/engines."""
    return Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or Path.home() / ".cache" / "dpa" / "engines")


def parse_device(device: str) -> tuple[str, int]:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> (kind, GPU index)."""
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DpaError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)


def zero_feed(inputs) -> dict[str, np.ndarray]:
    """Zeros for every input (`TensorSpec`s) of a graph, in its shapes and dtypes."""
    return {tensor.name: np.zeros(tensor.shape, tensor.numpy_dtype) for tensor in inputs}


def check_engine(engine: Engine) -> dict[str, float]:
    """Run every graph once on zero feeds; graph -> seconds. DpaError naming the graph and output when an
    output has NaN or Inf, or the wrong shape."""
    seconds = {}
    for name, graph in engine.manifest.graphs.items():
        runner = engine.runners[name]
        outputs = runner.infer(zero_feed(graph.inputs))
        for tensor in graph.outputs:
            array = outputs[tensor.name]
            if tuple(array.shape) != tensor.shape:
                raise DpaError(f"graph {name} output {tensor.name} has shape {tuple(array.shape)}, the manifest "
                               f"says {tensor.shape}")
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise DpaError(f"graph {name} output {tensor.name}: {bad} of {array.size} values are NaN or Inf "
                               f"on zero inputs ({engine.backend}, {engine.precision}, {engine.device})")
        seconds[name] = runner.last_seconds
    return seconds
