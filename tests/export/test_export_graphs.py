"""Stage-graph export of the tiny network at S = 64, N = 3: files, forms, manifest, and ONNX Runtime parity
(chained over a clip, isolated per graph, and the memory-validity property) against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from dpa.export import check, exporter
from dpa.export.reference import PLUGIN_DOMAIN
from dpa.files import file_sha256
from dpa.manifest import MANIFEST_FORMAT
from dpa.runtime.chain import StageChain
from dpa.runtime.engines import open_engine
from dpa.training import stages
from dpa.training.checkpoint import weights_sha256
from dpa.training.config import get_config

pytestmark = pytest.mark.slow  # one export of four graphs in three forms (~10 s on two busy cores)

SIZE, MEMORY = 64, 3
EXPECTED_CUSTOM_NODES = {
    "encoder": {"DpaCrossModalAttention": 1, "DpaPrototypeCorrelation": 2},  # IMA4
    "ima": {"DpaCrossModalAttention": 1, "DpaPrototypeCorrelation": 2},  # IMA5
    "ifa_memory": {"DpaPrototypes": 4},  # keys and values of two modalities
    "decoder": {"DpaPrototypeMemoryRead": 2},  # one IFA read per modality
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny network (calibrated untrained weights: a trained network's gain) exported in every form."""
    out = tmp_path_factory.mktemp("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: a global setting must not leak into the tests that follow
    try:
        model, weights = exporter.model_for_export(None, "tiny", SIZE, MEMORY, init="calibrated", out=out)
        manifest = exporter.export_stage_graphs(model, out, weights, forms=("functions", "plugin", "portable"))
    finally:
        torch.set_num_threads(threads)
    return out, manifest, model


def test_manifest_describes_the_export(exported):
    out, typed, model = exported
    manifest = typed.to_dict()
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert (manifest["opset"], manifest["precision"], manifest["batch"]) == (18, "fp32", 1)
    assert (manifest["size"], manifest["memory"]) == (SIZE, MEMORY)
    assert manifest["model"]["config"] == model.config.to_dict()
    assert manifest["model"]["weights_sha256"] == weights_sha256(model)
    assert manifest["checkpoint"]["random_init"] and manifest["checkpoint"]["init"] == "calibrated"
    assert manifest["checkpoint"]["sha256"] == file_sha256(out / manifest["checkpoint"]["path"])
    assert list(manifest["graphs"]) == ["encoder", "ima", "ifa_memory", "decoder"]
    for name, graph in manifest["graphs"].items():
        assert graph["custom_nodes"] == {
            "functions": EXPECTED_CUSTOM_NODES[name], "plugin": EXPECTED_CUSTOM_NODES[name], "portable": {}
        }
        assert graph["files"] == {"functions": f"{name}.onnx", "plugin": f"{name}.plugin.onnx",
                                  "portable": f"{name}.portable.onnx"}
        assert graph["export_seconds"] > 0
        assert all(graph["bytes"][file] == (out / file).stat().st_size for file in graph["files"].values())
    decoder = {t["name"]: t for t in manifest["graphs"]["decoder"]["inputs"]}
    dim = model.config.channels(128)
    assert decoder["memory_keys_appearance"]["shape"] == [1, MEMORY, dim, dim]
    assert decoder["memory_valid"] == {"name": "memory_valid", "shape": [1, MEMORY], "dtype": "float32"}
    assert manifest["graphs"]["decoder"]["outputs"] == [
        {"name": "probability", "shape": [1, 1, SIZE, SIZE], "dtype": "float32"}
    ]
    encoder_outputs = {t["name"]: t["shape"] for t in manifest["graphs"]["encoder"]["outputs"]}
    assert encoder_outputs["f1"] == [1, model.config.channels(64), SIZE, SIZE]
    assert encoder_outputs["f5_motion"] == [1, model.config.channels(512), SIZE // 16, SIZE // 16]
    memory = manifest["pipeline"]["memory"]
    assert memory["capacity"] == MEMORY and memory["graph"] == "ifa_memory" and memory["valid"] == "memory_valid"
    assert [step["graph"] for step in manifest["pipeline"]["steps"]] == ["encoder", "ima", "decoder"]
    assert manifest["graphs"]["decoder"]["verification"]["max_abs"]["probability"] <= 1e-4


def test_files_are_valid_static_and_in_their_form(exported):
    out, manifest, _ = exported
    for graph in manifest.graphs.values():
        for form, file in graph.files.items():
            model = onnx.load(out / file)
            onnx.checker.check_model(model, full_check=True)
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
            for value in [*inferred.graph.input, *inferred.graph.output]:
                dims = value.type.tensor_type.shape.dim
                assert dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), value.name
            custom = [node for node in model.graph.node if node.domain == PLUGIN_DOMAIN]
            local = {(f.domain, f.name) for f in model.functions}
            if form == "portable":
                assert not custom and not local
            else:
                assert custom and all(dict(
                    (a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute
                )["plugin_version"] == b"1" for node in custom)
                assert local == ({(PLUGIN_DOMAIN, node.op_type) for node in custom} if form == "functions" else set())


def test_each_graph_matches_pytorch_in_isolation(exported):
    """Every graph output, fed the same example inputs, against the PyTorch wrapper (functions and portable)."""
    out, manifest, model = exported
    import onnxruntime as ort

    wrappers = stages.stage_graphs(model)
    examples = stages.example_inputs(model, wrappers, seed=7)  # noise frames: far from the calibration data
    for name, wrapper in wrappers.items():
        with torch.no_grad():
            expected = wrapper(*examples[name])
        expected = expected if isinstance(expected, tuple) else (expected,)
        feed = {n: t.numpy() for n, t in zip(wrapper.input_names, examples[name], strict=True)}
        for form in ("functions", "portable"):
            session = ort.InferenceSession(str(out / manifest.graphs[name].files[form]),
                                           providers=["CPUExecutionProvider"])
            for actual, reference in zip(session.run(None, feed), expected, strict=True):
                reference = reference.numpy()
                assert np.abs(actual - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max()), (name, form)


def assert_parity(report: dict) -> None:
    """The check's criteria, with the chained probability judged against the float64 evaluation: an untrained
    network amplifies fp32 rounding to ~1e-4 (PyTorch fp32 itself is 3e-5 … 1e-4 from float64 here), so its
    fp32-vs-fp32 distance is noise; the graphs must be as close to the exact result as the SPEC's 1e-4."""
    summary = check.format_report(report)
    assert all(o["ok"] for name, o in report["outputs"].items() if name != "decoder/probability"), summary
    assert all(o["ok"] for o in report["isolated"].values()), summary
    assert report["float64"]["onnxruntime"]["max_abs"] <= 1e-4, summary
    assert report["probability_max_abs"] <= 2e-4, summary
    if report["memory_validity"]:
        assert report["memory_validity"]["ok"], summary


@pytest.mark.parametrize("form", ["functions", "portable"])
def test_chained_graphs_match_pytorch_on_a_clip(exported, form):
    out, _, _ = exported
    report = check.check_export(out, clip_length=6, frames=3, form=form, threads=1, progress=False)
    assert_parity(report)
    assert report["reference_frames"] == [0, 2, 5] and report["frames"] == [0, 2, 5]
    assert set(report["outputs"]) >= {"encoder/f1", "encoder/f5_motion", "ima/ima5_appearance",
                                      "ifa_memory/keys_motion", "decoder/probability"}
    assert all(output["cosine"] >= 0.99999 for output in report["outputs"].values())


def test_memory_validity_k_of_n(exported):
    """k valid of N slots, garbage (NaN, Inf, 1e3-scale values) in the others: the garbage changes nothing at all
    (bit for bit), and the decoder graph in ONNX Runtime equals PyTorch with those k references alone within the
    decoder's fp32 rounding (~1e-5 for this untrained network; `test_trained_tiny_checkpoint` holds the shipped
    checkpoint to 1e-5)."""
    out, _, _ = exported
    report = check.check_export(out, clip_length=5, frames=1, threads=1, progress=False)
    validity = report["memory_validity"]
    assert sorted(validity["max_abs"]) == ["1", "2", "3"]
    assert all(effect == 0.0 for effect in validity["garbage_effect"].values()), validity
    assert all(error <= 5e-5 for error in [*validity["max_abs"].values(), *validity["max_abs_fp64"].values()])


def test_chain_admits_entries_and_uses_the_frame_itself_when_empty(exported):
    """The torch-free chain: an empty bank means the current frame is its own single reference (as PyTorch)."""
    out, _, model = exported
    stage_chain = StageChain(open_engine(out, device="cpu", threads=1))
    generator = torch.Generator().manual_seed(3)
    rgb, flow = torch.randn(1, 3, SIZE, SIZE, generator=generator), torch.rand(1, 3, SIZE, SIZE, generator=generator)
    values = stage_chain.process(rgb.numpy(), flow.numpy(), stage_chain.new_bank())
    with torch.no_grad():
        expected = torch.sigmoid(model(rgb, flow)["p1"])[0, 0].numpy()
    assert np.abs(stage_chain.probability(values) - expected).max() <= 1e-4
    bank = stage_chain.new_bank()
    bank.write(1, stage_chain.memory_entry(stage_chain.frame_values(rgb.numpy(), flow.numpy())))
    assert bank.count == 1 and bank.valid.tolist() == [[0.0, 1.0, 0.0]]
    again = stage_chain.process(rgb.numpy(), flow.numpy(), bank)
    assert np.abs(stage_chain.probability(again) - stage_chain.probability(values)).max() <= 1e-6


@pytest.mark.parametrize(
    ("preset", "graph_names", "custom"),
    [
        ("paper-ii", ["encoder", "ima", "decoder"], {"decoder": {}}),  # IMA only: no memory
        ("paper-iii", ["encoder", "ifa_memory", "decoder"], {"encoder": {}}),  # IFA only
        ("paper-vi", ["encoder", "ima", "ifa_memory", "decoder"], {"ifa_memory": {}, "decoder": {}}),  # plain IFA
    ],
)
def test_ablation_configs(tmp_path, preset, graph_names, custom):
    config = get_config(preset, size=SIZE, memory=2, width=0.125)
    model, weights = exporter.model_for_export(None, preset, SIZE, 2, init="calibrated", out=tmp_path, width=0.125)
    assert model.config == config
    manifest = exporter.export_stage_graphs(model, tmp_path, weights, forms=("functions",)).to_dict()
    assert list(manifest["graphs"]) == graph_names
    for name, counts in custom.items():
        assert manifest["graphs"][name]["custom_nodes"]["functions"] == counts
    decoder_inputs = [t["name"] for t in manifest["graphs"]["decoder"]["inputs"]]
    assert ("memory_valid" in decoder_inputs) == config.uses_ifa
    assert ("ima5_appearance" in decoder_inputs) == config.uses_ima
    report = check.check_export(tmp_path, clip_length=4, frames=2, threads=1, progress=False)
    assert_parity(report)


def test_trained_tiny_checkpoint(tmp_path, davis16):
    """The shipped tiny checkpoint at its own S: `dpa check` passes as is on blackswan (probability <= 1e-4 vs
    PyTorch fp32), and k valid of N slots equal PyTorch with the k references alone within 1e-4."""
    from dpa.errors import DpaError
    from dpa.training.checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint("tiny")
    except DpaError as error:
        pytest.skip(str(error))
    model, weights = exporter.model_for_export(str(path), None, None, None)
    exporter.export_stage_graphs(model, tmp_path, weights)
    report = check.check_export(tmp_path, checkpoint=str(path), clip=davis16 / "blackswan", frames=3, threads=1,
                                progress=False)
    assert report["ok"], check.format_report(report)
    # The SPEC's 1e-4: fp32 summation order differs between the graphs and PyTorch (1.3e-5 measured for k = 3
    # with the current checkpoint, 7e-6 to 9e-6 for the other k).
    validity = report["memory_validity"]
    assert all(error <= 1e-4 for error in validity["max_abs"].values()), validity
