"""ImageNet initialisation of the VGG-16 encoders at any width (SPEC §2.2; the `small` model of §2.8).

At width 1 torchvision's `features.<i>` tensors are copied as they are (`VGG16Encoder.load_torchvision_state_dict`).
A narrower encoder keeps a subset of each layer's filters and refits their weights on real frames (`vgg16_subset`),
the channel-pruning reconstruction of ThiNet (Luo et al., ICCV 2017) and He et al. (ICCV 2017):

1. Criterion. The calibration frames go through the full ImageNet VGG-16. In each convolution the kept filters
   are the C' whose mean post-ReLU activation mean(max(z, 0)) over all frames and positions is largest: the
   filters that fire most on the video the model will see. They keep their original order.
2. Reconstruction. The narrow layer reads only the previous layer's kept channels, so its weights cannot simply be
   sliced from the full ones: each kept filter's weights (C'_in x 3 x 3) and bias are fitted by ridge least squares
   so that, on the narrow network's own inputs (the narrow layers before it, so errors do not compound unseen),
   its pre-activation reproduces the full network's pre-activation of that filter, divided by the full layer's
   activation std (every layer at unit scale: the weights distributed as Keras/Caffe VGG-16, the shared file's
   origin, have activations in the hundreds, which would drown the attention outputs that IMA concatenates to
   them). The fit uses up to `SAMPLES` positions drawn with a fixed seed.

On the `small` width (1/4) and 8 held-out DAVIS frames, the mean correlation of a kept channel with the full
network's is 0.91 / 0.84 / 0.68 / 0.43 / 0.07 at the end of blocks 1-5, against 0.79 / 0.43 / 0.25 / 0.11 / 0.03
for sliced weights rescaled to the full filters' activity (the previous recipe), which trained to J 0.09 on the
development split in 600 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpa.errors import DpaError
from dpa.training.model import VGG16_CHANNELS, VGG16_CONV_INDICES, VGG16Encoder

CONV_INDICES = tuple(index for block in VGG16_CONV_INDICES for index in block)
FULL_CHANNELS = tuple(channels for block in VGG16_CHANNELS for channels in block)
POOL_BEFORE = frozenset(block[0] for block in VGG16_CONV_INDICES[1:])  # first conv of blocks 2–5


@dataclass
class SubsetInit:
    """A narrow encoder's ImageNet initialisation, per convolution in order (13 of them).

    kept: the kept output filters (indices into the full layer, ascending); weights, biases: the fitted tensors
    (C', C'_in, 3, 3) and (C',); residual: the fit's relative residual per layer, |fit - target| / |target| over
    the calibration positions.
    """

    kept: list[list[int]]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    residual: list[float]


SAMPLES = 20000  # positions per layer the weights are fitted on
RIDGE = 1e-3  # ridge weight, relative to each input feature's mean square


def _check_state(state_dict: dict[str, torch.Tensor]) -> None:
    missing = [f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")
               if f"features.{i}.{p}" not in state_dict]
    if missing:
        raise DpaError(f"VGG-16 state dict lacks {len(missing)} keys, first {missing[:4]}")
    for index, channels in zip(CONV_INDICES, FULL_CHANNELS, strict=True):
        shape = tuple(state_dict[f"features.{index}.weight"].shape)
        if shape[0] != channels:
            raise DpaError(f"features.{index}.weight has {shape[0]} filters; VGG-16 has {channels}")


@torch.no_grad()
def vgg16_subset(state_dict: dict[str, torch.Tensor], channels: list[int], frames: torch.Tensor) -> SubsetInit:
    """Choose a subset of every layer's filters of a torchvision VGG-16 and refit them (module doc).

    state_dict: `features.<i>.weight|bias` of the full network; channels: the 13 kept filter counts;
    frames: (B, 3, H, W) float32 ImageNet-normalised calibration frames (real video; a few dozen suffice).
    """
    _check_state(state_dict)
    if len(channels) != len(CONV_INDICES):
        raise DpaError(f"need 13 channel counts, one per VGG-16 convolution, got {len(channels)}")
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise DpaError(f"calibration frames must be (B, 3, H, W) with B > 0, got {tuple(frames.shape)}")
    full = narrow = frames.float()
    generator = torch.Generator().manual_seed(0)
    result = SubsetInit([], [], [], [])
    for index, count, available in zip(CONV_INDICES, channels, FULL_CHANNELS, strict=True):
        if not 1 <= count <= available:
            raise DpaError(f"features.{index}: cannot keep {count} of its {available} filters")
        if index in POOL_BEFORE:
            full, narrow = F.max_pool2d(full, 2), F.max_pool2d(narrow, 2)
        weight = state_dict[f"features.{index}.weight"].float()
        bias = state_dict[f"features.{index}.bias"].float()
        full_z = F.conv2d(full, weight, bias, padding=1)  # (B, C, H, W) pre-activations of the full network
        activity = full_z.clamp_min(0).mean(dim=(0, 2, 3))
        # Largest mean activation first; a stable sort keeps the lower index first among equals.
        order = torch.sort(-activity, stable=True).indices
        kept = sorted(order[:count].tolist())
        layer_scale = float(full_z.clamp_min(0).std()) or 1.0
        new_weight, new_bias, residual = _fit_filters(narrow, full_z[:, kept] / layer_scale, generator)
        result.kept.append(kept)
        result.weights.append(new_weight)
        result.biases.append(new_bias)
        result.residual.append(residual)
        full = full_z.clamp_min(0)
        narrow = F.conv2d(narrow, new_weight, new_bias, padding=1).clamp_min(0)
    return result


def _fit_filters(inputs: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """3x3 convolution weights (C', C_in, 3, 3) and bias (C',) whose output on `inputs` (B, C_in, H, W) is the
    ridge least-squares fit of `target` (B, C', H, W), and the fit's relative residual."""
    columns = F.unfold(inputs, 3, padding=1)  # (B, C_in * 9, H * W)
    features = columns.shape[1]
    rows = columns.permute(0, 2, 1).reshape(-1, features)
    values = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    if len(rows) > SAMPLES:
        pick = torch.randperm(len(rows), generator=generator)[:SAMPLES]
        rows, values = rows[pick], values[pick]
    design = torch.cat([rows, torch.ones(len(rows), 1)], dim=1).double()
    gram = design.T @ design
    strength = RIDGE * len(rows) * design.pow(2).mean(dim=0).clamp_min(1e-12)
    strength[-1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + torch.diag(strength), design.T @ values.double())
    residual = float((design @ solution - values).norm() / values.double().norm().clamp_min(1e-12))
    weights = solution[:-1].T.reshape(target.shape[1], inputs.shape[1], 3, 3).float()
    return weights, solution[-1].float(), residual


def encoder_channels(encoder: VGG16Encoder) -> list[int]:
    """The filter count of each of the encoder's 13 convolutions."""
    return [conv.out_channels for conv in encoder.convolutions()]


@torch.no_grad()
def load_imagenet_weights(
    encoders: list[VGG16Encoder], state_dict: dict[str, torch.Tensor], frames: torch.Tensor | None = None
) -> SubsetInit | None:
    """Initialise encoders (all of one width) from torchvision's VGG-16: a copy at width 1, else the subset of
    `vgg16_subset` chosen on `frames` (required then). Returns the subset, or None for a plain copy."""
    widths = {tuple(encoder_channels(encoder)) for encoder in encoders}
    if len(widths) != 1:
        raise DpaError("the encoders differ in width; they are initialised with one set of ImageNet filters")
    channels = list(widths.pop())
    if tuple(channels) == FULL_CHANNELS:
        for encoder in encoders:
            encoder.load_torchvision_state_dict(state_dict)
        return None
    if frames is None:
        raise DpaError("a narrow encoder keeps a subset of the ImageNet filters chosen on real frames: "
                       "calibration frames are needed (dpa train takes them from --data)")
    subset = vgg16_subset(state_dict, channels, frames)
    for encoder in encoders:
        for conv, weight, bias in zip(encoder.convolutions(), subset.weights, subset.biases, strict=True):
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
    return subset
