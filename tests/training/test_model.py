"""DPA network: paper parameter counts, VGG-16 ImageNet loading, stage chaining, memory validity."""

import pytest
import torch

from dpa.errors import DpaError
from dpa.training import attention
from dpa.training.config import PRESETS, get_config
from dpa.training.model import (
    MODALITIES,
    VGG16_CHANNELS,
    VGG16_CONV_INDICES,
    build_model,
    count_parameters,
)

# Paper Table 2 (millions of parameters).
PAPER_PARAMETERS = {"paper-i": 39.5, "paper-ii": 41.5, "paper-iii": 40.5, "paper-iv": 43.5}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_parameter_count_matches_paper_table_2(name):
    parameters = count_parameters(build_model(get_config(name), seed=None)) / 1e6
    assert abs(parameters - PAPER_PARAMETERS[name]) / PAPER_PARAMETERS[name] <= 0.015, parameters


def test_presets_cover_the_ablation_table():
    versions = [f"paper-{v}" for v in "i ii iii iv v vi vii viii ix x xi".split()]
    assert all(v in PRESETS for v in versions)
    assert [PRESETS[v].memory for v in versions[7:]] == [1, 2, 3, 5]
    assert {(PRESETS[v].ima, PRESETS[v].ifa) for v in versions[:7]} == {
        ("off", "off"), ("prototype", "off"), ("off", "prototype"), ("prototype", "prototype"),
        ("plain", "prototype"), ("prototype", "plain"), ("plain", "plain"),
    }


def torchvision_vgg16_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    """A hand-built state dict in torchvision's VGG-16 `features.<i>` layout with distinct values."""
    generator = torch.Generator().manual_seed(seed)
    state, inputs = {}, 3
    for indices, channels in zip(VGG16_CONV_INDICES, VGG16_CHANNELS, strict=True):
        for index, outputs in zip(indices, channels, strict=True):
            state[f"features.{index}.weight"] = torch.randn(outputs, inputs, 3, 3, generator=generator)
            state[f"features.{index}.bias"] = torch.full((outputs,), float(index))
            inputs = outputs
    # torchvision's classifier entries are present in real files and must be ignored.
    state["classifier.0.weight"] = torch.zeros(4096, 25088)
    return state


def test_torchvision_vgg16_layout_loads_into_both_encoders():
    model = build_model(get_config("paper-i"), seed=None)
    state = torchvision_vgg16_state_dict()
    for m in MODALITIES:
        model.encoders[m].load_torchvision_state_dict(state)
    flat_indices = [i for block in VGG16_CONV_INDICES for i in block]
    for m in MODALITIES:
        convs = model.encoders[m].convolutions()
        assert len(convs) == 13
        for index, conv in zip(flat_indices, convs, strict=True):
            assert torch.equal(conv.weight, state[f"features.{index}.weight"])
            assert torch.equal(conv.bias, torch.full_like(conv.bias, float(index)))


def test_vgg16_loader_reports_missing_keys_and_width_mismatch():
    tiny = build_model(get_config("tiny"))
    with pytest.raises(DpaError, match="width multiplier 1"):
        tiny.encoders["appearance"].load_torchvision_state_dict(torchvision_vgg16_state_dict())
    state = torchvision_vgg16_state_dict()
    del state["features.28.bias"]
    with pytest.raises(DpaError, match="lacks 1 keys"):
        build_model(get_config("paper-i")).encoders["motion"].load_torchvision_state_dict(state)


def _tiny(name="tiny", **changes):
    return build_model(get_config(name).replace(size=64, **changes), seed=1).eval()


def test_forward_outputs_and_feature_taps():
    model = _tiny()
    rgb = torch.randn(2, 3, 64, 64)
    encoded = model.encode(rgb, rgb)
    strides = [s.shape[-1] for s in encoded.skips] + [encoded.f4["motion"].shape[-1], encoded.f5["motion"].shape[-1]]
    assert strides == [64, 32, 16, 8, 4]
    logits = model(rgb, rgb, torch.randn(2, 4, 3, 64, 64), torch.randn(2, 4, 3, 64, 64))
    assert sorted(logits) == ["p1", "p2", "p3", "p4"]
    assert all(v.shape == (2, 1, 64, 64) for v in logits.values())


@torch.no_grad()
def test_stage_chaining_equals_forward():
    model = _tiny()
    generator = torch.Generator().manual_seed(0)
    rgb, flow = torch.randn(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    refs_rgb = torch.randn(1, 3, 3, 64, 64, generator=generator)
    refs_flow = torch.rand(1, 3, 3, 64, 64, generator=generator)
    expected = model(rgb, flow, refs_rgb, refs_flow)["p1"]
    entries = [model.memory_entry(model.encode(refs_rgb[:, i], refs_flow[:, i]).f5) for i in range(3)]
    memory = {m: tuple(torch.stack([e[m][j] for e in entries], 1) for j in range(2)) for m in MODALITIES}
    encoded = model.encode(rgb, flow)
    staged = model.decode(encoded, model.ima_block5(encoded.f5), memory, torch.ones(1, 3, dtype=torch.bool))["p1"]
    torch.testing.assert_close(staged, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ifa", ["prototype", "plain"])
@torch.no_grad()
def test_invalid_memory_slots_are_exactly_ignored(ifa):
    model = _tiny(ifa=ifa, memory=4)
    generator = torch.Generator().manual_seed(2)
    rgb, flow = torch.randn(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    refs = [model.memory_entry(model.encode(torch.randn(1, 3, 64, 64, generator=generator), flow).f5) for _ in range(4)]
    encoded = model.encode(rgb, flow)
    ima5 = model.ima_block5(encoded.f5)
    for k in range(1, 5):
        alone = {m: tuple(torch.stack([r[m][j] for r in refs[:k]], 1) for j in range(2)) for m in MODALITIES}
        # Fill the k..N-1 slots with garbage and mark them invalid.
        padded = {
            m: tuple(torch.cat([t, 1e3 * torch.randn(1, 4 - k, *t.shape[2:])], 1) for t in alone[m]) for m in MODALITIES
        }
        valid = torch.tensor([[True] * k + [False] * (4 - k)])
        reference = model.decode(encoded, ima5, alone, torch.ones(1, k, dtype=torch.bool))["p1"]
        masked = model.decode(encoded, ima5, padded, valid)["p1"]
        assert (reference - masked).abs().max().item() <= 1e-5


def test_soft_region_detach_switch_controls_gradient():
    features = torch.randn(1, 4, 9, requires_grad=True)
    attention.prototypes(features, detach_soft_regions=True).sum().backward()
    detached = features.grad.clone()
    features.grad = None
    attention.prototypes(features, detach_soft_regions=False).sum().backward()
    # With S detached, d(sum P)/dX[c, p] = sum_j S[j, p]; through S the gradient changes.
    regions = torch.softmax(features.detach(), dim=-1)
    torch.testing.assert_close(detached, regions.sum(1, keepdim=True).expand(1, 4, 9))
    assert (features.grad - detached).abs().max() > 1e-3


def test_prototypes_and_correlation_by_hand():
    # Two channels over three pixels; channel 0 is flat (uniform soft region), channel 1 peaks hard.
    x = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 100.0]]])
    tokens = attention.prototypes(x)
    torch.testing.assert_close(tokens, torch.tensor([[[0.0, 100 / 3], [0.0, 100.0]]]))
    psi = attention.correlation(tokens, x)
    # Pixels 0 and 1 are zero vectors: cosine 0. Pixel 2 = (0, 100) is parallel to both prototypes.
    torch.testing.assert_close(psi, torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]]))
