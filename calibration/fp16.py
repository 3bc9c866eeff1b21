"""The fp16 variant of a stage graph: float16 arithmetic with float32 where it must stay, Casts at every boundary
and float32 graph inputs and outputs (SPEC §4.4). Torch-free.

Float tensors become float16 except where the arithmetic must stay float32 — softmax, reductions, normalisations,
exp/log/pow/sqrt/div (`FLOAT32_OP_TYPES`) and every custom prototype-attention node (domain `trt.plugins`; their
function bodies stay as exported, float32). Graph inputs and outputs stay float32, so the runtime's memory bank and
chaining do not change.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np

from dpa.errors import DpaError, require_module

log = logging.getLogger(__name__)

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
FLOAT16_MAX = 65504.0


def convert_to_float16(model, keep_op_types: Iterable[str] = FLOAT32_OP_TYPES):
    """An fp16 copy of an ONNX model (onnx.ModelProto) with float32 I/O.

    Every node of the default domain whose type is not in `keep_op_types` computes in float16: its float inputs
    are cast to float16 (initializers converted in place when no float32 node uses them) and its float outputs
    are float16. Nodes of other domains (the custom prototype-attention nodes) and `keep_op_types` keep float32,
    with Casts inserted where their inputs come from float16 nodes. Graph inputs and outputs keep float32.
    Model-local functions are not changed (they run in float32 behind the Casts).
    """
    onnx = require_module("onnx", "onnx", "writing the fp16 variant")

    keep = frozenset(keep_op_types)
    model = copy.deepcopy(model)
    graph = model.graph
    _require_flat_graph(graph)
    types = _inferred_types(model)
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    conversion = _Float16Conversion(graph, types, keep)
    conversion.store_float16_initializers()
    conversion.convert_nodes()
    conversion.restore_float32_outputs()
    del graph.node[:]
    graph.node.extend(conversion.nodes)
    del graph.value_info[:]
    result = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    casts = len(conversion.casts) + len(conversion.renames)
    log.debug("fp16: %d of %d nodes in float16, %d casts", conversion.converted, len(conversion.nodes) - casts, casts)
    return result


def _require_flat_graph(graph) -> None:
    """DpaError when a node of `graph` holds a subgraph (If, Loop, Scan): the conversion handles flat graphs."""
    import onnx

    for node in graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attribute in node.attribute):
            raise DpaError(f"node {node.name or node.op_type} has a subgraph ({node.op_type}); the fp16 conversion "
                           "handles flat graphs only")


def _inferred_types(model) -> dict[str, int]:
    """Tensor name -> element type (TensorProto) of the graph inputs, outputs and values, by shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {info.name: info.type.tensor_type.elem_type
            for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)}


