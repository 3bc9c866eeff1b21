"""ONNX function bodies of the custom prototype-attention ops: the standard-op decomposition of each op.

Each op of `dpa.export.reference.OP_SPECS` becomes a model-local `FunctionProto` in domain `trt.plugins`
(name = op type = TensorRT plugin name), so a graph whose custom nodes carry these functions runs in ONNX
Runtime unchanged, and TensorRT ≥ 10.7 swaps the node for the plugin when the plugin library is loaded.

The bodies follow the NumPy reference step by step: every softmax subtracts its row maximum, the inputs are
cast to float32 first and the outputs cast back to the input type (`CastLike`), so a float16 graph keeps
float32 accumulation inside the ops. Attributes: `plugin_version` (string, "1"), `epsilon` (float, default
1e-6) and `scale` (float, required by the bodies: the exporter always writes the model's value; the plugins
also accept it absent and derive it from the shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

from dpa.constants import L2_EPSILON
from dpa.export.reference import OP_SPECS, PLUGIN_DOMAIN, PLUGIN_VERSION

FLOAT32_LOWEST = float(np.finfo(np.float32).min)


class _Body:
    """The nodes of one function body. Every helper appends nodes and returns the name of its result."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self._names: set[str] = set()

    def _name(self, hint: str) -> str:
        name, index = hint, 1
        while name in self._names:
            index += 1
            name = f"{hint}_{index}"
        self._names.add(name)
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        result = self._name(output or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [result], **attributes))
        return result

    def constant(self, value, hint: str = "constant", dtype=np.float32) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.op("Constant", output=hint, value=tensor)

    def axes(self, *axes: int) -> str:
        return self.constant(list(axes), hint="axes", dtype=np.int64)

    def attribute(self, name: str) -> str:
        """A float scalar tensor holding the function attribute `name` (a Constant with a reference)."""
        result = self._name(name)
        node = helper.make_node("Constant", [], [result])
        node.attribute.append(AttributeProto(name="value_float", ref_attr_name=name, type=AttributeProto.FLOAT))
        self.nodes.append(node)
        return result

    def float32(self, name: str) -> str:
        return self.op("Cast", name, output=f"{name}_fp32", to=TensorProto.FLOAT)

    def softmax(self, logits: str, axes: Sequence[int]) -> str:
        """Max-subtracted softmax over `axes` (jointly)."""
        reduce_axes = self.axes(*axes)
        maximum = self.op("ReduceMax", logits, reduce_axes, output="row_max", keepdims=1)
        exponential = self.op("Exp", self.op("Sub", logits, maximum), output="exp")
        total = self.op("ReduceSum", exponential, reduce_axes, output="row_sum", keepdims=1)
        return self.op("Div", exponential, total, output="softmax")

    def l2_normalize(self, x: str, axis: int, epsilon: str) -> str:
        """x / max(||x||_2, epsilon) along `axis`."""
        norm = self.op("ReduceL2", x, self.axes(axis), output="norm", keepdims=1)
        return self.op("Div", x, self.op("Max", norm, epsilon), output="normalized")

    def prototypes(self, features: str) -> str:
        """features (B, C, HW) float32 -> prototype tokens (B, C, C) = softmax_HW(X) X^T."""
        regions = self.softmax(features, axes=(2,))
        return self.op("MatMul", regions, self.op("Transpose", features, perm=(0, 2, 1)), output="tokens")

    def correlation(self, tokens: str, features: str, epsilon: str) -> str:
        """tokens (B, P, C), features (B, C, HW) -> cosine (B, P, HW)."""
        return self.op(
            "MatMul", self.l2_normalize(tokens, 2, epsilon), self.l2_normalize(features, 1, epsilon),
            output="cosine",
        )


def _prototypes_body(body: _Body) -> list[str]:
    features = body.float32("features")
    return [body.op("CastLike", body.prototypes(features), "features", output="prototypes")]


