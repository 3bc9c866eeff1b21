"""fp16 and int8 variants of an export's stage graphs, with their precision in the graph (SPEC §4.4). Torch-free.

- fp16 (`convert_to_float16`): float tensors become float16 except where the arithmetic must stay float32 —
  softmax, reductions, normalisations, exp/log/pow/sqrt/div (`FLOAT32_OP_TYPES`) and every custom
  prototype-attention node (domain `trt.plugins`; their function bodies stay as exported, float32) — with a Cast
  at every boundary. Graph inputs and outputs stay float32, so the runtime's memory bank and chaining do not change.
- int8 (`quantize_int8`): explicit quantization for TensorRT — ONNX Runtime's static QDQ quantizer with symmetric
  int8 activations (per tensor, zero point 0) and weights (per output channel, zero point 0), activation ranges
  calibrated on recorded feeds (entropy, percentile or max), biases left float; then Q/DQ placed the way
  TensorRT's rules ask (`place_qdq_for_tensorrt`): only on the inputs of weighted layers (Conv, ConvTranspose,
  MatMul, Gemm), never on their outputs or on graph outputs. Prototype-attention nodes are excluded (float I/O).
  `tensorrt_qdq_problems` checks the result.

Both are made from the `functions` form; the `plugin` form is the same graph without the function bodies and the
`portable` form the same graph with them inlined (standard ops only), so all forms of a variant agree.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import io
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dpa.calibration.feeds import FeedSet, check_feeds_match
from dpa.calibration.ranges import HISTOGRAM_BINS, PERCENTILE, activation_ranges
from dpa.errors import DpaError, require_module

log = logging.getLogger(__name__)

VARIANT_PRECISIONS = ("fp16", "int8")
CUSTOM_DOMAIN = "trt.plugins"

# Ops whose arithmetic stays float32 in the fp16 variant: softmax, reductions, normalisations and the
# transcendental / division ops of normalisation (SPEC §4.4). BatchNormalization is folded into the
# convolutions by the export; listed in case a graph has one.
FLOAT32_OP_TYPES = frozenset({
    "Softmax", "LogSoftmax", "Hardmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization", "BatchNormalization",
    "MeanVarianceNormalization", "LRN",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
    "CastLike", "Range",
})
# Ops that take any input type and fix their own output type: left alone, inputs never cast.
_TYPE_SETTING_OPS = frozenset({"Cast", "Shape", "Size", "Constant", "ConstantOfShape", "EyeLike"})
# Float inputs that are parameters, not data, and must stay float32 whatever the data type (Resize: roi, scales).
_FLOAT32_PARAMETER_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}

# int8: the weighted layers whose inputs TensorRT wants quantized.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
CALIBRATION_METHODS = ("entropy", "percentile", "max")
SPLIT_RANGE_RATIO = 8.0  # split a Conv over a Concat whose parts' ranges differ more than this (3 bits of int8)
FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------------- fp16


def convert_to_float16(model, keep_op_types: Iterable[str] = FLOAT32_OP_TYPES):
    """An fp16 copy of an ONNX model (onnx.ModelProto) with float32 I/O.

    Every node of the default domain whose type is not in `keep_op_types` computes in float16: its float inputs
    are cast to float16 (initializers converted in place when no float32 node uses them) and its float outputs
    are float16. Nodes of other domains (the custom prototype-attention nodes) and `keep_op_types` keep float32,
    with Casts inserted where their inputs come from float16 nodes. Graph inputs and outputs keep float32.
    Model-local functions are not changed (they run in float32 behind the Casts).
    """
    onnx = require_module("onnx", "onnx", "writing the fp16 variant")
    from onnx import TensorProto, helper, numpy_helper

    keep = frozenset(keep_op_types)
    model = copy.deepcopy(model)
    graph = model.graph
    for node in graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attribute in node.attribute):
            raise DpaError(f"node {node.name or node.op_type} has a subgraph ({node.op_type}); the fp16 conversion "
                           "handles flat graphs only")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def half(node) -> bool:
        return node.domain in ("", "ai.onnx") and node.op_type not in keep and node.op_type not in _TYPE_SETTING_OPS

    def data_inputs(node) -> Iterator[tuple[int, str]]:
        """(index, name) of the float inputs whose type follows the node's precision."""
        if node.op_type in _TYPE_SETTING_OPS:
            return
        parameters = _FLOAT32_PARAMETER_INPUTS.get(node.op_type, set()) if half(node) else set()
        for index, name in enumerate(node.input):
            if name and types.get(name) == TensorProto.FLOAT and index not in parameters:
                yield index, name

    # Initializers read only as float16 data are stored as float16.
    uses = defaultdict(set)
    for node in graph.node:
        for _, name in data_inputs(node):
            uses[name].add(half(node))
    precision: dict[str, int] = {}
    for name, tensor in initializers.items():
        if tensor.data_type == TensorProto.FLOAT and uses.get(name) == {True}:
            values = numpy_helper.to_array(tensor)
            if np.abs(values).max(initial=0.0) > FLOAT16_MAX:
                raise DpaError(f"initializer {name} has values beyond float16's range (max |x| "
                               f"{np.abs(values).max():.3g}); it cannot be stored as float16")
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
            precision[name] = TensorProto.FLOAT16
    for item in (*graph.input, *graph.initializer):
        precision.setdefault(item.name, types.get(item.name, TensorProto.UNDEFINED))

    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "float16" if to == TensorProto.FLOAT16 else "float32"
            casts[key] = _unique_name(f"{name}_to_{suffix}", types)
            types[casts[key]] = to
            nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"{casts[key]}_cast", to=to))
        return casts[key]

    converted = 0
    for node in graph.node:
        target = TensorProto.FLOAT16 if half(node) else TensorProto.FLOAT
        for index, name in list(data_inputs(node)):
            if precision.get(name, TensorProto.FLOAT) != target:
                node.input[index] = cast(name, target)
        for name in node.output:
            original = types.get(name, TensorProto.UNDEFINED)
            precision[name] = TensorProto.FLOAT16 if half(node) and original == TensorProto.FLOAT else original
        converted += half(node)
        nodes.append(node)

    # Graph outputs keep float32: the float16 producer writes "<output>_float16", a Cast restores the name.
    renames = {}
    for output in graph.output:
        if precision.get(output.name) == TensorProto.FLOAT16:
            renames[output.name] = _unique_name(f"{output.name}_float16", types)
    for node in nodes:
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
        for index, name in enumerate(node.output):
            node.output[index] = renames.get(name, name)
    for name, internal in renames.items():
        nodes.append(helper.make_node("Cast", [internal], [name], name=f"{name}_to_float32_cast",
                                      to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    result = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    log.debug("fp16: %d of %d nodes in float16, %d casts", converted, len(nodes) - len(casts) - len(renames),
              len(casts) + len(renames))
    return result


def _unique_name(base: str, taken: dict) -> str:
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    return name


def float32_nodes(model) -> list:
    """The nodes of an fp16 variant that compute in float32: every node (other than Cast) whose float outputs
    are float32. For tests and reports."""
    onnx = require_module("onnx", "onnx", "inspecting a graph")
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)}
    return [node for node in model.graph.node
            if node.op_type != "Cast" and any(types.get(name) == TensorProto.FLOAT for name in node.output)]


