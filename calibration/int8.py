"""The int8 variant of a stage graph: explicit quantization (Q/DQ) for TensorRT (SPEC §4.4). Torch-free.

ONNX Runtime's static QDQ quantizer with symmetric int8 activations (per tensor, zero point 0) and weights (per
output channel, zero point 0), activation ranges calibrated on recorded feeds (entropy, percentile or max), biases
left float; then Q/DQ placed the way TensorRT's rules ask (`place_qdq_for_tensorrt`): only on the inputs of
weighted layers (Conv, ConvTranspose, MatMul, Gemm), never on their outputs or on graph outputs.
Prototype-attention nodes are excluded (float I/O). `tensorrt_qdq_problems` checks the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpa.calibration.ranges import CALIBRATION_METHODS, activation_ranges
from dpa.errors import DpaError, require_module

log = logging.getLogger(__name__)

CUSTOM_DOMAIN = "trt.plugins"  # the prototype-attention nodes
# The weighted layers whose inputs TensorRT wants quantized.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SPLIT_RANGE_RATIO = 8.0  # split a Conv over a Concat whose parts' ranges differ more than this (3 bits of int8)


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def prototype_nodes(model) -> list[str]:
    """Names of the custom prototype-attention nodes (domain trt.plugins) of a graph."""
    return [node.name for node in model.graph.node if node.domain == CUSTOM_DOMAIN]


def quantized_activations(
    model, op_types: Iterable[str] = QUANTIZED_OP_TYPES, excluded: Iterable[str] = ()
) -> list[str]:
    """The activation tensors that get Q/DQ: the non-constant data inputs of the weighted layers (Conv,
    ConvTranspose: input 0; MatMul, Gemm: inputs 0 and 1), excluded nodes left out; in graph order."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
    op_types, excluded = set(op_types), set(excluded)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types or node.name in excluded:
            continue
        for name in node.input[: 2 if node.op_type in ("MatMul", "Gemm") else 1]:
            if name and name not in constants and name not in names:
                names.append(name)
    return names


def concat_convs(model) -> list[tuple]:
    """(conv node, concat node) for every plain Conv (group 1, weight initializer) whose data input is a Concat
    along the channel axis."""
    producer = {name: node for node in model.graph.node for name in node.output}
    initializers = {tensor.name for tensor in model.graph.initializer}
    found = []
    for node in model.graph.node:
        concat = producer.get(node.input[0]) if node.op_type == "Conv" else None
        if concat is None or concat.op_type != "Concat" or node.input[1] not in initializers:
            continue
        attributes = {attribute.name: attribute for attribute in node.attribute}
        axis = next(a.i for a in concat.attribute if a.name == "axis")
        if ("group" not in attributes or attributes["group"].i == 1) and axis in (1, -3):
            found.append((node, concat))
    return found


