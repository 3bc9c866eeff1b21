"""Training loop: loss goes down, exact resume, DDP (2 CPU processes, gloo) equals one process."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpa.cli import main
from dpa.training.checkpoint import load_checkpoint, load_model
from dpa.training.settings import TrainSettings
from dpa.training.synth import write_dataset
from dpa.training.train import (
    SIDE_OUTPUTS,
    learning_rate_at,
    segmentation_loss,
    soft_jaccard_loss,
    train,
)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, clips=3, frames=6, size=64, seed=0, progress=False)
    return root


def _settings(root, out, **changes):
    values = dict(out=str(out), data=[str(root)], config="tiny", size=64, steps=4, batch_size=4, workers=0,
                  learning_rate=1e-3, save_every=100, seed=7)
    values.update(changes)
    return TrainSettings(**values)


def _max_difference(first: dict, second: dict) -> float:
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def test_cosine_schedule_endpoints():
    settings = TrainSettings(out="x", steps=100, learning_rate=1e-4, final_learning_rate=1e-5)
    assert learning_rate_at(0, settings) == pytest.approx(1e-4)
    assert learning_rate_at(50, settings) == pytest.approx(5.5e-5)
    assert learning_rate_at(100, settings) == pytest.approx(1e-5)


def _logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def test_soft_jaccard_loss_hand_computed():
    # One 1x1x2x2 image: mask [1, 1, 0, 0]; prediction p = [0.8, 0.5, 0.2, ~0].
    # intersection Σpm = 0.8 + 0.5 = 1.3; union Σp + Σm − Σpm = 1.5 + 2 − 1.3 = 2.2.
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    logit = torch.tensor([[[[_logit(0.8), 0.0], [_logit(0.2), -60.0]]]])
    assert soft_jaccard_loss(logit, mask).item() == pytest.approx(1 - 1.3 / 2.2, abs=1e-6)
    # A confident exact prediction costs nothing, a disjoint one costs 1, and an image where both the
    # mask and the prediction are exactly empty (sigmoid(-120) is 0 in float32) is a perfect match.
    assert soft_jaccard_loss((mask * 2 - 1) * 60, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_jaccard_loss((1 - 2 * mask) * 60, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert soft_jaccard_loss(torch.full((1, 1, 2, 2), -120.0), torch.zeros(1, 1, 2, 2)).item() == 0.0
    # Batch mean: the exact image (0) and the disjoint one (1) average to 0.5.
    both = torch.cat([(mask * 2 - 1) * 60, (1 - 2 * mask) * 60])
    assert soft_jaccard_loss(both, torch.cat([mask, mask])).item() == pytest.approx(0.5, abs=1e-6)


def test_segmentation_loss_adds_the_weighted_jaccard_term_per_side_output():
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    logits = {name: torch.randn(2, 1, 8, 8, generator=generator) for name in SIDE_OUTPUTS}
    bce = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[n], mask).item() for n in SIDE_OUTPUTS)
    jaccard = sum(soft_jaccard_loss(logits[n], mask).item() for n in SIDE_OUTPUTS)
    assert segmentation_loss(logits, mask).item() == pytest.approx(bce, rel=1e-6)  # the paper's loss
    assert segmentation_loss(logits, mask, 0.5).item() == pytest.approx(bce + 0.5 * jaccard, rel=1e-6)
    assert 0.3 < jaccard / 4 < 0.9  # random logits on a random mask: far from both 0 and 1


def test_iou_loss_option_reaches_the_run_settings_and_checkpoints(synth_root, tmp_path):
    assert main(["train", "--config", "tiny", "--size", "64", "--data", str(synth_root), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--workers", "0",
                 "--iou-loss", "0.25"]) == 0
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert saved["iou_loss_weight"] == 0.25
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["train"]["iou_loss_weight"] == 0.25
    # Training runs channels-last; the checkpoint stores plain contiguous tensors.
    assert all(t.is_contiguous() for t in payload["model"].values())


def test_resume_is_exact(synth_root, tmp_path):
    straight = train(_settings(synth_root, tmp_path / "straight"), progress=False)
    train(_settings(synth_root, tmp_path / "split"), until=2, progress=False)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 2
    resumed = train(_settings(synth_root, tmp_path / "split"), resume=True, progress=False)
    first, second = load_checkpoint(straight), load_checkpoint(resumed)
    assert first["step"] == second["step"] == 4
    assert _max_difference(first["model"], second["model"]) == 0.0
    # The run folder has the finished model and a metrics log with one record per logged step.
    model, payload = load_model(tmp_path / "split" / "model.pt")
    assert payload["config"]["name"] == "tiny" and not model.training
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]


def test_kept_checkpoints_are_every_save_step_and_the_last(synth_root, tmp_path):
    out = tmp_path / "run"
    train(_settings(synth_root, out, steps=5, save_every=2, keep_checkpoints=True), progress=False)
    kept = sorted(path.name for path in out.glob("model-*.pt"))
    assert kept == ["model-000002.pt", "model-000004.pt", "model-000005.pt"]
    assert [load_checkpoint(out / name)["step"] for name in kept] == [2, 4, 5]
    final, last_kept = load_checkpoint(out / "model.pt"), load_checkpoint(out / "model-000005.pt")
    assert _max_difference(final["model"], last_kept["model"]) == 0.0


def test_training_reduces_the_loss(synth_root, tmp_path):
    train(_settings(synth_root, tmp_path / "run", steps=30, batch_size=4, log_every=10, seed=1), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses


def _torchrun(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_ddp_training_keeps_the_ranks_identical(synth_root, tmp_path):
    """`dpa train` under torchrun (2 gloo ranks): DDP keeps every weight and buffer bit-identical across ranks,
    and the weights move away from the seeded initialisation."""
    _torchrun("-m", "dpa", "train", "--config", "tiny", "--size", "64", "--data", str(synth_root), "--steps", "3",
              "--batch-size", "4", "--workers", "0", "--freeze-batch-norm", "--seed", "3", "--out", str(tmp_path))
    ddp = load_checkpoint(tmp_path / "last.pt")
    assert ddp["step"] == 3
    assert ddp["metrics"]["rank_max_difference"] == 0.0
    from dpa.training.config import get_config
    from dpa.training.model import build_model

    initial = build_model(get_config("tiny", size=64), seed=3).state_dict()
    assert _max_difference(initial, ddp["model"]) > 1e-4


def _relative_difference(gradients: dict, reference: dict) -> float:
    """Largest ||g - g_ref|| / ||g_ref|| over the parameters whose reference gradient is not zero."""
    return max((gradients[name] - g).norm().item() / g.norm().item() for name, g in reference.items() if g.norm() > 0)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_ddp_gradients_equal_one_process(synth_root, tmp_path, threads):
    """Two ranks of batch 2 give, after DDP's all-reduce, the gradient one process gets from the batch of 4.

    Gradients, not weights after Adam steps: Adam divides each gradient by its own running magnitude, so where a
    gradient is near zero, the rounding differences between two batchings (oneDNN picks kernels by batch size,
    thread count and CPU) become whole ±lr steps. The gradients themselves differ only by fp32 summation order.
    Tolerance: per tensor, ||g_ddp - g_single|| / ||g_single|| <= 1e-4. Summing n fp32 terms in another order
    changes a sum by ~sqrt(n)·2^-24 relative: 4e-6 for the 64x64x4 positions of a first-block weight gradient,
    and back-propagation through 20-odd layers compounds it by about an order of magnitude, hence 1e-4.
    Measured here (AVX-512/AMX Xeon): 7.2e-6 at 1 thread, 5.2e-6 at 2; with oneDNN and ATen capped at AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): 7.0e-6 and 5.3e-6. The next global batch's: 1.99.
    """
    from ddp_gradients import step_gradients

    settings = _settings(synth_root, tmp_path / "run", steps=1, batch_size=4, freeze_batch_norm=True, seed=3)
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(settings)))
    helper = Path(__file__).with_name("ddp_gradients.py")
    _torchrun(str(helper), str(tmp_path / "settings.json"), str(tmp_path / "ddp.pt"))
    ddp = torch.load(tmp_path / "ddp.pt")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        single = step_gradients(settings)
        other_batch = step_gradients(settings, step=1)
    finally:
        torch.set_num_threads(previous)
    assert set(ddp) == set(single)
    assert _relative_difference(ddp, single) <= 1e-4
    # The measure tells batches apart: the next global batch (what a sharding mistake would feed) is far off.
    assert _relative_difference(other_batch, single) > 1e-2


def test_batch_norm_statistics_stop_changing_after_the_freeze_step(synth_root, tmp_path):
    settings = _settings(synth_root, tmp_path / "freeze", steps=4, freeze_batch_norm_from=0.5)
    train(settings, until=2, progress=False)
    at_two = load_checkpoint(tmp_path / "freeze" / "last.pt")["model"]
    train(settings, resume=True, progress=False)
    at_four = load_checkpoint(tmp_path / "freeze" / "last.pt")["model"]
    running = [k for k in at_two if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in at_two if k.endswith("weight")]
    assert running and max((at_two[k] - at_four[k]).abs().max().item() for k in running) == 0.0
    assert max((at_two[k] - at_four[k]).abs().max().item() for k in weights) > 1e-5
    # Without the freeze the statistics keep moving over the same steps.
    train(_settings(synth_root, tmp_path / "moving", steps=4), progress=False)
    moving = load_checkpoint(tmp_path / "moving" / "last.pt")["model"]
    assert max((at_two[k] - moving[k]).abs().max().item() for k in running) > 1e-4


def test_logged_loss_averages_the_steps_since_the_last_record_across_a_resume(synth_root, tmp_path):
    def records(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    train(_settings(synth_root, tmp_path / "straight", steps=6, log_every=2), progress=False)
    train(_settings(synth_root, tmp_path / "split", steps=6, log_every=2), until=3, progress=False)
    train(_settings(synth_root, tmp_path / "split", steps=6, log_every=2), resume=True, progress=False)
    straight, split = records(tmp_path / "straight"), records(tmp_path / "split")
    assert sorted(straight) == [2, 4, 6] and sorted(split) == [2, 3, 4, 6]
    # The split run logs step 3 alone (its stop) and step 4 alone (the first step after the resume).
    assert (split[3] + split[4]) / 2 == pytest.approx(straight[4], rel=1e-9)
    assert split[6] == pytest.approx(straight[6], rel=1e-9)


def test_vgg_weights_initialise_a_narrow_encoder_from_frames_of_the_training_data(synth_root, tmp_path):
    from dpa.training.imagenet import CONV_INDICES, FULL_CHANNELS, vgg16_subset
    from dpa.training.loader import imagenet_frames
    from dpa.training.train import initial_model

    generator = torch.Generator().manual_seed(0)
    state, inputs = {}, 3
    for index, channels in zip(CONV_INDICES, FULL_CHANNELS, strict=True):
        state[f"features.{index}.weight"] = torch.randn(channels, inputs, 3, 3, generator=generator) * 0.05
        state[f"features.{index}.bias"] = torch.randn(channels, generator=generator) * 0.1
        inputs = channels
    torch.save(state, tmp_path / "vgg16.pth")
    settings = _settings(synth_root, tmp_path / "run", vgg_weights=str(tmp_path / "vgg16.pth"))
    config = settings.model_config()
    frames = imagenet_frames(settings, config)
    assert frames.shape == (16, 3, 64, 64)
    model = initial_model(settings, config)
    channels = [conv.out_channels for conv in model.encoders["motion"].convolutions()]
    expected = vgg16_subset(state, channels, frames)
    for encoder in model.encoders.values():
        for conv, weight in zip(encoder.convolutions(), expected.weights, strict=True):
            assert torch.equal(conv.weight.detach(), weight)


def test_data_options_are_checked(synth_root, tmp_path):
    from dpa.errors import DpaError
    from dpa.training.loader import build_dataset

    settings = _settings(synth_root, tmp_path / "run")
    with pytest.raises(DpaError, match="1 --flow-root for 2 --data"):
        build_dataset(dataclasses.replace(settings, data=[str(synth_root)] * 2, flow_roots=["x"]),
                      settings.model_config())
    with pytest.raises(DpaError, match="no sequence named clip9"):
        build_dataset(dataclasses.replace(settings, exclude=["clip9"]), settings.model_config())
    kept = build_dataset(dataclasses.replace(settings, exclude=["clip0000"]), settings.model_config())
    assert sorted({sequence.name for sequence in kept.sequences}) == ["clip0001", "clip0002"]
