"""Where inside a graph a precision variant loses accuracy: every layer's output against the fp32 graph's. Torch-free.

Both graphs get the same feed; every float tensor that a node of the fp32 graph produces and the variant also
has (same name: the variants keep the fp32 tensor names) is made a graph output, and the two are compared. A
layer's `added` error is its output's relative error minus the largest relative error among its inputs, so
the ranking points at the layers that lose precision rather than at those that only pass it on.
Custom prototype-attention nodes count as one layer (their function bodies are not opened).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpa.errors import require_module


def _with_all_outputs(model, names: list[str]):
    """A copy of `model` whose graph outputs include every tensor of `names` (types from shape inference)."""
    onnx = require_module("onnx", "onnx", "the per-layer analysis")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    infos = {info.name: info for info in inferred.graph.value_info}
    exposed = copy.deepcopy(inferred)
    present = {output.name for output in exposed.graph.output}
    for name in names:
        if name not in present and name in infos:
            exposed.graph.output.append(infos[name])
    return exposed


def _float_node_outputs(model) -> dict[str, tuple]:
    """tensor name -> (node, float inputs) for every float output of a main-graph node."""
    onnx = require_module("onnx", "onnx", "the per-layer analysis")
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    return {
        name: (node, [i for i in node.input if types.get(i) in floats])
        for node in model.graph.node if node.op_type not in ("Constant", "QuantizeLinear", "DequantizeLinear", "Cast")
        for name in node.output if types.get(name) in floats
    }


def layer_errors(
    reference_path: str | Path, variant_path: str | Path, feeds: Iterable[dict[str, np.ndarray]],
    threads: int | None = None,
) -> list[dict]:
    """Per layer of the fp32 graph at `reference_path`: the variant's error on `feeds`, worst added error first.

    Returns [{"tensor", "node", "op_type", "relative" (max abs / max |fp32|, worst over feeds), "cosine" (worst),
    "max_abs", "added" (relative minus the worst relative among the node's inputs)}].
    """
    onnx = require_module("onnx", "onnx", "the per-layer analysis")
    ort = require_module("onnxruntime", "onnxruntime", "the per-layer analysis")
    reference_model, variant_model = onnx.load(str(reference_path)), onnx.load(str(variant_path))
    layers = _float_node_outputs(reference_model)
    variant_tensors = {name for node in variant_model.graph.node for name in node.output}
    names = [name for name in layers if name in variant_tensors]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    reference = ort.InferenceSession(_with_all_outputs(reference_model, names).SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])
    variant = ort.InferenceSession(_with_all_outputs(variant_model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [name for name in names if name in {o.name for o in variant.get_outputs()}
             and name in {o.name for o in reference.get_outputs()}]
    max_abs = dict.fromkeys(names, 0.0)
    scale = dict.fromkeys(names, 0.0)
    cosine = dict.fromkeys(names, 1.0)
    for feed in feeds:
        for name, expected, actual in zip(names, reference.run(names, feed), variant.run(names, feed), strict=True):
            expected, actual = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            max_abs[name] = max(max_abs[name], float(np.abs(actual - expected).max(initial=0.0)))
            scale[name] = max(scale[name], float(np.abs(expected).max(initial=0.0)))
            norms = np.linalg.norm(actual) * np.linalg.norm(expected)
            cosine[name] = min(cosine[name], float(actual @ expected / norms) if norms > 0 else 1.0)
    relative = {name: max_abs[name] / scale[name] if scale[name] > 0 else 0.0 for name in names}
    rows = []
    for name in names:
        node, inputs = layers[name]
        inherited = max((relative.get(i, 0.0) for i in inputs), default=0.0)
        rows.append({"tensor": name, "node": node.name, "op_type": node.op_type, "relative": relative[name],
                     "cosine": cosine[name], "max_abs": max_abs[name], "added": relative[name] - inherited})
    return sorted(rows, key=lambda row: row["added"], reverse=True)
