"""Quantization-aware training: the int8 grid of `dpa calibrate`, straight-through rounding, the patched
convolutions, `dpa train --quantization-aware`, and int8 weights that cost the exported graph nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpa.cli import main
from dpa.training.checkpoint import load_checkpoint, load_model
from dpa.training.quantize import (
    INT8_MAX,
    convolutions,
    fake_int8,
    fake_int8_convolutions,
    int8_grid_state,
    int8_weight_grid,
)
from dpa.training.settings import TrainSettings
from dpa.training.synth import write_dataset
from dpa.training.train import train


def test_weight_grid_is_per_output_channel_max_over_127_hand_computed():
    weight = torch.tensor([[1.0, 0.5, -0.26], [0.0, 0.0, 0.0], [-2.0, 0.01, 1.0]]).reshape(3, 3, 1, 1)
    grid = int8_weight_grid(weight).reshape(3, 3)
    # channel 0: scale 1/127; 0.5 * 127 = 63.5 rounds to 64 (half to even), -0.26 * 127 = -33.02 to -33
    assert torch.allclose(grid[0], torch.tensor([127, 64, -33]) / 127.0, rtol=0, atol=1e-7)
    assert torch.equal(grid[1], torch.zeros(3))  # an all-zero channel stays zero (no 0/0)
    # channel 2: scale 2/127; 0.01 * 63.5 = 0.635 rounds to 1, 1.0 * 63.5 = 63.5 to 64
    assert torch.allclose(grid[2], torch.tensor([-127, 1, 64]) * 2 / 127.0, rtol=0, atol=1e-7)
    assert torch.equal(int8_weight_grid(int8_weight_grid(weight)), int8_weight_grid(weight))  # on the grid: fixed


def test_fake_int8_rounds_and_clips_forward_and_passes_gradients_straight_through():
    value = torch.tensor([0.3, -2.0, 0.01, 0.5], requires_grad=True)
    rounded = fake_int8(value, torch.tensor(1.0))
    expected = torch.tensor([38, -INT8_MAX, 1, 64]) / INT8_MAX  # 0.3 * 127 = 38.1; -2 clipped; 63.5 -> 64
    assert torch.allclose(rounded, expected, rtol=0, atol=1e-7)
    rounded.sum().backward()
    assert torch.equal(value.grad, torch.ones(4))


def test_folding_batch_norm_keeps_a_weight_on_its_int8_grid():
    # The export folds BatchNorm into the convolution: W' = W * gamma / sqrt(var + eps) per output channel.
    # A weight on its grid stays on the folded weight's grid, so int8 weights cost the graph nothing.
    generator = torch.Generator().manual_seed(0)
    weight = int8_weight_grid(torch.randn(16, 8, 3, 3, generator=generator))
    factor = (torch.rand(16, generator=generator) * 3 + 0.05).reshape(16, 1, 1, 1)
    folded = weight * factor
    assert (int8_weight_grid(folded) - folded).abs().max().item() <= 1e-6 * folded.abs().max().item()
    off_grid = torch.randn(16, 8, 3, 3, generator=generator) * factor
    assert (int8_weight_grid(off_grid) - off_grid).abs().max().item() > 1e-3 * off_grid.abs().max().item()


def test_patched_convolutions_compute_on_rounded_input_and_weight_and_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    keys = list(model.state_dict())
    value = torch.randn(2, 3, 8, 8)
    plain = model(value)
    with fake_int8_convolutions(model) as ranges:
        patched = model(value)
        first = convolutions(model)[0]
        # the first batch sets each range to its input's max |x|
        assert ranges[first].item() == pytest.approx(value.abs().max().item())
        expected = F.conv2d(fake_int8(value, value.abs().max()), int8_weight_grid(first.weight), first.bias,
                            padding=1)
        assert torch.allclose(first(value), expected, atol=1e-6)
        # a second batch moves the range by (1 - momentum) of the difference
        model(value * 3)
        assert ranges[first].item() == pytest.approx(value.abs().max().item() * (0.9 + 0.1 * 3), rel=1e-6)
        patched.sum().backward()  # straight through: every weight gets a gradient
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    difference = (patched - plain).abs().max().item()
    assert 1e-4 < difference < 0.1 * plain.abs().max().item()  # rounded, not another network
    assert torch.equal(model(value), plain) and list(model.state_dict()) == keys  # restored, keys unchanged


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, clips=3, frames=6, size=64, seed=0, progress=False)
    return root


def _off_grid(weight: torch.Tensor) -> float:
    return (int8_weight_grid(weight) - weight).abs().max().item() / weight.abs().max().item()


def test_quantization_aware_run_keeps_grid_weights_and_resumes_from_float_ones(synth_root, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--size", "64", "--data", str(synth_root), "--out", str(out),
                 "--steps", "4", "--batch-size", "2", "--workers", "0", "--save-every", "2", "--keep-checkpoints",
                 "--quantization-aware", "--lr", "1e-3"]) == 0
    model, payload = load_model(out / "model.pt")
    assert payload["train"]["quantization_aware"] is True
    assert max(_off_grid(conv.weight) for conv in convolutions(model)) <= 1e-6
    assert max(_off_grid(w) for w in _conv_weights(load_checkpoint(out / "model-000002.pt"))) <= 1e-6
    last = load_checkpoint(out / "last.pt")  # the float weights, which --resume continues
    assert max(_off_grid(w) for w in _conv_weights(last)) > 1e-3
    grid = int8_grid_state(load_model(out / "last.pt")[0])
    assert all(torch.equal(grid[k], v) for k, v in load_checkpoint(out / "model.pt")["model"].items())
    # and the weights moved: the run trained through the patched convolutions
    first = load_checkpoint(out / "model-000002.pt")["model"]
    assert any(not torch.equal(first[k], v) for k, v in payload["model"].items())


def test_quantization_aware_training_reduces_the_loss(synth_root, tmp_path):
    settings = TrainSettings(out=str(tmp_path / "run"), data=[str(synth_root)], config="tiny", size=64, steps=30,
                             batch_size=4, workers=0, learning_rate=1e-3, save_every=100, seed=1, log_every=10,
                             quantization_aware=True)
    train(settings, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses


def test_round_weights_writes_the_grid_checkpoint_and_keeps_its_record(tmp_path, capsys):
    out = tmp_path / "tiny-int8-grid.pt"
    assert main(["round-weights", "--checkpoint", "tiny", "--out", str(out)]) == 0
    original, rounded = load_checkpoint("tiny"), load_checkpoint(out)
    model = load_model("tiny")[0]
    expected = int8_grid_state(model)
    assert all(torch.equal(rounded["model"][k], v) for k, v in expected.items())
    changed = [k for k in expected if not torch.equal(original["model"][k], rounded["model"][k])]
    assert len(changed) == len(convolutions(model))  # every convolution's weight moved, nothing else
    assert rounded["step"] == original["step"] and rounded["config"] == original["config"]
    record = rounded["int8_grid"]
    assert record["convolutions"] == len(convolutions(model))
    assert 0.0 < record["largest_change"] <= 0.5 / INT8_MAX + 1e-6  # at most half a grid step
    assert f"{len(convolutions(model))} convolutions on their int8 grid" in capsys.readouterr().out
    # rounding a rounded checkpoint changes nothing
    again = tmp_path / "again.pt"
    assert main(["round-weights", "--checkpoint", str(out), "--out", str(again)]) == 0
    assert load_checkpoint(again)["int8_grid"]["largest_change"] == 0.0
    # its own input is refused as the output, also with --overwrite, and stays as it was
    before = out.read_bytes()
    assert main(["round-weights", "--checkpoint", str(out), "--out", str(out), "--overwrite"]) == 1
    assert "is the checkpoint being rounded" in capsys.readouterr().err
    assert out.read_bytes() == before


def _conv_weights(payload: dict) -> list[torch.Tensor]:
    return [tensor for tensor in payload["model"].values() if tensor.dim() == 4]


def _dequantized_conv_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv node name -> (float weight of the fp32 graph, dequantized weight of the int8 graph)."""
    import onnx
    from onnx import numpy_helper

    float_graph, int8_graph = onnx.load(path), onnx.load(path.parent / "int8" / path.name)
    weights = {t.name: numpy_helper.to_array(t) for t in float_graph.graph.initializer}
    integers = {t.name: numpy_helper.to_array(t) for t in int8_graph.graph.initializer}
    producer = {node.output[0]: node for node in int8_graph.graph.node}
    pairs = {}
    for node in float_graph.graph.node:
        if node.op_type != "Conv":
            continue
        quantized = next((n for n in int8_graph.graph.node if n.name == node.name), None)
        dequantize = producer.get(quantized.input[1]) if quantized is not None else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue  # left float, or split over a concatenation by `dpa calibrate`
        scale = integers[dequantize.input[1]].reshape(-1, 1, 1, 1)
        pairs[node.name] = (weights[node.input[1]], integers[dequantize.input[0]].astype(np.float32) * scale)
    return pairs


