"""ImageNet initialisation of narrow encoders: which filters are kept, how the next layer is sliced, the rescaling."""

import pytest
import torch
import torch.nn.functional as F

from dpa.errors import DpaError
from dpa.training.config import get_config
from dpa.training.imagenet import (
    CONV_INDICES,
    FULL_CHANNELS,
    POOL_BEFORE,
    encoder_channels,
    load_imagenet_weights,
    vgg16_subset,
)
from dpa.training.model import build_model


def _state(weight_scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG-16 state dict: weights weight_scale × N(0, 1/fan_in), bias of filter j = j + 1."""
    generator = torch.Generator().manual_seed(seed)
    state, inputs = {}, 3
    for index, channels in zip(CONV_INDICES, FULL_CHANNELS, strict=True):
        weight = torch.randn(channels, inputs, 3, 3, generator=generator) / (9 * inputs) ** 0.5
        state[f"features.{index}.weight"] = weight * weight_scale
        state[f"features.{index}.bias"] = torch.arange(1, channels + 1, dtype=torch.float32)
        inputs = channels
    return state


def _frames(count: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hand_built_case_keeps_the_most_active_filters_and_fits_constants():
    """Weights zero, bias of filter j = j + 1: every pre-activation is the constant j + 1, so the most active
    filters are the last C' of each layer, in order, and the fit is weights 0 and the bias (j + 1) / the full
    layer's activation std (the std over the layer's filters of the constants 1 … C): unit scale."""
    state = _state(weight_scale=0.0)
    channels = encoder_channels(build_model(get_config("tiny")).encoders["appearance"])  # 1/8 width
    assert channels == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    subset = vgg16_subset(state, channels, _frames())
    previous, side = 3, 32
    for layer, (count, full) in enumerate(zip(channels, FULL_CHANNELS, strict=True)):
        side //= 2 if CONV_INDICES[layer] in POOL_BEFORE else 1
        assert subset.kept[layer] == list(range(full - count, full))
        assert subset.weights[layer].shape == (count, previous, 3, 3)
        assert subset.weights[layer].abs().max() < 1e-4
        constants = torch.arange(1, full + 1, dtype=torch.float32)
        layer_std = constants[None, :, None, None].expand(4, full, side, side).std()  # of the layer's activations
        torch.testing.assert_close(subset.biases[layer], constants[full - count:] / layer_std, rtol=1e-4, atol=1e-4)
        assert subset.residual[layer] < 1e-4
        previous = count


def test_random_network_keeps_the_top_filters_and_fits_them_better_than_slicing():
    state = _state(weight_scale=1.0, seed=2)
    frames = _frames()
    channels = [c // 4 for c in FULL_CHANNELS]
    subset = vgg16_subset(state, channels, frames)
    full = narrow = frames
    previous = [0, 1, 2]
    for layer, index in enumerate(CONV_INDICES):
        if index in POOL_BEFORE:
            full, narrow = F.max_pool2d(full, 2), F.max_pool2d(narrow, 2)
        weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
        full_z = F.conv2d(full, weight, bias, padding=1)
        activity = full_z.clamp_min(0).mean(dim=(0, 2, 3))
        expected = sorted(torch.argsort(activity, descending=True)[: channels[layer]].tolist())
        assert subset.kept[layer] == expected
        target = full_z[:, expected] / full_z.clamp_min(0).std()  # unit scale
        fitted = F.conv2d(narrow, subset.weights[layer], subset.biases[layer], padding=1)
        error = float((fitted - target).norm() / target.norm())
        assert error == pytest.approx(subset.residual[layer], rel=1e-3)  # every position is a sample here
        if layer == 0:
            assert error < 1e-3  # all three inputs are kept: the full filter is reachable
        # least squares beats the sliced full weights with their best single scale and bias per filter
        sliced = F.conv2d(narrow, weight[expected][:, previous], padding=1)
        flat_s, flat_t = sliced.transpose(0, 1).flatten(1), target.transpose(0, 1).flatten(1)
        design = torch.stack([flat_s, torch.ones_like(flat_s)], dim=2)  # (C', N, 2)
        best = torch.linalg.lstsq(design, flat_t[..., None]).solution
        baseline = float((design @ best - flat_t[..., None]).norm() / flat_t.norm())
        assert error <= baseline + 1e-4  # (the ridge costs ~2e-5 where slicing is exact: layer 0)
        full, narrow, previous = full_z.clamp_min(0), fitted.clamp_min(0), expected


def test_both_encoders_get_the_subset_and_full_width_is_a_plain_copy():
    state = _state(weight_scale=1.0, seed=3)
    model = build_model(get_config("tiny", size=64))
    encoders = list(model.encoders.values())
    subset = load_imagenet_weights(encoders, state, _frames())
    assert subset is not None
    for encoder in encoders:
        for conv, weight, bias in zip(encoder.convolutions(), subset.weights, subset.biases, strict=True):
            assert torch.equal(conv.weight.detach(), weight) and torch.equal(conv.bias.detach(), bias)
    with pytest.raises(DpaError, match="calibration frames are needed"):
        load_imagenet_weights(encoders, state, None)
    full = build_model(get_config("paper-i", size=64)).encoders["appearance"]
    assert load_imagenet_weights([full], state) is None
    assert torch.equal(full.convolutions()[5].weight.detach(), state["features.12.weight"])


def test_bad_state_dicts_and_counts_are_clear_errors():
    state = _state(weight_scale=1.0)
    del state["features.28.bias"]
    with pytest.raises(DpaError, match="lacks 1 keys"):
        vgg16_subset(state, [4] * 13, _frames())
    with pytest.raises(DpaError, match="cannot keep 65 of its 64 filters"):
        vgg16_subset(_state(1.0), [65] + [4] * 12, _frames())
