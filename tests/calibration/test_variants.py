"""fp16 conversion, int8 Q/DQ placement and checks, activation ranges: on hand-made graphs with known answers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dpa.calibration.fp16 import convert_to_float16, float32_nodes
from dpa.calibration.int8 import (
    place_qdq_for_tensorrt,
    quantized_activations,
    split_concat_conv,
    tensorrt_qdq_problems,
)
from dpa.calibration.ranges import entropy_amax, mse_amax, percentile_amax


def _model(nodes, inputs, outputs, initializers, opset=18):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _conv_softmax_model():
    """x (1, 2, 4, 4) -> Conv 3x3 (4 channels) -> Relu -> Softmax(axis 1) -> ReduceMean(axis 1) -> Conv 1x1 -> y."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    head = numpy_helper.from_array(rng.standard_normal((1, 1, 1, 1)).astype(np.float32), "head")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "weight", "bias"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Softmax", ["relu"], ["soft"], name="softmax", axis=1),
        helper.make_node("ReduceMean", ["soft", "axes"], ["mean"], name="mean", keepdims=1),
        helper.make_node("Conv", ["mean", "head"], ["y"], name="head"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])]
    return _model(nodes, inputs, outputs, [weight, bias, head, axes])


def test_fp16_keeps_softmax_and_reductions_float32_with_float32_io():
    model = _conv_softmax_model()
    converted = convert_to_float16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    kept = {node.name for node in float32_nodes(converted)}
    assert kept == {"softmax", "mean"}
    initializers = {t.name: t.data_type for t in converted.graph.initializer}
    assert initializers["weight"] == initializers["bias"] == initializers["head"] == TensorProto.FLOAT16
    casts = [node for node in converted.graph.node if node.op_type == "Cast"]
    # x -> fp16; relu -> fp32 (softmax); mean -> fp16 (head conv); y_float16 -> y fp32
    assert sorted(helper.get_attribute_value(c.attribute[0]) for c in casts) == [1, 1, 10, 10]
    x = np.random.default_rng(4).standard_normal((1, 2, 4, 4)).astype(np.float32)
    expected, actual = _run(model, {"x": x})[0], _run(converted, {"x": x})[0]
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=5e-3, atol=5e-3)