def _prototype_correlation_body(body: _Body) -> list[str]:
    features = body.float32("features")
    correlation = body.correlation(body.prototypes(features), features, body.attribute("epsilon"))
    return [body.op("CastLike", correlation, "features", output="correlation")]


def _cross_modal_attention_body(body: _Body) -> list[str]:
    key_appearance, key_motion, value_appearance, value_motion = (
        body.float32(name) for name in ("key_appearance", "key_motion", "value_appearance", "value_motion")
    )
    transposed_key_motion = body.op("Transpose", key_motion, perm=(0, 2, 1))
    affinity = body.op(
        "Mul", body.op("MatMul", key_appearance, transposed_key_motion), body.attribute("scale"), output="affinity"
    )  # Phi (B, D, D)
    to_appearance = body.op("MatMul", body.softmax(affinity, axes=(2,)), value_motion)
    transposed = body.op("Transpose", affinity, perm=(0, 2, 1))
    to_motion = body.op("MatMul", body.softmax(transposed, axes=(2,)), value_appearance)
    return [
        body.op("CastLike", to_appearance, "key_appearance", output="to_appearance"),
        body.op("CastLike", to_motion, "key_appearance", output="to_motion"),
    ]


def _prototype_memory_read_body(body: _Body) -> list[str]:
    """Per-slot logits (B, N, Q, T), one softmax over the slot and token axes jointly.

    Invalid slots: their keys and values are replaced by zeros before any product (garbage such as NaN
    cannot leak), their logits by -inf, so their weights are exactly 0. The row maximum is clamped to the
    lowest float32 so that a row without any valid slot gives exp(-inf) = 0, and the row sum (>= 1 whenever a
    slot is valid: the maximum contributes exp(0) = 1) is clamped to 1, so such a row reads R = 0.
    """
    features = body.float32("features")
    zero = body.constant(0.0, "zero")
    valid = body.op(
        "Unsqueeze", body.op("Not", body.op("Equal", body.float32("valid"), zero)), body.axes(2, 3),
        output="slot_valid",
    )  # (B, N, 1, 1) bool
    keys = body.op("Where", valid, body.float32("memory_keys"), zero, output="keys")  # (B, N, T, D)
    values = body.op("Where", valid, body.float32("memory_values"), zero, output="values")
    query = body.op("Unsqueeze", body.prototypes(features), body.axes(1), output="query")  # (B, 1, Q, D)
    logits = body.op(
        "Mul", body.op("MatMul", query, body.op("Transpose", keys, perm=(0, 1, 3, 2))), body.attribute("scale"),
        output="logits",
    )  # (B, N, Q, T)
    logits = body.op("Where", valid, logits, body.constant(-np.inf, "minus_infinity"), output="masked_logits")
    slot_and_token = body.axes(1, 3)
    maximum = body.op(
        "Max", body.op("ReduceMax", logits, slot_and_token, keepdims=1), body.constant(FLOAT32_LOWEST, "lowest"),
        output="row_max",
    )
    exponential = body.op("Exp", body.op("Sub", logits, maximum), output="exp")
    total = body.op(
        "Max", body.op("ReduceSum", exponential, slot_and_token, keepdims=1), body.constant(1.0, "one"),
        output="row_sum",
    )
    weights = body.op("Div", exponential, total, output="weights")  # (B, N, Q, T)
    read = body.op(
        "ReduceSum", body.op("MatMul", weights, values), body.axes(1), output="read", keepdims=0
    )  # R (B, Q, D)
    correlation = body.correlation(read, features, body.attribute("epsilon"))
    return [body.op("CastLike", correlation, "features", output="correlation")]


_BODIES: dict[str, Callable[[_Body], list[str]]] = {
    "DpaPrototypes": _prototypes_body,
    "DpaPrototypeCorrelation": _prototype_correlation_body,
    "DpaCrossModalAttention": _cross_modal_attention_body,
    "DpaPrototypeMemoryRead": _prototype_memory_read_body,
}