def split_concat_conv(model, conv_name: str) -> None:
    """Rewrite Conv(Concat(x_1 … x_k), W, b) as Conv(x_1, W_1, b) + … + Conv(x_k, W_k), W_i the slices of W along
    its input channels (the same function, in place). Each part then gets its own int8 scale: one scale for a
    concatenation of features in the hundreds and correlations in [-1, 1] would round the correlations to zero."""
    from onnx import helper, numpy_helper

    onnx = require_module("onnx", "onnx", "writing the int8 variant")
    graph = model.graph
    conv, concat = next((c, k) for c, k in concat_convs(model) if c.name == conv_name)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in (*inferred.graph.input, *inferred.graph.value_info)}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight = numpy_helper.to_array(initializers[conv.input[1]])
    attributes = [attribute for attribute in conv.attribute]
    nodes, start, partial = [], 0, None
    for index, part in enumerate(concat.input):
        channels = shapes[part][1]
        name = f"{conv.name}_part{index}"
        weight_name = f"{conv.input[1]}_part{index}"
        graph.initializer.append(numpy_helper.from_array(weight[:, start:start + channels].copy(), weight_name))
        inputs = [part, weight_name] + (list(conv.input[2:3]) if index == 0 else [])
        output = f"{conv.output[0]}_part{index}"
        node = helper.make_node("Conv", inputs, [output], name=name)
        node.attribute.extend(attributes)
        nodes.append(node)
        if partial is not None:
            last = index == len(concat.input) - 1
            total = conv.output[0] if last else f"{conv.output[0]}_sum{index}"
            nodes.append(helper.make_node("Add", [partial, output], [total], name=f"{conv.name}_add{index}"))
            output = total
        partial = output
        start += channels
    if start != weight.shape[1]:
        raise DpaError(f"{conv.name}: the concatenation has {start} channels, the weight {weight.shape[1]}")
    position = list(graph.node).index(conv)
    graph.node.remove(conv)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    if not any(concat.output[0] in node.input for node in graph.node) and concat.output[0] not in {
            output.name for output in graph.output}:
        graph.node.remove(concat)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def quantize_int8(
    model_path: str | Path, feeds: Iterable[dict[str, np.ndarray]], method: str = "entropy",
    exclude: Iterable[str] = (), op_types: Iterable[str] = QUANTIZED_OP_TYPES, threads: int | None = None,
    split_ratio: float | None = SPLIT_RANGE_RATIO,
):
    """The int8 Q/DQ form of one graph -> (onnx.ModelProto, activation ranges {tensor: amax}, split convs).

    method: entropy | mse | percentile | max (`dpa.calibration.ranges`, TensorRT's calibrators on |x|), applied to
    the activations that get Q/DQ (`quantized_activations`); ONNX Runtime's `quantize_static` (QDQ, symmetric
    int8, per-channel weights) takes them as range overrides. exclude: node names left float besides the
    prototype-attention nodes, which always are (they are not weighted layers; TensorRT runs them as plugins).
    Q/DQ end up on the inputs of `op_types` only (`place_qdq_for_tensorrt`). split_ratio: a convolution over a
    concatenation whose parts' largest |x| differ by more than this factor is split into one convolution per
    part (`split_concat_conv`, exact in float) so each part gets its own scale; None: never.
    """
    onnx = require_module("onnx", "onnx", "writing the int8 variant")
    require_module("onnxruntime.quantization", "onnxruntime", "writing the int8 variant")
    if method not in CALIBRATION_METHODS:
        raise DpaError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    op_types = list(op_types)
    feeds = list(feeds)
    model = onnx.load(str(model_path))
    excluded = sorted(set(prototype_nodes(model)) | set(exclude))
    with _temporary_folder(Path(model_path).parent) as folder:
        split = _split_mixed_range_convs(model, model_path, feeds, excluded, split_ratio, threads)
        source = folder / "source.onnx"
        onnx.save(model, str(source))
        activations = quantized_activations(model, op_types, excluded)
        ranges = activation_ranges(source, feeds, activations, method, threads=threads)
        output = folder / "quantized.onnx"
        _quantize_static(source, output, feeds, op_types, excluded, ranges)
        quantized = onnx.load(str(output))
    place_qdq_for_tensorrt(quantized, op_types, excluded)
    return quantized, ranges, split


def _split_mixed_range_convs(model, model_path: str | Path, feeds: list[dict[str, np.ndarray]], excluded: list[str],
                             split_ratio: float | None, threads: int | None) -> list[str]:
    """Split (`split_concat_conv`, in place) every Conv over a Concat, excluded nodes left out, whose parts'
    largest |x| on `feeds` differ by more than `split_ratio` (None: none); returns the split Convs' names."""
    split = []
    candidates = [(conv, concat) for conv, concat in concat_convs(model) if conv.name not in excluded]
    if split_ratio is not None and candidates:
        parts = sorted({name for _, concat in candidates for name in concat.input})
        maxima = activation_ranges(model_path, feeds, parts, "max", threads=threads)
        for conv, concat in candidates:
            values = [maxima[name] for name in concat.input]
            if max(values) > split_ratio * min(values):
                split.append(conv.name)
        for name in split:
            split_concat_conv(model, name)
    return split


