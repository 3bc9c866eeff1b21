"""The gradients of the first training step, alone or under DDP (a helper of test_train.py, not a test).

Run by torchrun, every rank takes its share of the first global batch from the training loop's own loader
(`make_loader`), runs `batch_loss` through DistributedDataParallel and back-propagates; DDP all-reduces the
gradients to their mean over the ranks, which rank 0 saves. Called in-process with world 1 it gives the same
step of a single process on the whole global batch. Equal data sharding and gradient averaging make the two
equal up to fp32 summation order.

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_gradients.py SETTINGS.json OUT.pt
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from dpa.training.loader import make_loader
from dpa.training.settings import TrainSettings
from dpa.training.train import (
    batch_loss,
    freeze_batch_norm,
    init_distributed,
    initial_model,
    training_device,
)


def step_gradients(settings: TrainSettings, step: int = 0) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient of the loss of global batch `step` at the initial weights (averaged over the
    ranks when distributed)."""
    rank, world = init_distributed()
    config = settings.model_config()
    device = training_device(settings, rank)
    model = initial_model(settings, config).to(device, memory_format=torch.channels_last)
    model.train()
    if settings.freeze_batch_norm:
        freeze_batch_norm(model)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batch = next(iter(make_loader(settings, config, step, step + 1, rank, world)))
    batch_loss(wrapped, batch, settings, device).backward()
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}


def main(settings_json: str, out: str) -> None:
    settings = TrainSettings(**json.loads(open(settings_json).read()))
    gradients = step_gradients(settings)
    if torch.distributed.get_rank() == 0:
        torch.save(gradients, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
