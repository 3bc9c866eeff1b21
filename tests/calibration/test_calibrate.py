"""`dpa calibrate` on the tiny export: refusal without frames, the feeds, and fp16/int8 variants that run and keep
their promises (float32 I/O, float32 sensitive ops, TensorRT Q/DQ)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from dpa.calibration.clips import load_labelled_clip, offline_flows
from dpa.calibration.feeds import load_feeds
from dpa.calibration.fp16 import FLOAT32_OP_TYPES, float32_nodes
from dpa.calibration.int8 import CUSTOM_DOMAIN, QUANTIZED_OP_TYPES, tensorrt_qdq_problems
from dpa.calibration.variants import exclude_pattern_matches
from dpa.cli import main
from dpa.runtime.chain import StageChain
from dpa.runtime.engines import open_engine
from dpa.runtime.segmenter import segment_clip_offline


def load_manifest(directory):
    """The manifest file of an export folder, as JSON data."""
    return json.loads((directory / "manifest.json").read_text())


def test_calibrate_refuses_without_frames(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "needs real frames" in error and "--frames" in error


@pytest.mark.slow
def test_calibrate_refuses_a_missing_clip_folder(tiny_export, tmp_path, capsys):
    assert main(["calibrate", str(tiny_export), "--frames", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_feeds_follow_offline_inference(calibrated):
    feeds = load_feeds(calibrated / "feeds")
    index = json.loads((calibrated / "feeds" / "feeds.json").read_text())
    assert index["clips"] == [{"name": "synthetic-7", "source": index["clips"][0]["source"], "frames": 5,
                               "references": [0, 1, 2, 4]}]
    assert {graph: feeds.count(graph) for graph in feeds.graphs} == {"encoder": 5, "ima": 5, "decoder": 5,
                                                                     "ifa_memory": 5}
    roles = [origin["role"] for origin in feeds.origins["ifa_memory"]]
    assert roles == ["reference"] * 4 + ["frame"]  # references first, then frame 3, the only other one
    manifest = load_manifest(calibrated)
    for graph, spec in manifest["graphs"].items():
        for tensor in spec["inputs"]:
            assert list(feeds.arrays[graph][tensor["name"]].shape) == [5, *tensor["shape"]]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variants_are_export_folders_that_run(calibrated, precision):
    fp32 = load_manifest(calibrated)
    manifest = load_manifest(calibrated / precision)
    assert manifest["precision"] == precision
    variant = manifest["variant"]
    assert variant["feeds"] == {"encoder": 5, "ima": 5, "ifa_memory": 5, "decoder": 5}
    assert variant["calibration_clips"][0]["name"] == "synthetic-7"
    if precision == "int8":
        assert variant["method"] == "entropy"
        assert all(variant["excluded_nodes"][graph] for graph in fp32["graphs"])
        # IMA5's fusion convs see concat(f5 (|x| in the hundreds), attention output (a few units)): split
        assert len(variant["split_convs"]["ima"]) == 2
    for graph, spec in fp32["graphs"].items():
        assert manifest["graphs"][graph]["inputs"] == spec["inputs"]
        assert manifest["graphs"][graph]["outputs"] == spec["outputs"]
        assert (calibrated / precision / spec["file"]).is_file()
    clip = load_labelled_clip("synthetic:11", fp32["size"], synthetic_length=5)
    flows, _ = offline_flows(clip.frames, fp32["size"])
    with open_engine(calibrated, "onnxruntime", precision, device="cpu", threads=2) as engine:
        assert engine.directory == calibrated / precision
        results, _ = segment_clip_offline(StageChain(engine), clip.frames, flows,
                                          keep_values=True)
    for result in results:
        assert result.probability.dtype == np.float32 and np.isfinite(result.probability).all()
        assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
        assert all(value.dtype == np.float32 for value in result.values.values())


@pytest.mark.slow
def test_int8_graphs_are_tensorrt_qdq(calibrated):
    manifest = load_manifest(calibrated / "int8")
    for spec in manifest["graphs"].values():
        model = onnx.load(str(calibrated / "int8" / spec["file"]))
        assert tensorrt_qdq_problems(model) == []
        nodes = model.graph.node
        producer = {name: node for node in nodes for name in node.output}
        initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
        quantize = [node for node in nodes if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert quantize and all(not np.any(initializers[node.input[2]]) for node in quantize)
        for node in nodes:
            if node.op_type == "DequantizeLinear":
                consumers = [c for c in nodes if node.output[0] in c.input]
                assert consumers and all(c.op_type in QUANTIZED_OP_TYPES for c in consumers)
            if node.op_type == "Conv":
                activation, weight = producer[node.input[0]], producer[node.input[1]]
                assert activation.op_type == weight.op_type == "DequantizeLinear"
                axis = {a.name: a.i for a in weight.attribute}["axis"]
                scale = initializers[weight.input[1]]
                assert axis == 0 and scale.shape == (initializers[weight.input[0]].shape[0],)
            if node.domain == CUSTOM_DOMAIN:
                assert all(producer.get(name) is None or producer[name].op_type != "DequantizeLinear"
                           for name in node.input)
        original = onnx.load(str(calibrated / spec["file"]))
        assert [f.name for f in model.functions] == [f.name for f in original.functions]


@pytest.mark.slow
def test_fp16_graphs_keep_softmax_reductions_and_prototype_ops_float32(calibrated):
    manifest = load_manifest(calibrated / "fp16")
    for graph, spec in manifest["graphs"].items():
        model = onnx.load(str(calibrated / "fp16" / spec["file"]))
        original = onnx.load(str(calibrated / spec["file"]))
        kept = float32_nodes(model)
        custom = [node for node in model.graph.node if node.domain == CUSTOM_DOMAIN]
        assert custom and all(node in kept for node in custom)
        assert all(node.op_type in FLOAT32_OP_TYPES or node.domain == CUSTOM_DOMAIN for node in kept)
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {info.name: info.type.tensor_type.elem_type for info in inferred.graph.value_info}
        convs = [node for node in model.graph.node if node.op_type == "Conv"]
        assert convs and all(types[node.output[0]] == TensorProto.FLOAT16 for node in convs)
        assert all(io.type.tensor_type.elem_type == TensorProto.FLOAT
                   for io in (*model.graph.input, *model.graph.output))
        assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in original.functions]
        if graph == "decoder":
            assert sum(node.op_type == "ReduceMean" for node in kept) == 2  # ASPP image pooling, both streams


@pytest.mark.slow
def test_calibrate_does_not_import_torch(tiny_export, tmp_path):
    code = (
        "import sys\n"
        "from dpa.cli import main\n"
        f"code = main(['calibrate', {str(tiny_export)!r}, '--frames', 'synthetic:3', '--synthetic-length', '3', "
        f"'--precisions', 'fp16', '--out', {str(tmp_path)!r}, '--threads', '1'])\n"
        "assert code == 0, code\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "fp16" / "manifest.json").is_file() and not (tmp_path / "int8").exists()


@pytest.mark.parametrize(("pattern", "graph", "node", "matches"), [
    ("node_conv2d_2?", "encoder", "node_conv2d_22", True),
    ("node_conv2d_2?", "decoder", "node_conv2d_22", True),  # a plain pattern reaches every graph
    ("encoder:node_conv2d_2?", "encoder", "node_conv2d_22", True),
    ("encoder:node_conv2d_2?", "decoder", "node_conv2d_22", False),
    ("encoder:node_conv2d_2?", "encoder", "node_conv2d_2", False),
    ("i*:*", "ima", "node_Conv_86", True),
    ("i*:*", "encoder", "node_Conv_86", False),
])
def test_exclude_patterns_name_nodes_of_every_graph_or_one(pattern, graph, node, matches):
    assert exclude_pattern_matches(pattern, graph, node) is matches


@pytest.mark.slow
def test_graph_qualified_exclude_leaves_only_that_graph_float(tiny_export, tmp_path):
    assert main(["calibrate", str(tiny_export), "--frames", "synthetic:3", "--synthetic-length", "3",
                 "--precisions", "int8", "--out", str(tmp_path), "--threads", "1", "--exclude", "decoder:*"]) == 0
    variant = load_manifest(tmp_path / "int8")["variant"]
    decoder = onnx.load(str(tmp_path / "int8" / "decoder.onnx"))
    assert not [node for node in decoder.graph.node if node.op_type == "QuantizeLinear"]
    assert set(variant["excluded_nodes"]["decoder"]) == {node.name for node in decoder.graph.node}
    assert variant["quantized_nodes"]["decoder"] == {}
    for graph in ("encoder", "ima", "ifa_memory"):
        assert sum(variant["quantized_nodes"][graph].values()) > 0, graph


def test_cli_offers_every_calibration_method():
    from dpa.calibration.ranges import CALIBRATION_METHODS
    from dpa.cli import build_parser
    from dpa.errors import DpaError

    # the CLI's --method choices are a copy (parsing does not load numpy): argparse lists exactly int8's
    with pytest.raises(DpaError) as error:
        build_parser().parse_args(["calibrate", "export", "--method", "nonsense"])
    assert str(error.value).endswith(f"(choose from {', '.join(map(repr, CALIBRATION_METHODS))})")
