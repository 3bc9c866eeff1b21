"""The training loop (SPEC §3): stage 1 (saliency images) and stage 2 (video clips), DDP via torchrun.

Which samples each step sees (deterministic across process counts and resumes) is `dpa.training.loader`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpa import stop as stopping
from dpa.errors import DpaError
from dpa.files import write_text_atomically
from dpa.progress import Bar
from dpa.training.checkpoint import load_checkpoint, load_state, save_checkpoint
from dpa.training.config import ModelConfig
from dpa.training.loader import imagenet_frames, make_loader
from dpa.training.model import DPA, build_model
from dpa.training.quantize import fake_int8_convolutions, int8_grid_state
from dpa.training.settings import TrainSettings

log = logging.getLogger(__name__)

SIDE_OUTPUTS = ("p4", "p3", "p2", "p1")
PRECISIONS = ("fp32", "bf16")


def _to_device(value, device: torch.device):
    """A batch entry on the training device; 4-D images channels-last like the model's weights."""
    if not torch.is_tensor(value):
        return value
    value = value.to(device)
    return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Cosine decay from learning_rate to final_learning_rate over `steps`."""
    progress = min(step / max(settings.steps, 1), 1.0)
    start, end = settings.learning_rate, settings.final_learning_rate
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def soft_jaccard_loss(logit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − soft IoU per image, averaged over the batch: 1 − Σpm / Σ(p + m − pm), p = sigmoid(logit).

    An image whose prediction and mask are both exactly empty counts as a perfect match (loss 0). An empty
    mask with any non-zero prediction has intersection 0, so loss 1 with zero gradient: such frames are
    trained by the BCE term alone.
    """
    probability = torch.sigmoid(logit).flatten(1)
    target = mask.flatten(1)
    intersection = (probability * target).sum(1)
    union = (probability + target - probability * target).sum(1)
    iou = torch.where(union > 0, intersection / union.clamp_min(1e-6), torch.ones_like(union))
    return (1 - iou).mean()


def segmentation_loss(
    logits: dict[str, torch.Tensor], mask: torch.Tensor, iou_weight: float = 0.0
) -> torch.Tensor:
    """Binary cross-entropy summed over the deep-supervision outputs p4, p3, p2, p1 (B, 1, S, S), plus
    `iou_weight` × the soft Jaccard loss of each output (0: the paper's loss)."""
    total = sum(F.binary_cross_entropy_with_logits(logits[name], mask) for name in SIDE_OUTPUTS)
    if iou_weight:
        total = total + iou_weight * sum(soft_jaccard_loss(logits[name], mask) for name in SIDE_OUTPUTS)
    return total