def function_proto(op_type: str, opset: int) -> FunctionProto:
    """The local function of custom op `op_type` (a key of OP_SPECS), its body in ai.onnx opset `opset`."""
    spec = OP_SPECS[op_type]
    body = _Body()
    for tensor in spec.inputs:
        body._names.add(tensor.name)
    results = _BODIES[op_type](body)
    outputs = [tensor.name for tensor in spec.outputs]
    if results != outputs:
        raise AssertionError(f"{op_type}: body returns {results}, the spec names {outputs}")
    defaults = [helper.make_attribute("plugin_version", PLUGIN_VERSION)]
    required = []
    for attribute in spec.attributes:
        if attribute.name == "epsilon":
            defaults.append(helper.make_attribute("epsilon", float(attribute.default or L2_EPSILON)))
        else:
            required.append(attribute.name)
    function = helper.make_function(
        PLUGIN_DOMAIN,
        op_type,
        inputs=[tensor.name for tensor in spec.inputs],
        outputs=outputs,
        nodes=body.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=required,
        attribute_protos=defaults,
        doc_string=f"{spec.description}. Standard-op decomposition of the TensorRT plugin {op_type} "
        f"(version {PLUGIN_VERSION}); see export/reference.py.",
    )
    return function


def custom_nodes(graph: onnx.GraphProto) -> dict[str, int]:
    """Op type -> count of the `trt.plugins` nodes of a graph (its top level; function bodies not counted)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain == PLUGIN_DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add (or replace) the local function of every custom op type the graph uses; declare the domain.

    The function bodies use the model's ai.onnx opset. Returns the model (modified in place).
    """
    opset = model_opset(model)
    used = custom_nodes(model.graph)
    unknown = sorted(set(used) - set(OP_SPECS))
    if unknown:
        raise ValueError(f"custom nodes without a definition in OP_SPECS: {unknown}")
    kept = [f for f in model.functions if not (f.domain == PLUGIN_DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(kept + [function_proto(op_type, opset) for op_type in used])
    declare_plugin_domain(model)
    return model


def declare_plugin_domain(model: onnx.ModelProto) -> None:
    """Make sure the model imports domain `trt.plugins` (version 1) when it has custom nodes."""
    if custom_nodes(model.graph) and not any(entry.domain == PLUGIN_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("model imports no ai.onnx opset")


def strip_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `plugin` form: the same custom nodes without their local functions (a copy).

    TensorRT < 10.7 imports a local function's body instead of a registered plugin; without the function
    it looks the node up in the plugin registry. ONNX Runtime cannot run this form.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    kept = [f for f in stripped.functions if f.domain != PLUGIN_DOMAIN]
    del stripped.functions[:]
    stripped.functions.extend(kept)
    return stripped


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `portable` form: every local function inlined into standard ops (a copy, no custom nodes)."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    used = {node.domain for node in inlined.graph.node}
    kept = [entry for entry in inlined.opset_import if entry.domain != PLUGIN_DOMAIN or PLUGIN_DOMAIN in used]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined


def single_op_model(
    op_type: str, input_shapes: dict[str, Sequence[int]], attributes: dict[str, float] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """A one-node float32 model of custom op `op_type` with static shapes (tests, plugin experiments).

    input_shapes: input name -> shape, for every input of the op; attributes: node attributes besides
    `plugin_version` (the bodies need `scale` where the op has one). The output shapes come from shape
    inference through the function; `strip_functions` of the result is the plugin form.
    """
    spec = OP_SPECS[op_type]
    names = [tensor.name for tensor in spec.inputs]
    outputs = [tensor.name for tensor in spec.outputs]
    node = helper.make_node(
        op_type, names, outputs, domain=PLUGIN_DOMAIN, plugin_version=PLUGIN_VERSION, **(attributes or {})
    )
    graph = helper.make_graph(
        [node],
        op_type,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(input_shapes[name])) for name in names],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    )
    return onnx.shape_inference.infer_shapes(attach_functions(model), strict_mode=True)