# ---------------------------------------------------------------------------------------------------- int8


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

    method: entropy | percentile | max (`dpa.calibration.ranges`, TensorRT's calibrators on |x|), applied to
    the activations that get Q/DQ (`quantized_activations`); ONNX Runtime's `quantize_static` (QDQ, symmetric
    int8, per-channel weights) takes them as range overrides. exclude: node names left float besides the
    prototype-attention nodes, which always are (they are not weighted layers; TensorRT runs them as plugins).
    Q/DQ end up on the inputs of `op_types` only (`place_qdq_for_tensorrt`). split_ratio: a convolution over a
    concatenation whose parts' largest |x| differ by more than this factor is split into one convolution per
    part (`split_concat_conv`, exact in float) so each part gets its own scale; None: never.
    """
    onnx = require_module("onnx", "onnx", "writing the int8 variant")
    quantization = require_module("onnxruntime.quantization", "onnxruntime", "writing the int8 variant")
    if method not in CALIBRATION_METHODS:
        raise DpaError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    op_types = list(op_types)
    feeds = list(feeds)
    model = onnx.load(str(model_path))
    excluded = sorted(set(prototype_nodes(model)) | set(exclude))
    with _temporary_folder(Path(model_path).parent) as folder:
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
        source = folder / "source.onnx"
        onnx.save(model, str(source))
        activations = quantized_activations(model, op_types, excluded)
        ranges = activation_ranges(source, feeds, activations, method, threads=threads)
        overrides = {name: [{"rmin": np.array(-amax, np.float32), "rmax": np.array(amax, np.float32)}]
                     for name, amax in ranges.items()}
        extra_options = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,  # TensorRT takes float biases; an int32 bias DQ is not a TensorRT Q/DQ
            "OpTypesToExcludeOutputQuantization": op_types,
            "TensorQuantOverrides": overrides,
        }
        output = folder / "quantized.onnx"
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
        quantized = onnx.load(str(output))
    place_qdq_for_tensorrt(quantized, op_types, excluded)
    return quantized, ranges, split


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


# ------------------------------------------------------------------------------------------------- variants


def _forms_of(model, form: str):
    """The graph in `form` from its functions form: plugin drops the function bodies, portable inlines them."""
    import onnx.inliner

    if form == "functions":
        return model
    if form == "plugin":
        stripped = copy.deepcopy(model)
        del stripped.functions[:]
        return stripped
    if form == "portable":
        return onnx.inliner.inline_local_functions(model)
    raise DpaError(f"unknown form {form!r}")


def _save(model, path: Path, form: str) -> int:
    import onnx

    onnx.checker.check_model(model, full_check=form != "plugin")
    onnx.save(model, str(path))
    return path.stat().st_size


def _verify(reference_path: Path, variant_path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None) -> dict:
    """Run the variant and the fp32 graph on the same feeds in ONNX Runtime: per output max abs and cosine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    reference = ort.InferenceSession(str(reference_path), options, providers=["CPUExecutionProvider"])
    variant = ort.InferenceSession(str(variant_path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in reference.get_outputs()]
    max_abs = dict.fromkeys(names, 0.0)
    cosine = dict.fromkeys(names, 1.0)
    for feed in feeds:
        for name, expected, actual in zip(names, reference.run(names, feed), variant.run(names, feed), strict=True):
            if actual.dtype != np.float32 or actual.shape != expected.shape:
                raise DpaError(f"{variant_path}: output {name} is {actual.dtype} {actual.shape}, the fp32 graph's "
                               f"{expected.dtype} {expected.shape}")
            expected, actual = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            max_abs[name] = max(max_abs[name], float(np.abs(actual - expected).max()))
            norms = np.linalg.norm(actual) * np.linalg.norm(expected)
            cosine[name] = min(cosine[name], float(actual @ expected / norms) if norms > 0 else 1.0)
    return {"feeds": len(feeds), "max_abs": max_abs, "cosine": cosine}


def write_variant(
    export_dir: str | Path, out_dir: str | Path, precision: str, feeds: FeedSet, method: str = "entropy",
    exclude: Iterable[str] = (), threads: int | None = None, verify_feeds: int = 4,
    split_ratio: float | None = SPLIT_RANGE_RATIO,
) -> Path:
    """Write the fp16 or int8 variant of the fp32 export `export_dir` as a complete export folder
    `out_dir/<precision>` (every exported form of every graph, manifest.json) and return it.

    feeds: recorded on real frames (`record_feeds`); int8 calibrates every graph on its own feeds, and both
    variants are verified against the fp32 graphs on `verify_feeds` of them (ONNX Runtime, CPU). exclude:
    int8 only, node-name patterns (fnmatch) left float besides the prototype-attention nodes. split_ratio: int8
    only, see `quantize_int8`.
    """
    from dpa.manifest import Manifest

    if precision not in VARIANT_PRECISIONS:
        raise DpaError(f"unknown variant precision {precision!r}; choose from {', '.join(VARIANT_PRECISIONS)}")
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    if manifest.precision != "fp32":
        raise DpaError(f"{export_dir} holds the {manifest.precision} variant; make variants from the fp32 export")
    if "functions" not in manifest.forms:
        raise DpaError(f"{export_dir} lacks the functions form (exported: {', '.join(manifest.forms)}); the "
                       "variants are made from it: re-export with --form functions or --form all")
    check_feeds_match(feeds, manifest)
    target = Path(out_dir) / precision
    if target.resolve() == export_dir.resolve():
        raise DpaError(f"{target} is the fp32 export itself; choose another --out")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create {target}: {error}") from error
    import onnx

    graphs = {}
    details: dict = {"excluded_nodes": {}, "quantized_nodes": {}, "float32_nodes": {}, "activation_amax": {},
                     "split_convs": {}, "split_ratio": split_ratio}
    started = time.perf_counter()
    for graph, spec in manifest.graphs.items():
        source = manifest.graph_file(export_dir, graph, "functions")
        if precision == "fp16":
            converted = convert_to_float16(onnx.load(str(source)))
            details["float32_nodes"][graph] = _count_types(float32_nodes(converted))
        else:
            patterns = list(exclude)
            names = [node.name for node in onnx.load(str(source)).graph.node]
            chosen = sorted({name for name in names for pattern in patterns if fnmatch.fnmatchcase(name, pattern)})
            converted, ranges, split = quantize_int8(source, feeds.feeds(graph), method, chosen, threads=threads,
                                                     split_ratio=split_ratio)
            details["activation_amax"][graph] = ranges
            details["split_convs"][graph] = split
            require_tensorrt_qdq(converted, f"{precision} {graph}")
            details["excluded_nodes"][graph] = sorted(set(prototype_nodes(converted)) | set(chosen))
            details["quantized_nodes"][graph] = _count_types(
                node for node in converted.graph.node
                if node.op_type in QUANTIZED_OP_TYPES
                and any(_is_dequantized(converted, name) for name in node.input[:2]))
        sizes = {}
        for form in manifest.forms:
            file = spec.files[form]
            if file not in sizes:
                sizes[file] = _save(_forms_of(converted, form), target / file, form)
        sample = list(feeds.feeds(graph, limit=verify_feeds))
        checked_form = "functions"
        verification = _verify(source, target / spec.files[checked_form], sample, threads)
        if "portable" in manifest.forms and spec.files["portable"] != spec.files["functions"]:
            portable = _verify(source, target / spec.files["portable"], sample, threads)
            verification["portable_max_abs"] = portable["max_abs"]
        graphs[graph] = dataclasses.replace(spec, details={
            **spec.details, "bytes": sizes,
            "verification": {"form": checked_form, "against": "fp32 graph", **verification}})
        log.info("%s %s: %s (max abs vs fp32 on %d feeds: %s)", precision, graph,
                 ", ".join(f"{f} {s / 2**20:.2f} MiB" for f, s in sizes.items()), len(sample),
                 ", ".join(f"{k} {v:.2e}" for k, v in verification["max_abs"].items()))
    checkpoint = manifest.checkpoint
    if checkpoint.path and not Path(checkpoint.path).is_absolute():
        checkpoint = dataclasses.replace(checkpoint, path=os.path.relpath(export_dir / checkpoint.path, target))
    variant = manifest.with_changes(
        precision=precision, graphs=graphs, checkpoint=checkpoint,
        record={**manifest.record, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        variant=_describe(precision, export_dir, target, feeds, method, list(exclude), details,
                          time.perf_counter() - started))
    variant.save(target)
    return target


def _is_dequantized(model, name: str) -> bool:
    return any(node.op_type == "DequantizeLinear" and name in node.output for node in model.graph.node)


def _count_types(nodes: Iterable) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        counts[node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}.{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def _describe(precision: str, export_dir: Path, target: Path, feeds: FeedSet, method: str, exclude: list[str],
              details: dict, seconds: float) -> dict:
    common = {
        "of": os.path.relpath(export_dir, target),
        "source_precision": "fp32",
        "made_from_form": "functions",
        "forms": "plugin = functions form without the function bodies; portable = function bodies inlined",
        "io": "float32 (graph inputs and outputs unchanged)",
        "feeds": {graph: feeds.count(graph) for graph in feeds.graphs},
        "calibration_clips": [{"name": clip["name"], "source": clip["source"], "frames": clip["frames"]}
                              for clip in feeds.clips],
        "flow": feeds.flow,
        "seconds": round(seconds, 2),
    }
    if precision == "fp16":
        return {**common, "float16": "every standard-op node except float32_op_types; initializers stored as float16",
                "float32_op_types": sorted(FLOAT32_OP_TYPES), "float32_domains": [CUSTOM_DOMAIN],
                "float32_nodes": details["float32_nodes"]}
    return {
        **common,
        "method": method,
        "percentile": PERCENTILE if method == "percentile" else None,
        "histogram_bins": HISTOGRAM_BINS if method != "max" else None,
        "activations": "int8, symmetric per tensor, zero point 0 (calibrated)",
        "weights": "int8, symmetric per output channel (axis 0), zero point 0, values in [-127, 127]",
        "biases": "float32",
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "placement": "Q/DQ on the inputs of weighted layers only (TensorRT's rules); outputs of weighted layers "
                     "and graph outputs unquantized",
        "excluded_op_types": [f"{CUSTOM_DOMAIN}.*"],
        "exclude_patterns": exclude,
        "excluded_nodes": details["excluded_nodes"],
        "split_convs": details["split_convs"],
        "split_rule": (f"a Conv over a Concat whose parts' largest |x| differ more than {details['split_ratio']:g}x "
                       "is computed as one Conv per part plus Adds (exact in float), so each part gets its own "
                       "scale" if details["split_ratio"] is not None else "none"),
        "quantized_nodes": details["quantized_nodes"],
        "activation_amax": details["activation_amax"],
        "quantizer": f"onnxruntime.quantization.quantize_static (QDQ, ranges overridden) {_onnxruntime_version()}",
    }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
