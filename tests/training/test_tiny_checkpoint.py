"""The shipped tiny checkpoint: small, loadable by name, accurate on held-out synthetic clips."""

import json

import pytest

from dpa.cli import main
from dpa.training.checkpoint import load_model, resolve_checkpoint
from dpa.training.synth import write_dataset


def test_tiny_is_shipped_small_and_addressable_by_name():
    path = resolve_checkpoint("tiny")
    assert path.stat().st_size <= 5 * 1024 * 1024
    model, payload = load_model("tiny")
    assert payload["config"]["name"] == "tiny" and model.config.size == 128
    assert "optimizer" not in payload  # the shipped file carries weights, config, step and metrics only


# Measured J-mean of the shipped checkpoint on the 20 held-out clips: 0.852 (README). The foundation
# issue's target is 0.85; a checkpoint below it must not ship.
HELD_OUT_J_FLOOR = 0.85


@pytest.mark.slow
def test_tiny_j_on_20_held_out_clips(tmp_path):
    # Seed 1000 was never used for training (the training set is seed 0); DIS flow as the runtime uses.
    write_dataset(tmp_path, clips=20, frames=12, size=128, seed=1000, split="test", progress=False)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "tiny", "--data", str(tmp_path), "--split", "test", "--flow", "files",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["sequences"]) == 20
    assert result["dataset"]["J_mean"] >= HELD_OUT_J_FLOOR, result["dataset"]
