"""The ONNX function bodies of the custom ops, executed by ONNX Runtime, equal the NumPy reference (the contract)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dpa.export import functions, reference
from dpa.export.reference import OP_SPECS, PLUGIN_DOMAIN

TOLERANCE = 1e-5  # float32 execution vs the float64 reference, relative to the largest reference magnitude
B, C, HW, N = 2, 16, 49, 3


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def inputs(seed: int, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Random float32 inputs for every op input name; empty memory slots hold NaN and Inf garbage."""
    rng = np.random.default_rng(seed)
    feed = {
        name: rng.standard_normal((B, C, HW)).astype(np.float32) * 3
        for name in ("features", "key_appearance", "key_motion", "value_appearance", "value_motion")
    }
    feed["features"][:, ::5] = 0.0  # all-zero channels: the L2 floor epsilon, not a NaN
    for name in ("memory_keys", "memory_values"):
        feed[name] = rng.standard_normal((B, N, C, C)).astype(np.float32)
    feed["valid"] = np.array([[1, 0, 1], [0, 1, 0]], np.float32) if valid is None else valid
    for name in ("memory_keys", "memory_values"):
        feed[name][feed["valid"] == 0] = np.nan
        feed[name][:, :, 0, 0] = np.where(feed["valid"] == 0, np.inf, feed[name][:, :, 0, 0])
    return feed


def attributes(op_type: str, feed: dict[str, np.ndarray]) -> dict[str, float]:
    """The node attributes the exporter writes: epsilon and the model's scale."""
    names = {attribute.name for attribute in OP_SPECS[op_type].attributes}
    values = {}
    if "epsilon" in names:
        values["epsilon"] = 1e-6
    if "scale" in names:
        values["scale"] = 1 / math.sqrt(HW) if op_type == "DpaCrossModalAttention" else 1 / math.sqrt(C)
    return values


def model_for(op_type: str, feed: dict[str, np.ndarray], node_attributes: dict[str, float]) -> onnx.ModelProto:
    shapes = {tensor.name: feed[tensor.name].shape for tensor in OP_SPECS[op_type].inputs}
    return functions.single_op_model(op_type, shapes, node_attributes)


def expected_outputs(op_type: str, feed: dict[str, np.ndarray], node_attributes: dict[str, float]) -> list:
    args = [feed[tensor.name] for tensor in OP_SPECS[op_type].inputs]
    result = OP_SPECS[op_type].reference(*args, **node_attributes)
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("op_type", sorted(OP_SPECS))
@pytest.mark.parametrize("form", ["functions", "portable"])
def test_function_body_equals_reference(op_type, form):
    feed = inputs(seed=1)
    node_attributes = attributes(op_type, feed)
    model = model_for(op_type, feed, node_attributes)
    if form == "portable":
        model = functions.inline_functions(model)
        assert not functions.custom_nodes(model.graph) and not model.functions
    names = [tensor.name for tensor in OP_SPECS[op_type].inputs]
    actual = run(model, {name: feed[name] for name in names})
    expected = expected_outputs(op_type, feed, node_attributes)
    for a, e in zip(actual, expected, strict=True):
        assert relative_error(a, e) <= TOLERANCE


@pytest.mark.parametrize("op_type", ["DpaCrossModalAttention", "DpaPrototypeMemoryRead", "DpaPrototypeCorrelation"])
def test_attributes_are_honoured(op_type):
    """Non-default scale and epsilon (large enough that most pixel norms fall below it) reach the body."""
    feed = inputs(seed=2)
    feed["features"] *= 1e-3  # pixel norms ~0.01
    node_attributes = {name: value * 0.37 for name, value in attributes(op_type, feed).items()}
    if "epsilon" in node_attributes:
        node_attributes["epsilon"] = 0.02
    model = model_for(op_type, feed, node_attributes)
    names = [tensor.name for tensor in OP_SPECS[op_type].inputs]
    actual = run(model, {name: feed[name] for name in names})
    for a, e in zip(actual, expected_outputs(op_type, feed, node_attributes), strict=True):
        assert relative_error(a, e) <= TOLERANCE


def test_epsilon_default_applies_when_absent():
    feed = inputs(seed=3)
    model = model_for("DpaPrototypeCorrelation", feed, {})
    (actual,) = run(model, {"features": feed["features"]})
    assert relative_error(actual, reference.prototype_correlation(feed["features"])) <= TOLERANCE


def test_memory_read_ignores_empty_slots_exactly():
    """Garbage (NaN, Inf, huge values) in invalid slots changes nothing, bit for bit; no valid slot reads zeros."""
    feed = inputs(seed=4, valid=np.array([[0, 1, 1], [0, 0, 0]], np.float32))
    names = [tensor.name for tensor in OP_SPECS["DpaPrototypeMemoryRead"].inputs]
    node_attributes = attributes("DpaPrototypeMemoryRead", feed)
    model = model_for("DpaPrototypeMemoryRead", feed, node_attributes)
    (with_garbage,) = run(model, {name: feed[name] for name in names})
    for name in ("memory_keys", "memory_values"):
        feed[name][feed["valid"] == 0] = 0.0
    (with_zeros,) = run(model, {name: feed[name] for name in names})
    assert np.array_equal(with_garbage, with_zeros)
    assert np.all(with_garbage[1] == 0.0)  # the reference's convention: R = 0, hence Psi2 = 0
    alone = {name: feed[name] for name in names}
    alone.update(memory_keys=feed["memory_keys"][:1, 1:], memory_values=feed["memory_values"][:1, 1:],
                 valid=np.ones((1, 2), np.float32), features=feed["features"][:1])
    expected = reference.prototype_memory_read(**alone, scale=node_attributes["scale"])
    assert relative_error(with_garbage[:1], expected) <= TOLERANCE


@pytest.mark.parametrize("op_type", sorted(OP_SPECS))
def test_plugin_form_has_custom_nodes_only(op_type):
    feed = inputs(seed=5)
    model = functions.strip_functions(model_for(op_type, feed, attributes(op_type, feed)))
    onnx.checker.check_model(model, full_check=True)
    assert not model.functions
    assert functions.custom_nodes(model.graph) == {op_type: 1}
    (node,) = model.graph.node
    assert node.domain == PLUGIN_DOMAIN
    written = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert written["plugin_version"] == b"1"
    assert {a.name for a in OP_SPECS[op_type].attributes} <= written.keys()
    assert any(entry.domain == PLUGIN_DOMAIN and entry.version == 1 for entry in model.opset_import)


@pytest.mark.parametrize("op_type", sorted(OP_SPECS))
def test_function_signature_follows_the_spec(op_type):
    function = functions.function_proto(op_type, opset=18)
    spec = OP_SPECS[op_type]
    assert (function.domain, function.name) == (PLUGIN_DOMAIN, op_type)
    assert list(function.input) == [tensor.name for tensor in spec.inputs]
    assert list(function.output) == [tensor.name for tensor in spec.outputs]
    declared = set(function.attribute) | {a.name for a in function.attribute_proto}
    assert declared == {"plugin_version"} | {a.name for a in spec.attributes}
    assert {node.domain for node in function.node} == {""}  # standard ops only
    softmax_ops = [node.op_type for node in function.node if node.op_type in ("ReduceMax", "Exp", "Softmax")]
    assert "Softmax" not in softmax_ops  # explicit max-subtracted softmax
    assert all(node.op_type != "Cast" or node.attribute[0].i == onnx.TensorProto.FLOAT for node in function.node)