def batch_loss(model: nn.Module, batch: dict, settings: TrainSettings, device: torch.device) -> torch.Tensor:
    """The training loss of one (local) batch: the model on the query and its references, then
    `segmentation_loss` against the query's mask."""
    batch = {k: _to_device(v, device) for k, v in batch.items()}
    logits = model(batch["rgb"], batch["flow"], batch.get("reference_rgb"), batch.get("reference_flow"))
    return segmentation_loss(logits, batch["mask"], settings.iou_loss_weight)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def training_device(settings: TrainSettings, rank: int) -> torch.device:
    if settings.device != "auto":
        return torch.device(settings.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def freeze_batch_norm(model: nn.Module) -> None:
    """Use running statistics in every BatchNorm (eval mode) while the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def copy_appearance_to_motion(model: DPA) -> None:
    """End of stage 1: the motion encoder starts from the trained appearance encoder (the paper)."""
    model.encoders["motion"].load_state_dict(model.encoders["appearance"].state_dict())


def initial_model(settings: TrainSettings, config: ModelConfig) -> DPA:
    """The seeded network, its encoders from the ImageNet VGG-16 (`--vgg-weights`; a narrow encoder keeps a subset
    of the filters, chosen on frames of the training data), then the `--init` checkpoint's weights."""
    from dpa.training.imagenet import FULL_CHANNELS, encoder_channels, load_imagenet_weights

    model = build_model(config, seed=settings.seed)
    if settings.vgg_weights:
        try:
            state = torch.load(settings.vgg_weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise DpaError(f"cannot read the VGG-16 weights {settings.vgg_weights}: {error}") from error
        encoders = list(model.encoders.values())
        narrow = tuple(encoder_channels(encoders[0])) != FULL_CHANNELS
        subset = load_imagenet_weights(encoders, state, imagenet_frames(settings, config) if narrow else None)
        if subset is not None:
            log.info("ImageNet VGG-16: kept %s filters per layer, chosen by mean activation and refitted on frames "
                     "of %s (relative residual per layer %s)", "/".join(str(len(kept)) for kept in subset.kept),
                     settings.data[0], "/".join(f"{value:.2f}" for value in subset.residual))
    if settings.init:
        payload = load_checkpoint(settings.init)
        load_state(model, payload["model"], source=payload["path"])
    return model


def train(settings: TrainSettings, resume: bool = False, until: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) training; returns the path of the last checkpoint.

    until: stop after this step (default: settings.steps) — a run may be split and resumed exactly.
    Long on purpose (~60 lines): set-up, the step loop and the save-on-stop path share the model, optimiser and
    sampler state, and the loop reads as the training recipe.
    """
    rank, world = init_distributed()
    if settings.batch_size % world:
        raise DpaError(f"global batch {settings.batch_size} is not divisible by {world} processes")
    out = Path(settings.out)
    config = settings.model_config()
    device = training_device(settings, rank)
    if settings.precision not in PRECISIONS:
        raise DpaError(f"training precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)

    # channels-last (NHWC) convolutions: 1.5x faster training steps for tiny on CPU here (0.93 s vs 1.40 s
    # per batch of 8 at one thread), and what tensor cores want on CUDA. The values are unchanged.
    model = initial_model(settings, config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    last = out / "last.pt"
    start = resume_from(last, settings, model, optimizer) if resume else 0
    stop = min(until or settings.steps, settings.steps)
    if start >= stop:
        return last

    wrapped = distributed(model, device, world)
    loader = make_loader(settings, config, start, stop, rank, world)
    model.train()
    if settings.freeze_batch_norm:
        freeze_batch_norm(model)
    outputs = RunOutputs(settings, config, start, stop, progress) if rank == 0 else None
    step = start
    quantized = fake_int8_convolutions(model) if settings.quantization_aware else contextlib.nullcontext()
    freeze_from = settings.freeze_batch_norm_from
    freeze_step = None if freeze_from is None else int(freeze_from * settings.steps)
    try:
        with quantized:  # convolutions on int8-rounded weights and inputs (--quantization-aware)
            for batch in loader:
                if freeze_step is not None and step >= freeze_step:
                    freeze_batch_norm(model)
                loss = optimisation_step(wrapped, optimizer, batch, step, settings, device)
                step += 1
                if outputs is not None:
                    outputs.after_step(step, loss.item(), model, optimizer)
                signum = stop_signal(world, device)
                if signum is not None:  # every rank stops after the same step; OUT/last.pt resumes exactly there
                    if outputs is not None:
                        outputs.save_stopped(step, model, optimizer, signum)
                    raise stopping.Stopped(signum)
    finally:
        if outputs is not None:
            outputs.close()
    if settings.stage == 1 and step == settings.steps:
        copy_appearance_to_motion(model)
    metrics = {"final_loss": loss.item()}
    if world > 1:
        metrics["rank_max_difference"] = rank_max_difference(model)
    if outputs is not None:
        outputs.save_final(step, model, optimizer, metrics)
    if dist.is_initialized():
        dist.barrier()
    return last


def stop_signal(world: int, device: torch.device) -> int | None:
    """The signal that asked the run to stop (`dpa.stop`), agreed by all processes (the largest number any of them
    received, so that every rank leaves after the same step), or None."""
    pending = stopping.requested()
    if world == 1:
        return pending
    flag = torch.tensor([pending or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def distributed(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when there are several processes, else `model` itself."""
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def resume_from(last: Path, settings: TrainSettings, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the model's and optimiser's state from the checkpoint `last` (OUT/last.pt); returns its step."""
    if not last.is_file():
        raise DpaError(f"nothing to resume: {last} does not exist")
    payload = load_checkpoint(last)
    saved = TrainSettings(**payload["train"])
    if dataclasses.replace(saved, steps=settings.steps) != dataclasses.replace(settings, steps=settings.steps):
        log.warning("resuming with settings that differ from the checkpoint's")
    load_state(model, payload["model"], source=str(last))
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])


def optimisation_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, step: int, settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    """One training step at `step` (0-based): the scheduled learning rate, the loss (in bfloat16 autocast with
    --precision bf16), backward and the optimiser update; returns the loss, DpaError when it is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, settings)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
        loss = batch_loss(model, batch, settings, device)
    if not torch.isfinite(loss):
        raise DpaError(f"loss became {loss.item()} at step {step}: lower the learning rate or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class RunOutputs:
    """What rank 0 writes during a run: OUT/settings.json, the progress bar, OUT/metrics.jsonl (the mean loss over
    each --log-every steps) and the checkpoints (OUT/last.pt, OUT/model-<step>.pt, OUT/model.pt)."""

    def __init__(self, settings: TrainSettings, config: ModelConfig, start: int, stop: int, progress: bool):
        self.settings, self.config, self.stop = settings, config, stop
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.out / "settings.json", json.dumps(dataclasses.asdict(settings), indent=2) + "\n")
        self.metrics_file = (self.out / "metrics.jsonl").open("a")
        self.bar = Bar(stop - start, f"stage {settings.stage}", "step", enabled=progress, check=False)
        self.running, self.unlogged, self.started = 0.0, 0, time.perf_counter()  # loss sum and steps since a record

    def after_step(self, step: int, loss: float, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the step that made `step` steps in all (its `loss`): the progress bar, a metrics record every
        --log-every steps and at the last step, and the --save-every checkpoints."""
        self.running += loss
        self.unlogged += 1
        self.bar.advance(note=f"loss={loss:.3f}")
        if step % self.settings.log_every == 0 or step == self.stop:
            record = {
                "step": step,
                "loss": self.running / self.unlogged,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - self.started,
            }
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            self.running, self.unlogged = 0.0, 0
        if step % self.settings.save_every == 0 and step != self.stop:
            _save(self.out / "last.pt", model, self.config, self.settings, optimizer, step)
            if self.settings.keep_checkpoints:
                save_checkpoint(self.out / f"model-{step:06d}.pt", model, self.config, self.kept_state(model),
                                step=step, train=dataclasses.asdict(self.settings), metrics={"loss": loss})

    def kept_state(self, model: nn.Module) -> dict | None:
        """The weights OUT/model*.pt store: with --quantization-aware every convolution's on its int8 grid (what
        the network trained on; OUT/last.pt keeps the float weights that resume continues), else the model's."""
        return int8_grid_state(model) if self.settings.quantization_aware else None

    def close(self) -> None:
        self.bar.close()
        self.metrics_file.close()

    def save_stopped(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, signum: int) -> None:
        """OUT/last.pt at `step` when a signal stopped the run (`--resume` continues it exactly)."""
        if step % self.settings.save_every != 0:  # after_step has just saved it otherwise
            _save(self.out / "last.pt", model, self.config, self.settings, optimizer, step)
        log.warning("stopped by %s after step %d: %s holds it; continue with --resume", signal.Signals(signum).name,
                    step, self.out / "last.pt")

    def save_final(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, metrics: dict) -> None:
        """OUT/last.pt at the end of the run, and OUT/model.pt when the run has reached --steps (with
        --keep-checkpoints also as OUT/model-<step>.pt, so that the kept steps are every candidate)."""
        _save(self.out / "last.pt", model, self.config, self.settings, optimizer, step, metrics)
        if step == self.settings.steps:
            names = ["model.pt"] + ([f"model-{step:06d}.pt"] if self.settings.keep_checkpoints else [])
            state = self.kept_state(model)
            for name in names:
                save_checkpoint(self.out / name, model, self.config, state, step=step,
                                train=dataclasses.asdict(self.settings), metrics=metrics)


@torch.no_grad()
def rank_max_difference(model: nn.Module) -> float:
    """Largest difference of any weight or buffer between processes (0 when DDP kept them in sync)."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def _save(
    path: Path, model: nn.Module, config: ModelConfig, settings: TrainSettings, optimizer, step: int,
    metrics: dict | None = None,
) -> None:
    save_checkpoint(
        path, model, config, step=step, optimizer=optimizer.state_dict(), train=dataclasses.asdict(settings),
        metrics=metrics or {},
    )
