"""The shipped small checkpoint: the real-video model, at most 16 MB, loadable by name in every command."""

import json

import pytest

from dpa.cli import main
from dpa.training.checkpoint import load_model, resolve_checkpoint
from dpa.training.quantize import convolutions, int8_weight_grid
from dpa.training.synth import write_dataset


def test_small_is_shipped_under_16_mb_with_the_paper_structure():
    path = resolve_checkpoint("small")
    assert path.stat().st_size <= 16 * 1024 * 1024
    model, payload = load_model("small")
    config = model.config
    assert payload["config"]["name"] == "small" and "optimizer" not in payload
    # The paper's structure (IMA prototypes at blocks 4 and 5, IFA prototypes at block 5) at 1/4 width, S = 224.
    assert (config.ima, config.ifa) == ("prototype", "prototype")
    assert (config.width, config.size, config.memory) == (0.25, 224, 4)
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 3.5e6


def test_small_convolution_weights_are_on_their_int8_grid():
    # Shipped through `dpa round-weights` (README): int8 graphs then keep the fp32 graphs' weights exactly.
    model, payload = load_model("small")
    layers = convolutions(model)
    assert payload["int8_grid"]["convolutions"] == len(layers) == 101
    for conv in layers:
        weight = conv.weight.detach()
        assert (int8_weight_grid(weight) - weight).abs().max().item() <= 1e-6 * weight.abs().max().item()


# Measured J-mean of the shipped checkpoint on blackswan (README, "Real video"): 0.731, DIS at S as the runtime.
# The floor leaves 0.03 for kernel differences between CPUs (DIS flow and oneDNN rounding).
BLACKSWAN_J_FLOOR = 0.731 - 0.03


@pytest.mark.slow
def test_small_j_on_blackswan(davis16, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "small", "--data", str(davis16), "--layout", "images", "--flow", "dis",
                 "--sequences", "blackswan", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"]["J_mean"] >= BLACKSWAN_J_FLOOR, result["dataset"]


@pytest.mark.slow
def test_small_by_name_in_export_check_compare_and_train(tmp_path):
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", "small", "--out", str(export)]) == 0
    assert json.loads((export / "manifest.json").read_text())["model"]["config"]["name"] == "small"
    assert main(["check", str(export), "--checkpoint", "small", "--frames", "2", "--clip-length", "6",
                 "--json", str(tmp_path / "check.json")]) == 0
    assert json.loads((tmp_path / "check.json").read_text())["ok"] is True
    assert main(["compare", "--checkpoint", "small", "--export", str(export), "--clips", "synthetic:7",
                 "--synthetic-length", "4", "--precisions", "fp32", "--layer-frames", "1",
                 "--out", str(tmp_path / "compare"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert report["checkpoint"]["path"].endswith("small.pt") and report["model"]["config"] == "small"
    assert report["summary"][0]["iou_vs_reference_min"] >= 0.99  # ONNX Runtime fp32 masks = PyTorch's
    write_dataset(tmp_path / "train", clips=2, frames=6, size=96, seed=0, split="train", progress=False)
    assert main(["train", "--config", "small", "--init", "small", "--data", str(tmp_path / "train"), "--steps", "1",
                 "--batch-size", "2", "--workers", "0", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
