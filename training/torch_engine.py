"""PyTorch as a backend: a model's stage wrappers (`dpa.training.stages`) as runners, chained by the runtime's
`StageChain` and `Segmenter` exactly like ONNX Runtime sessions and TensorRT plans.

`open_engine` is the runtime's factory (`dpa.runtime.engines.open_engine`) with the `pytorch` backend added: it
opens the model an export directory was made from (its weights verified against the manifest), so `dpa check`,
`dpa compare` and `dpa bench` compare backends through one interface. `model_engine` runs a model that has no
export (offline inference, `dpa eval --checkpoint`).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpa.errors import DpaError
from dpa.manifest import GraphSpec, Manifest, ModelRecord, Pipeline, TensorSpec, WeightsRecord
from dpa.runtime.engine import Engine, parse_device
from dpa.runtime.engines import RUNTIME_OPENERS
from dpa.runtime.engines import open_engine as open_runtime_engine
from dpa.training import stages
from dpa.training.checkpoint import exported_model, weights_sha256
from dpa.training.model import DPA, count_parameters

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}  # torch -> numpy


class TorchTransfer:
    """Tensors as torch tensors on one device, in one floating dtype (float64 for exact reference runs)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        self.device = device
        self.dtype = dtype
        self.host_dtype = np.dtype(_DTYPE_NAMES[dtype])

    def upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def download(self, tensor: Any) -> np.ndarray:
        return tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


class TorchRunner:
    """One stage wrapper as a runner (inference mode); `last_seconds` is synchronised with CUDA."""

    def __init__(self, name: str, wrapper: nn.Module, transfer: TorchTransfer):
        self.name = name
        self.wrapper = wrapper
        self.transfer = transfer
        self.input_names = list(wrapper.input_names)
        self.output_names = list(wrapper.output_names)
        self.last_seconds = 0.0

    def run_resident(self, feed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = []
        for name in self.input_names:
            value = feed[name]
            inputs.append(value.to(self.transfer.dtype) if isinstance(value, torch.Tensor) and value.is_floating_point()
                          else self.transfer.upload(value) if not isinstance(value, torch.Tensor) else value)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = self.wrapper(*inputs)
        if self.transfer.device.type == "cuda":
            torch.cuda.synchronize(self.transfer.device)
        self.last_seconds = time.perf_counter() - start
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))

    def run(self, output_names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.run_resident(feed)
        return [self.transfer.download(outputs[name]) for name in (output_names or self.output_names)]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(self.output_names, feed), strict=True))


def torch_device(device: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch device; a GPU that cannot be used is a DpaError, never a CPU run."""
    kind, index = parse_device(device)
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DpaError(f"device {device}: this PyTorch ({torch.__version__}) sees no CUDA GPU "
                           "(torch.cuda.is_available() is False); use a CUDA build of PyTorch on a machine with an "
                           "NVIDIA GPU, or --device cpu")
        return torch.device("cuda", index)
    return torch.device("cpu")


def stage_manifest(model: DPA, weights: WeightsRecord | None = None) -> Manifest:
    """The manifest of `model`'s stage graphs without exporting them: names, shapes and dtypes from one pass of the
    wrappers (no files, so no forms), the pipeline, the model record."""
    wrappers = stages.stage_graphs(model.eval())
    examples, outputs = stages.example_values(model, wrappers)

    def specs(names, tensors) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, tuple(t.shape), _DTYPE_NAMES[t.dtype]) for n, t in zip(names, tensors, strict=True))

    graphs = {name: GraphSpec(name, {}, specs(wrapper.input_names, examples[name]),
                              specs(wrapper.output_names, outputs[name]))
              for name, wrapper in wrappers.items()}
    config = model.config
    return Manifest(size=config.size, memory=config.memory, graphs=graphs, forms=(),
                    pipeline=Pipeline.from_dict(stages.pipeline(config)),
                    model=ModelRecord(config.to_dict(), count_parameters(model), weights_sha256(model)),
                    checkpoint=weights or WeightsRecord("checkpoint"))


def model_engine(model: DPA, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 manifest: Manifest | None = None, directory: str | os.PathLike = ".") -> Engine:
    """`model`'s stage graphs as an Engine on `device` (auto | cpu | cuda | cuda:N), computing in `dtype`.
    manifest: the export's, when the model is an export's (default: `stage_manifest(model)`)."""
    target = torch_device(device)
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model)  # the caller's model stays as it is
    model = model.eval().to(target, dtype)
    transfer = TorchTransfer(target, dtype)
    runners = {name: TorchRunner(name, wrapper, transfer) for name, wrapper in stages.stage_graphs(model).items()}
    manifest = manifest or stage_manifest(model)
    return Engine(backend="pytorch", precision="fp32" if dtype == torch.float32 else _DTYPE_NAMES[dtype],
                  device=str(target), directory=Path(directory), manifest=manifest, runners=runners, form="pytorch",
                  providers=[f"PyTorch {torch.__version__}"], versions={"torch": torch.__version__},
                  transfer=transfer, details={"threads": torch.get_num_threads()})


def open_torch_engine(directory: Path, manifest: Manifest, precision: str, *, device: str = "auto",
                      checkpoint: str | None = None, dtype: torch.dtype = torch.float32, threads: int | None = None,
                      **unused) -> Engine:
    """The model an export directory was made from (`exported_model`: the manifest's checkpoint, or `checkpoint`),
    as an Engine. Only the fp32 graphs have a PyTorch counterpart."""
    if precision != "fp32":
        raise DpaError(f"the pytorch backend runs the fp32 model the graphs came from, not a {precision} variant")
    if threads:
        torch.set_num_threads(threads)
    model, source = exported_model(directory, manifest, checkpoint)
    engine = model_engine(model, device, dtype, manifest, directory)
    engine.details["weights"] = source
    return engine


def engine_model(engine: Engine) -> DPA:
    """The model a pytorch engine runs."""
    if engine.backend != "pytorch":
        raise DpaError(f"a {engine.backend} engine has no PyTorch model")
    return next(iter(engine.runners.values())).wrapper.model


OPENERS = {**RUNTIME_OPENERS, "pytorch": open_torch_engine}
BACKENDS = tuple(OPENERS)


def open_engine(export_dir: str | os.PathLike, backend: str = "onnxruntime", precision: str = "fp32",
                **options) -> Engine:
    """`dpa.runtime.engines.open_engine` with the pytorch backend too (options as there, plus `checkpoint` and
    `dtype` for pytorch)."""
    return open_runtime_engine(export_dir, backend, precision, openers=OPENERS, **options)
