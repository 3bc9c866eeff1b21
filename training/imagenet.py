"""ImageNet initialisation of the VGG-16 encoders at any width (SPEC §2.2; the `small` model of §2.8).

At width 1 torchvision's `features.<i>` tensors are copied as they are (`VGG16Encoder.load_torchvision_state_dict`).
A narrower encoder keeps a subset of each layer's filters, chosen on real frames (`vgg16_subset`):

1. Criterion. The calibration frames go through the full ImageNet VGG-16. In each convolution the kept filters
   are the C' whose mean post-ReLU activation mean(max(z, 0)) over all frames and positions is largest: the
   filters that fire most on the video the model will see. They keep their original order.
2. Slicing. A kept filter's weights are sliced to the previous layer's kept filters (the first layer keeps
   the three RGB inputs), so every layer of the narrow encoder reads exactly the channels it keeps.
3. Rescaling. Dropping inputs changes each pre-activation, and VGG has no normalisation to undo that, so the
   change would compound over 13 layers. Each kept filter therefore gets weight × a and a new bias c, fitted on the
   same frames with the narrow layers before it: it fires (is positive) at the same fraction of positions as the
   full network's filter, and its mean activation is the full filter's divided by the full layer's activation
   std. Matching the fraction active keeps the deep layers as sparse as VGG's (matching Gaussian moments did not:
   the pre-activations are heavy-tailed, and blocks 4-5 ended 97-99 % zero instead of 88-94 %); dividing by the
   layer's std puts every layer at unit scale. The weights distributed as Keras/Caffe VGG-16 (the shared file's
   origin) have activations in the hundreds (the Caffe 0-255 input range), which drowned the attention outputs
   that the IMA fusion concatenates to them and left BatchNorm running variances at 1e10 next to 1e-18.
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

    kept: the kept output filters (indices into the full layer, ascending); scale: a per kept filter (C',);
    weights, biases: the resulting tensors (C', C'_in, 3, 3) and (C',).
    """

    kept: list[list[int]]
    scale: list[torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]


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
    """Choose and rescale a subset of every layer's filters of a torchvision VGG-16 (module doc).

    state_dict: `features.<i>.weight|bias` of the full network; channels: the 13 kept filter counts;
    frames: (B, 3, H, W) float32 ImageNet-normalised calibration frames (real video; a few dozen suffice).
    """
    _check_state(state_dict)
    if len(channels) != len(CONV_INDICES):
        raise DpaError(f"need 13 channel counts, one per VGG-16 convolution, got {len(channels)}")
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise DpaError(f"calibration frames must be (B, 3, H, W) with B > 0, got {tuple(frames.shape)}")
    full = narrow = frames.float()
    previous_kept = [0, 1, 2]
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
        sliced = weight[kept][:, previous_kept]
        narrow_z = F.conv2d(narrow, sliced, padding=1)  # without bias: c replaces it
        layer_scale = float(full_z.clamp_min(0).std()) or 1.0
        scale, new_bias = _fit_activity(narrow_z, full_z[:, kept], layer_scale)
        new_weight = sliced * scale[:, None, None, None]
        result.kept.append(kept)
        result.scale.append(scale)
        result.weights.append(new_weight)
        result.biases.append(new_bias)
        full = full_z.clamp_min(0)
        narrow = F.conv2d(narrow, new_weight, new_bias, padding=1).clamp_min(0)
        previous_kept = kept
    return result


def _fit_activity(
    narrow_z: torch.Tensor, target_z: torch.Tensor, layer_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (a, c) such that max(a·narrow_z + c, 0) is positive at the fraction of positions where target_z
    is, with mean max(target_z, 0) / layer_scale. narrow_z, target_z: (B, C, H, W). A channel whose narrow
    pre-activation is constant gets a = 1 and the constant activation that has that mean."""
    channels = narrow_z.shape[1]
    narrow = narrow_z.transpose(0, 1).reshape(channels, -1)
    target = target_z.transpose(0, 1).reshape(channels, -1)
    active = (target > 0).float().mean(dim=1)  # fraction of positions where the full filter fires
    wanted = target.clamp_min(0).mean(dim=1) / layer_scale
    ordered = torch.sort(narrow, dim=1).values
    rank = ((1 - active) * (ordered.shape[1] - 1)).round().long()
    threshold = ordered.gather(1, rank[:, None])[:, 0]  # the narrow value above which that fraction lies
    excess = (narrow - threshold[:, None]).clamp_min(0).mean(dim=1)
    varies = excess > 1e-12
    scale = torch.where(varies, wanted / excess.clamp_min(1e-12), torch.ones_like(wanted))
    bias = torch.where(varies, -scale * threshold, wanted - threshold)
    return scale, bias


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
