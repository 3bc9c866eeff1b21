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


def test_hand_built_case_keeps_the_most_active_filters_and_slices_the_next_layer():
    """Weights zero, bias of filter j = j + 1: every pre-activation is the constant j + 1, so the most active
    filters are the last C' of each layer, in order. The narrow layers read zeros from their kept inputs (their
    pre-activation without bias is constant), so a = 1 and the bias is the full filter's activation divided by the
    full layer's activation std: (j + 1) / std over the layer's filters of the constants 1 … C."""
    state = _state(weight_scale=0.0)
    channels = encoder_channels(build_model(get_config("tiny")).encoders["appearance"])  # 1/8 width
    assert channels == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    subset = vgg16_subset(state, channels, _frames())
    previous, side = [0, 1, 2], 32
    for layer, (count, full) in enumerate(zip(channels, FULL_CHANNELS, strict=True)):
        side //= 2 if CONV_INDICES[layer] in POOL_BEFORE else 1
        assert subset.kept[layer] == list(range(full - count, full))
        assert subset.weights[layer].shape == (count, len(previous), 3, 3)
        assert torch.equal(subset.weights[layer], torch.zeros(count, len(previous), 3, 3))
        assert torch.equal(subset.scale[layer], torch.ones(count))
        constants = torch.arange(1, full + 1, dtype=torch.float32)
        layer_std = constants[None, :, None, None].expand(4, full, side, side).std()  # of the layer's activations
        expected = constants[full - count:] / layer_std
        torch.testing.assert_close(subset.biases[layer], expected, rtol=1e-5, atol=1e-6)
        previous = subset.kept[layer]


def test_random_network_keeps_the_top_filters_their_sparsity_and_their_mean_activation():
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
        # The kept weights are the full ones, sliced to the previous layer's kept filters and scaled per filter.
        sliced = weight[expected][:, previous] * subset.scale[layer][:, None, None, None]
        torch.testing.assert_close(subset.weights[layer], sliced)
        narrow_z = F.conv2d(narrow, subset.weights[layer], subset.biases[layer], padding=1)
        target = full_z[:, expected]
        positions = narrow_z[:, 0].numel()
        # Fires at the same fraction of positions (up to the quantile's one position) …
        fraction = (narrow_z > 0).float().mean(dim=(0, 2, 3))
        torch.testing.assert_close(fraction, (target > 0).float().mean(dim=(0, 2, 3)), rtol=0, atol=2 / positions)
        # … with the full filter's mean activation, on the layer's unit scale.
        scale = full_z.clamp_min(0).std()
        torch.testing.assert_close(narrow_z.clamp_min(0).mean(dim=(0, 2, 3)),
                                   target.clamp_min(0).mean(dim=(0, 2, 3)) / scale, rtol=1e-4, atol=1e-6)
        full, narrow, previous = full_z.clamp_min(0), narrow_z.clamp_min(0), expected


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