def _qdq_model(zero_point=0, weight_scale_shape=(4,), axis=0, with_zero_point=True):
    """x -> Q -> DQ -> Conv(DQ(int8 weight)) -> y, and x -> Concat branch reading the DQ output."""
    weight = numpy_helper.from_array(np.arange(-36, 36, dtype=np.int8).reshape(4, 2, 3, 3), "weight_q")
    tensors = [
        weight,
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "x_zero"),
        numpy_helper.from_array(np.full(weight_scale_shape, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(weight_scale_shape, np.int8), "w_zero"),
    ]
    zero = ["x_zero"] if with_zero_point else []
    weight_attributes = {"axis": axis} if axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", *zero], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", *zero], ["x_dq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["weight_q", "w_scale", "w_zero"], ["weight"], name="w_dq",
                         **weight_attributes),
        helper.make_node("Conv", ["x_dq", "weight"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["x_dq", "conv"], ["y"], name="concat", axis=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])]
    graph = helper.make_graph(nodes, "qdq", inputs, outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_qdq_checker_accepts_symmetric_per_channel():
    assert tensorrt_qdq_problems(_qdq_model()) == []


@pytest.mark.parametrize("broken, message", [
    ({"zero_point": 3}, "is not 0"),
    ({"weight_scale_shape": ()}, "not quantized per channel"),
    ({"axis": None}, "not quantized per channel"),
    ({"with_zero_point": False}, "no zero point"),
])
def test_qdq_checker_rejects_what_tensorrt_cannot_take(broken, message):
    problems = tensorrt_qdq_problems(_qdq_model(**broken))
    assert problems and any(message in problem for problem in problems), problems


def test_qdq_checker_rejects_minus_128_weights():
    model = _qdq_model()
    weight = next(t for t in model.graph.initializer if t.name == "weight_q")
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = -128
    weight.CopyFrom(numpy_helper.from_array(values, "weight_q"))
    assert any("-128" in problem for problem in tensorrt_qdq_problems(model))


def test_placement_keeps_qdq_only_on_weighted_layer_inputs():
    model = _qdq_model()
    place_qdq_for_tensorrt(model)
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert concat.input[0] == "x"  # the float tensor, not the dequantized one
    assert conv.input[0] == "x_dq"
    assert tensorrt_qdq_problems(model) == []
    assert quantized_activations(model) == ["x_dq"]


def test_placement_restores_graph_outputs():
    """ONNX Runtime's QDQ quantizer makes a DQ write a graph output; placement gives the output back to its producer."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    weight = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r_QuantizeInput"], name="relu"),
        helper.make_node("QuantizeLinear", ["r_QuantizeInput", "s", "z"], ["r_q"], name="q"),
        helper.make_node("DequantizeLinear", ["r_q", "s", "z"], ["r"], name="dq"),
        helper.make_node("Conv", ["r", "w"], ["c"], name="conv"),
    ]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, 2]) for n in ("x", "r", "c")]
    model = _model(nodes, info[:1], info[1:], [scale, zero, weight])
    place_qdq_for_tensorrt(model)
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert relu.output[0] == "r"
    assert conv.input[0] == "r_DequantizeLinear_Output"
    x = np.array([[[[0.04, -1.0], [0.26, 3.0]]]], np.float32)
    r, c = _run(model, {"x": x})
    np.testing.assert_array_equal(r, np.maximum(x, 0))  # exact: the graph output is not quantized
    np.testing.assert_allclose(c, np.round(np.maximum(x, 0) / 0.1) * 0.1, atol=1e-6)


def test_entropy_keeps_the_range_of_a_uniform_distribution():
    edges = np.linspace(0, 1, 2049)
    assert entropy_amax(np.full(2048, 100), edges) == pytest.approx(1.0)


def test_entropy_clips_rare_outliers():
    """A half-normal with sigma 1 plus a handful of values near 50: the threshold stays within a few sigma."""
    values = np.abs(np.random.default_rng(0).standard_normal(200_000))
    values = np.concatenate([values, [48.0, 49.0, 50.0]])
    histogram, edges = np.histogram(values, bins=2048, range=(0, values.max()))
    amax = entropy_amax(histogram, edges)
    assert 2.5 < amax < 8.0


def test_mse_keeps_the_range_of_a_uniform_distribution():
    edges = np.linspace(0, 1, 2049)
    assert mse_amax(np.full(2048, 100), edges) == pytest.approx(1.0, abs=0.01)  # clipping the last bins pays a bit


def test_mse_clips_a_laplace_distribution_where_theory_says():
    """|x| of a Laplace(0, 1): the squared-error-optimal 8-bit clipping is 9.9 b (Banner et al., ACIQ, 2019:
    rounding noise a^2 / (3 * 4^8) against the clipped tail 2 b^2 e^(-a/b)), well below the largest sample (~15)."""
    values = np.abs(np.random.default_rng(0).laplace(0.0, 1.0, 2_000_000))
    histogram, edges = np.histogram(values, bins=2048, range=(0, values.max()))
    assert mse_amax(histogram, edges) == pytest.approx(9.9, abs=0.5)


def test_percentile_of_a_known_histogram():
    edges = np.linspace(0, 10, 11)
    histogram = np.array([10, 10, 10, 10, 10, 10, 10, 10, 10, 10])  # uniform on [0, 10]
    assert percentile_amax(histogram, edges, 50.0) == 5.0
    assert percentile_amax(histogram, edges, 95.0) == 10.0
    assert percentile_amax(histogram, edges, 100.0) == 10.0


def test_split_concat_conv_is_the_same_function():
    """Conv(Concat(a (3 ch), b (2 ch))) == Conv(a, W[:, :3], bias) + Conv(b, W[:, 3:]); the Concat goes when unused."""
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.standard_normal((4, 5, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w", "bias"], ["y"], name="fuse", pads=[1, 1, 1, 1]),
    ]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 5, 5]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 5, 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])]
    model = _model(nodes, inputs, outputs, [weight, bias])
    feed = {"a": 300 * rng.standard_normal((1, 3, 5, 5)).astype(np.float32),
            "b": rng.uniform(-1, 1, (1, 2, 5, 5)).astype(np.float32)}
    expected = _run(model, feed)[0]
    split_concat_conv(model, "fuse")
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == ["Conv", "Conv", "Add"]
    assert {t.name for t in model.graph.initializer} == {"w_part0", "w_part1", "bias"}
    np.testing.assert_allclose(_run(model, feed)[0], expected, rtol=1e-5, atol=1e-3)