def _worst_weight_error(export: Path) -> tuple[int, float]:
    """(convolutions compared, largest |dequantized - float| / max |float| over them) in all graphs of `export`."""
    count, worst = 0, 0.0
    for path in sorted(export.glob("*.onnx")):
        for weight, dequantized in _dequantized_conv_weights(path).values():
            count += 1
            worst = max(worst, float(np.abs(dequantized - weight).max() / np.abs(weight).max()))
    return count, worst


@pytest.mark.slow
def test_grid_weights_are_exact_in_the_calibrated_int8_graphs(tmp_path):
    # The tiny checkpoint with its convolutions put on their int8 grid, exported (BatchNorm folded) and
    # calibrated: every int8 weight dequantizes to the fp32 graph's weight. The shipped tiny's do not.
    model, _ = load_model("tiny")
    grid_checkpoint = tmp_path / "grid.pt"
    assert main(["round-weights", "--checkpoint", "tiny", "--out", str(grid_checkpoint)]) == 0
    errors = {}
    for name, checkpoint in (("grid", str(grid_checkpoint)), ("float", "tiny")):
        export = tmp_path / name
        assert main(["export", "--checkpoint", checkpoint, "--out", str(export)]) == 0
        assert main(["calibrate", str(export), "--frames", "synthetic:7", "--synthetic-length", "3",
                     "--threads", "2"]) == 0
        errors[name] = _worst_weight_error(export)
    (count, grid_error), (float_count, float_error) = errors["grid"], errors["float"]
    assert count == float_count >= 0.8 * len(convolutions(model)), errors
    assert grid_error <= 1e-6, errors
    assert float_error > 1e-3, errors
