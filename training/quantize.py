"""int8-aware weights: quantization-aware training (`dpa train --quantization-aware`) and weights rounded to their
int8 grid (`dpa round-weights`).

`dpa calibrate` quantizes every convolution of the exported graphs the way TensorRT's explicit quantization
takes it (`dpa.calibration.int8`): weights symmetric int8 per output channel (scale = max |w| / 127, the
values in [-127, 127]), the convolution's input symmetric int8 per tensor. Trained in float, a network meets
both roundings only at deployment. Here it meets them while it trains:

- `fake_int8_convolutions(model)`: every `nn.Conv2d` runs on its weight rounded to that int8 grid and on its input
  rounded to a per-tensor int8 grid, both with straight-through gradients (the rounding is skipped in the backward
  pass). The input's range is a running maximum of |x| (momentum `RANGE_MOMENTUM`, the `max` calibration method;
  `dpa calibrate`'s default entropy method clips more of the tail, so the deployed activations round more
  coarsely than here). The ranges live in the context, not in the model: a checkpoint keeps its keys.
- `int8_grid_state(model)`: the weights as the kept checkpoints and `dpa round-weights` store them, every
  convolution's weight on its int8 grid. int8 weights then cost the deployed graph nothing against this PyTorch
  model: the export folds BatchNorm into the convolution, which scales each output channel, and the grid of a
  channel scales with it.

PyTorch only (training side).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

INT8_MAX = 127  # symmetric int8: [-127, 127] (TensorRT's Q/DQ; -128 unused)
RANGE_MOMENTUM = 0.9  # running maximum of a convolution input's |x|: new = m * old + (1 - m) * batch max


def int8_weight_grid(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, kh, kw) rounded to symmetric int8 per output channel, scale max |w| / 127 (as ONNX
    Runtime's quantizer in `dpa calibrate` computes it); all-zero channels stay zero. Same dtype."""
    value = weight.float()
    scale = value.abs().amax(dim=tuple(range(1, value.dim())), keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    rounded = (value / safe).round().clamp(-INT8_MAX, INT8_MAX) * safe
    return torch.where(scale > 0, rounded, value).to(weight.dtype)


def fake_int8(value: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """`value` rounded to the symmetric int8 grid of [-limit, limit] (clipped there) in the forward pass, the
    identity in the backward pass (straight-through estimator)."""
    scale = (limit / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    rounded = (value.float() / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale
    return value + (rounded.to(value.dtype) - value).detach()


def named_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(state-dict prefix, layer) of every `nn.Conv2d` of `model` (the layers `dpa calibrate` quantizes), in module
    order; a DistributedDataParallel wrapper is looked through."""
    module = model.module if hasattr(model, "module") else model
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, nn.Conv2d)]


def convolutions(model: nn.Module) -> list[nn.Conv2d]:
    """Every `nn.Conv2d` of `model`, in module order."""
    return [layer for _, layer in named_convolutions(model)]


def _fake_int8_forward(conv: nn.Conv2d, ranges: dict[nn.Conv2d, torch.Tensor]):
    """A forward for `conv` on int8-rounded input (its running range in `ranges`) and int8-grid weight."""

    def forward(self: nn.Conv2d, value: torch.Tensor) -> torch.Tensor:
        if self.training:
            batch_max = value.detach().abs().amax().float()
            old = ranges.get(self)
            ranges[self] = batch_max if old is None else RANGE_MOMENTUM * old + (1 - RANGE_MOMENTUM) * batch_max
        limit = ranges.get(self)
        if limit is not None:
            value = fake_int8(value, limit)
        weight = self.weight + (int8_weight_grid(self.weight.detach()) - self.weight).detach()
        return self._conv_forward(value, weight, self.bias)

    return types.MethodType(forward, conv)


@contextlib.contextmanager
def fake_int8_convolutions(model: nn.Module) -> Iterator[dict[nn.Conv2d, torch.Tensor]]:
    """Within the context every convolution of `model` computes on int8-rounded input and weight (module
    docstring); yields the running input ranges (convolution -> max |x|). The model's own forward methods and
    state are back afterwards; the ranges are lost (a resumed run measures them again)."""
    ranges: dict[nn.Conv2d, torch.Tensor] = {}
    patched = convolutions(model)
    for conv in patched:
        conv.forward = _fake_int8_forward(conv, ranges)
    try:
        yield ranges
    finally:
        for conv in patched:
            del conv.forward  # the instance attribute; nn.Conv2d.forward again


@torch.no_grad()
def int8_grid_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with every convolution's weight on its int8 grid (`int8_weight_grid`)."""
    module = model.module if hasattr(model, "module") else model
    state = dict(module.state_dict())
    for name, conv in named_convolutions(module):
        state[f"{name}.weight"] = int8_weight_grid(conv.weight.detach())
    return state


@torch.no_grad()
def largest_grid_change(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(convolutions of `model`, the largest change `state` (`int8_grid_state`) makes to a weight, relative to the
    largest |w| of its output channel; at most half a step, 1 / 254)."""
    layers = named_convolutions(model)
    largest = 0.0
    for name, conv in layers:
        weight = conv.weight.float()
        peak = weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        largest = max(largest, ((state[f"{name}.weight"].float() - weight).abs() / peak).max().item())
    return len(layers), largest
