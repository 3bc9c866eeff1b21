"""The training-side commands end to end: info, eval --checkpoint (vs eval --pred), errors."""

import json

import numpy as np
import pytest
import torch

from dpa.cli import main
from dpa.training.checkpoint import save_checkpoint
from dpa.training.config import get_config
from dpa.training.inference import OfflinePredictor
from dpa.training.model import build_model
from dpa.training.synth import write_dataset


def test_info_json(capsys):
    assert main(["info", "--config", "paper-iv", "--size", "352", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == "paper-iv" and info["size"] == 352
    assert abs(info["parameters"] / 43.5e6 - 1) <= 0.015
    assert sum(stage["parameters"] for stage in info["stages"].values()) == info["parameters"]
    assert set(info["stages"]) == {"encoder", "ima", "ifa_memory", "decoder"}
    assert info["gflops_per_frame"] == pytest.approx(sum(s["gflops"] for s in info["stages"].values()))
    # VGG-16 at 352x352 alone is 2 x 15.47 GMAC x (352/224)^2 = 76.4 GFLOPs per stream.
    assert 2 * 76.0 < info["stages"]["encoder"]["gflops"] < 2 * 76.0 + 5


def test_user_errors_exit_1_with_one_line(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not found" in error[0]
    assert main(["info", "--config", "paper-iv", "--size", "100"]) == 1
    assert "multiple of 32" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_dataset(root, clips=2, frames=6, size=64, seed=5, split="test", progress=False)
    config = get_config("tiny", size=64)
    path = save_checkpoint(root / "random.pt", build_model(config, seed=4), config, step=0)
    return root, path


def test_eval_checkpoint_agrees_with_scoring_its_saved_masks(random_checkpoint, tmp_path):
    root, checkpoint = random_checkpoint
    masks, direct, rescored = tmp_path / "masks", tmp_path / "direct.json", tmp_path / "rescored.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--split", "test",
                 "--flow", "files", "--save-masks", str(masks), "--json", str(direct)]) == 0
    assert main(["eval", "--pred", str(masks), "--gt", str(root / "test" / "GT"), "--json", str(rescored)]) == 0
    first, second = json.loads(direct.read_text()), json.loads(rescored.read_text())
    assert first["flow"] == ["files"]
    assert sorted(first["sequences"]) == ["clip0000", "clip0001"]
    for key in ("J_mean", "F_mean", "G"):
        assert first["dataset"][key] == pytest.approx(second["dataset"][key], abs=1e-12)


@torch.no_grad()
def test_offline_predictor_uses_the_paper_reference_frames():
    config = get_config("tiny", size=64)
    model = build_model(config, seed=2).eval()
    generator = np.random.default_rng(0)
    rgb = generator.standard_normal((12, 3, 64, 64)).astype(np.float32)
    flow = generator.random((12, 3, 64, 64)).astype(np.float32)
    predictor = OfflinePredictor(model)
    indices = predictor.references(len(rgb))
    assert indices == [0, 3, 7, 11]
    probabilities = predictor.predict(rgb, flow)
    references = torch.from_numpy(rgb[indices])[None], torch.from_numpy(flow[indices])[None]
    for frame in (0, 6, 11):
        logits = model(torch.from_numpy(rgb[frame : frame + 1]), torch.from_numpy(flow[frame : frame + 1]), *references)
        expected = torch.sigmoid(logits["p1"])[0, 0].numpy()
        assert np.abs(probabilities[frame] - expected).max() <= 1e-4  # batch composition changes rounding only
    # Other references give a visibly different map: the check above can tell them apart.
    wrong = torch.from_numpy(rgb[[0, 1, 2, 3]])[None], torch.from_numpy(flow[[0, 1, 2, 3]])[None]
    logits = model(torch.from_numpy(rgb[6:7]), torch.from_numpy(flow[6:7]), *wrong)
    assert np.abs(probabilities[6] - torch.sigmoid(logits["p1"])[0, 0].numpy()).max() > 1e-2