def _quantize_static(source: Path, output: Path, feeds: list[dict[str, np.ndarray]], op_types: list[str],
                     excluded: list[str], ranges: dict[str, float]) -> None:
    """ONNX Runtime's QDQ quantizer on `source` (symmetric int8, per-channel weights, float biases, the
    activation ranges {tensor: amax} as overrides) written to `output`."""
    from onnxruntime import quantization

    overrides = {name: [{"rmin": np.array(-amax, np.float32), "rmax": np.array(amax, np.float32)}]
                 for name, amax in ranges.items()}
    extra_options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT takes float biases; an int32 bias DQ is not a TensorRT Q/DQ
        "OpTypesToExcludeOutputQuantization": op_types,
        "TensorQuantOverrides": overrides,
    }
    with _quiet():
        # The MinMax pass only gives ONNX Runtime ranges to start from; every quantized activation's range is
        # overridden with the one computed above.
        quantization.quantize_static(
            str(source), str(output), _FeedReader(feeds), quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=op_types, per_channel=True, reduce_range=False,
            activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=quantization.CalibrationMethod.MinMax,
            extra_options=extra_options,
        )


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer prints progress and warns about pre-processing: keep that at debug level."""
    buffer = io.StringIO()
    quantization_log = logging.getLogger()
    level = quantization_log.level
    quantization_log.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        quantization_log.setLevel(level)
        if buffer.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", buffer.getvalue().strip().replace("\n", "; "))


@contextlib.contextmanager
def _temporary_folder(near: Path):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=".dpa-quantize-", dir=near if os.access(near, os.W_OK) else None))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def place_qdq_for_tensorrt(model, op_types: Iterable[str] = QUANTIZED_OP_TYPES, excluded: Iterable[str] = ()) -> None:
    """Keep activation Q/DQ only where TensorRT's placement rules want them: on the inputs of weighted layers.

    ONNX Runtime's QDQ quantizer hands the dequantized tensor to every consumer (concatenations, activations,
    pooling, graph outputs); here every other consumer gets the float tensor back, graph outputs stay exact,
    and Q/DQ pairs (and their scales) that no longer feed anything are removed. In place.
    """
    graph = model.graph
    quantized = set(op_types)
    excluded = set(excluded)
    outputs = {output.name for output in graph.output}
    producer = {name: node for node in graph.node for name in node.output}

    def consumers(name: str) -> list:
        return [node for node in graph.node if name in node.input]

    for dequantize in [node for node in graph.node if node.op_type == "DequantizeLinear"]:
        quantize = producer.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue  # a weight: int8 initializer -> DequantizeLinear
        source = quantize.input[0]
        if dequantize.output[0] in outputs:
            # ORT made the DQ write the graph output; the producer writes it again, the DQ a new name.
            dequantized = f"{dequantize.output[0]}_DequantizeLinear_Output"
            for node in consumers(dequantize.output[0]):
                node.input[:] = [dequantized if name == dequantize.output[0] else name for name in node.input]
            for node in graph.node:
                node.input[:] = [dequantize.output[0] if name == source else name for name in node.input]
                node.output[:] = [dequantize.output[0] if name == source else name for name in node.output]
            source = dequantize.output[0]
            dequantize.output[0] = dequantized
            producer = {name: node for node in graph.node for name in node.output}
        for node in consumers(dequantize.output[0]):
            if node.op_type not in quantized or node.name in excluded:
                node.input[:] = [source if name == dequantize.output[0] else name for name in node.input]
    _remove_dead_qdq(model)


def _remove_dead_qdq(model) -> None:
    graph = model.graph
    changed = True
    while changed:
        used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        dead = [node for node in graph.node
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.output[0] not in used]
        for node in dead:
            graph.node.remove(node)
        changed = bool(dead)
    used = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)


def tensorrt_qdq_problems(model) -> list[str]:
    """Why an int8 graph (onnx.ModelProto) is not an explicit-quantization graph TensorRT takes; [] when it is.

    Checks: quantization only through standard-domain QuantizeLinear/DequantizeLinear (no QLinear*/Integer/
    com.microsoft ops); every Q/DQ has an explicit int8 zero point that is all zeros (symmetric); scales are
    positive and finite; activations per tensor (scalar scale); weights (int8 initializers behind a DQ) per
    channel: a 1-D scale with one entry per slice along an explicit `axis`, values within [-127, 127].
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    initializer_types = {tensor.name: tensor.data_type for tensor in graph.initializer}
    problems = []
    for node in graph.node:
        label = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
                            "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat"):
            problems.append(f"{label}: a quantized operator; TensorRT takes Q/DQ (QuantizeLinear/DequantizeLinear)")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: domain {node.domain!r}; TensorRT needs the standard QuantizeLinear/"
                            "DequantizeLinear")
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{label}: no zero point (defaults to uint8); symmetric int8 needs an explicit int8 0")
            continue
        zero_point, scale = constants.get(node.input[2]), constants.get(node.input[1])
        if zero_point is None or scale is None:
            problems.append(f"{label}: scale and zero point must be constants")
            continue
        if zero_point.dtype != np.int8:
            problems.append(f"{label}: zero point of type {zero_point.dtype}, not int8")
        if np.any(zero_point != 0):
            problems.append(f"{label}: zero point {zero_point.ravel()[:4].tolist()} is not 0 (asymmetric)")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label}: scale must be positive and finite")
        weight = node.op_type == "DequantizeLinear" and initializer_types.get(node.input[0]) is not None
        if weight:
            values = constants[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            if initializer_types[node.input[0]] != TensorProto.INT8:
                problems.append(f"{label}: weight {node.input[0]} is not int8")
            elif values.min(initial=0) < -127:
                problems.append(f"{label}: weight {node.input[0]} uses -128 (symmetric int8 is [-127, 127])")
            if axis is None or scale.ndim != 1 or scale.shape[0] != values.shape[axis if axis >= 0 else
                                                                               axis + values.ndim]:
                problems.append(f"{label}: weight {node.input[0]} {list(values.shape)} is not quantized per "
                                f"channel (scale shape {list(scale.shape)}, axis {axis})")
        elif scale.ndim != 0 and scale.size != 1:
            problems.append(f"{label}: activation scale of shape {list(scale.shape)}; TensorRT takes per-tensor "
                            "activation scales")
    return problems


def require_tensorrt_qdq(model, label: str) -> None:
    """DpaError listing the first problems when `model` fails `tensorrt_qdq_problems`."""
    problems = tensorrt_qdq_problems(model)
    if problems:
        raise DpaError(f"{label}: not a TensorRT Q/DQ graph ({len(problems)} problems): {'; '.join(problems[:3])}")