class _Float16Conversion:
    """One graph's fp16 conversion in progress: every tensor's element type and precision so far, the new node
    list with its Casts, and the graph outputs renamed behind a float32 Cast."""

    def __init__(self, graph, types: dict[str, int], keep: frozenset[str]):
        self.graph = graph
        self.types = types  # tensor name -> element type of the fp32 graph; the Casts' outputs are added
        self.keep = keep
        self.precision: dict[str, int] = {}  # tensor name -> element type in the converted graph
        self.nodes: list = []
        self.casts: dict[tuple[str, int], str] = {}  # (tensor, element type) -> the Cast's output
        self.renames: dict[str, str] = {}  # graph output -> the float16 tensor its Cast reads
        self.converted = 0  # nodes computing in float16

    def half(self, node) -> bool:
        """Whether `node` computes in float16."""
        return (node.domain in ("", "ai.onnx") and node.op_type not in self.keep
                and node.op_type not in _TYPE_SETTING_OPS)

    def data_inputs(self, node) -> Iterator[tuple[int, str]]:
        """(index, name) of the float inputs whose type follows the node's precision."""
        from onnx import TensorProto

        if node.op_type in _TYPE_SETTING_OPS:
            return
        parameters = _FLOAT32_PARAMETER_INPUTS.get(node.op_type, set()) if self.half(node) else set()
        for index, name in enumerate(node.input):
            if name and self.types.get(name) == TensorProto.FLOAT and index not in parameters:
                yield index, name

    def store_float16_initializers(self) -> None:
        """Initializers read only as float16 data are stored as float16; graph inputs and the other initializers
        keep their type."""
        from onnx import TensorProto, numpy_helper

        uses = defaultdict(set)
        for node in self.graph.node:
            for _, name in self.data_inputs(node):
                uses[name].add(self.half(node))
        initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        for name, tensor in initializers.items():
            if tensor.data_type == TensorProto.FLOAT and uses.get(name) == {True}:
                values = numpy_helper.to_array(tensor)
                if np.abs(values).max(initial=0.0) > FLOAT16_MAX:
                    raise DpaError(f"initializer {name} has values beyond float16's range (max |x| "
                                   f"{np.abs(values).max():.3g}); it cannot be stored as float16")
                tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
                self.precision[name] = TensorProto.FLOAT16
        for item in (*self.graph.input, *self.graph.initializer):
            self.precision.setdefault(item.name, self.types.get(item.name, TensorProto.UNDEFINED))

    def cast(self, name: str, to: int) -> str:
        """The name of `name` cast to element type `to`; the Cast is appended to the node list once."""
        from onnx import TensorProto, helper

        key = (name, to)
        if key not in self.casts:
            suffix = "float16" if to == TensorProto.FLOAT16 else "float32"
            self.casts[key] = _unique_name(f"{name}_to_{suffix}", self.types)
            self.types[self.casts[key]] = to
            self.nodes.append(helper.make_node("Cast", [name], [self.casts[key]], name=f"{self.casts[key]}_cast",
                                               to=to))
        return self.casts[key]

    def convert_nodes(self) -> None:
        """Every node in graph order, its data inputs cast to its precision where they differ."""
        from onnx import TensorProto

        for node in self.graph.node:
            target = TensorProto.FLOAT16 if self.half(node) else TensorProto.FLOAT
            for index, name in list(self.data_inputs(node)):
                if self.precision.get(name, TensorProto.FLOAT) != target:
                    node.input[index] = self.cast(name, target)
            for name in node.output:
                original = self.types.get(name, TensorProto.UNDEFINED)
                self.precision[name] = (TensorProto.FLOAT16 if self.half(node) and original == TensorProto.FLOAT
                                        else original)
            self.converted += self.half(node)
            self.nodes.append(node)

    def restore_float32_outputs(self) -> None:
        """Graph outputs keep float32: the float16 producer writes "<output>_float16", a Cast restores the name."""
        from onnx import TensorProto, helper

        for output in self.graph.output:
            if self.precision.get(output.name) == TensorProto.FLOAT16:
                self.renames[output.name] = _unique_name(f"{output.name}_float16", self.types)
        for node in self.nodes:
            for index, name in enumerate(node.input):
                node.input[index] = self.renames.get(name, name)
            for index, name in enumerate(node.output):
                node.output[index] = self.renames.get(name, name)
        for name, internal in self.renames.items():
            self.nodes.append(helper.make_node("Cast", [internal], [name], name=f"{name}_to_float32_cast",
                                               to=TensorProto.FLOAT))


def _unique_name(base: str, taken: dict) -> str:
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    return name


def float32_nodes(model) -> list:
    """The nodes of an fp16 variant that compute in float32: every node (other than Cast) whose float outputs
    are float32. For tests and reports."""
    require_module("onnx", "onnx", "inspecting a graph")
    from onnx import TensorProto

    types = _inferred_types(model)
    return [node for node in model.graph.node
            if node.op_type != "Cast" and any(types.get(name) == TensorProto.FLOAT for name in node.output)]
