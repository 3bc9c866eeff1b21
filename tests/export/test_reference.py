"""The NumPy reference of the prototype-attention ops equals the PyTorch model's composition (fp32, 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpa.export import reference
from dpa.training import attention

TOLERANCE = 1e-6  # relative to the largest magnitude of the reference result


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (scale-aware; correlations cross zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all() and np.isfinite(expected).all()
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def features(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """fp32 test inputs: "normal" N(0, 1); "zero_channels" with every third channel all zero (and one zero
    pixel column when the map is (B, C, HW)); "large" uniform in [-1e4, 1e4]."""
    rng = np.random.default_rng(seed)
    if kind == "large":
        return rng.uniform(-1e4, 1e4, shape).astype(np.float32)
    array = rng.standard_normal(shape).astype(np.float32)
    if kind == "zero_channels":
        array[:, ::3] = 0.0
        if array.ndim == 3:
            array[:, :, 1] = 0.0
    return array


KINDS = ["normal", "zero_channels", "large"]
SHAPES = [(2, 16, 64), (1, 32, 484)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_prototypes(kind, shape):
    x = features(kind, shape, seed=1)
    expected = reference.prototypes(x)
    assert expected.shape == (shape[0], shape[1], shape[1])
    assert relative_error(attention.prototypes(torch.from_numpy(x)).numpy(), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_correlation_and_prototype_correlation(kind, shape):
    x = features(kind, shape, seed=2)
    tokens = features(kind, (shape[0], 8, shape[1]), seed=3)
    expected = reference.correlation(tokens, x)
    actual = attention.correlation(torch.from_numpy(tokens), torch.from_numpy(x)).numpy()
    assert relative_error(actual, expected) <= TOLERANCE
    expected = reference.prototype_correlation(x)
    assert expected.shape == shape
    assert np.abs(expected).max() <= 1.0 + 1e-12
    actual = attention.prototype_correlation(torch.from_numpy(x)).numpy()
    assert relative_error(actual, expected) <= TOLERANCE


def test_correlation_of_zero_vectors_is_zero():
    x = np.zeros((1, 4, 6), np.float32)
    x[0, :, 0] = [3.0, 4.0, 0.0, 0.0]
    tokens = np.zeros((1, 2, 4), np.float32)
    tokens[0, 0] = [0.0, 2.0, 0.0, 0.0]
    psi = reference.correlation(tokens, x)
    assert psi[0, 0, 0] == pytest.approx(0.8)  # cos((0,2,0,0), (3,4,0,0)) = 8 / (2 * 5)
    assert np.count_nonzero(psi) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_modal_attention(kind, shape):
    k_a, k_m, v_a, v_m = (features(kind, shape, seed=10 + i) for i in range(4))
    expected = reference.cross_modal_attention(k_a, k_m, v_a, v_m)
    explicit = reference.cross_modal_attention(k_a, k_m, v_a, v_m, scale=1.0 / math.sqrt(shape[2]))
    actual = attention.cross_modal_attention(*(torch.from_numpy(t) for t in (k_a, k_m, v_a, v_m)))
    for got, want, same in zip(actual, expected, explicit, strict=True):
        assert want.shape == shape
        np.testing.assert_array_equal(want, same)
        assert relative_error(got.numpy(), want) <= TOLERANCE


def memory(kind: str, batch: int, slots: int, tokens: int, dim: int, seed: int):
    keys = features(kind, (batch, slots, tokens, dim), seed)
    values = features(kind, (batch, slots, tokens, dim), seed + 1)
    valid = np.ones((batch, slots), np.float32)
    valid[0, 1] = 0.0
    if slots > 3:
        valid[-1, 3] = 0.0
    return keys, values, valid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,dim,positions,slots", [(2, 16, 64, 4), (1, 32, 484, 2)])
def test_memory_read_and_prototype_memory_read(kind, batch, dim, positions, slots):
    x = features(kind, (batch, dim, positions), seed=20)
    keys, values, valid = memory(kind, batch, slots, dim, dim, seed=21)
    query = reference.prototypes(x).astype(np.float32)
    as_torch = [torch.from_numpy(a) for a in (keys, values, valid)]
    expected = reference.memory_read(query, keys, values, valid)
    actual = attention.memory_read(torch.from_numpy(query), *as_torch).numpy()
    assert relative_error(actual, expected) <= TOLERANCE

    expected = reference.prototype_memory_read(x, keys, values, valid)
    assert expected.shape == x.shape
    x_torch = torch.from_numpy(x)
    actual = attention.correlation(attention.memory_read(attention.prototypes(x_torch), *as_torch), x_torch)
    assert relative_error(actual.numpy(), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_slots_are_exactly_ignored(kind):
    x = features(kind, (2, 16, 64), seed=30)
    keys, values, _ = memory(kind, 2, 5, 16, 16, seed=31)
    valid = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)
    with_empty_slots = reference.prototype_memory_read(x, keys, values, valid)
    for b, kept in enumerate(([0, 2], [3, 4])):
        alone = reference.prototype_memory_read(
            x[b : b + 1], keys[b : b + 1, kept], values[b : b + 1, kept], np.ones((1, len(kept)), np.float32)
        )
        assert relative_error(with_empty_slots[b : b + 1], alone) <= TOLERANCE
    # Garbage (NaN, Inf) in an invalid slot does not leak into the result.
    keys[0, 1], values[0, 3], values[1, 0], keys[1, 2] = np.nan, np.nan, np.inf, -np.inf
    np.testing.assert_array_equal(reference.prototype_memory_read(x, keys, values, valid), with_empty_slots)


def test_memory_without_valid_slot_reads_zeros():
    x = features("normal", (1, 8, 16), seed=40)
    keys, values, _ = memory("normal", 1, 2, 8, 8, seed=41)
    psi = reference.prototype_memory_read(x, keys, values, np.zeros((1, 2), np.float32))
    np.testing.assert_array_equal(psi, np.zeros_like(psi))


def test_op_specs_describe_the_reference():
    sizes = {"B": 2, "C": 8, "D": 8, "HW": 12, "N": 3, "T": 8}
    assert list(reference.OP_SPECS) == [
        "DpaPrototypes",
        "DpaPrototypeCorrelation",
        "DpaCrossModalAttention",
        "DpaPrototypeMemoryRead",
    ]
    for name, spec in reference.OP_SPECS.items():
        assert (spec.name, spec.domain, spec.version, spec.namespace) == (name, "trt.plugins", "1", "")
        inputs = [features("normal", tuple(sizes[d] for d in tensor.shape), seed=50) for tensor in spec.inputs]
        result = spec.reference(*inputs, **spec.attribute_defaults())
        outputs = result if isinstance(result, tuple) else (result,)
        assert [o.shape for o in outputs] == [tuple(sizes[d] for d in t.shape) for t in spec.outputs]
    assert reference.OP_SPECS["DpaPrototypeMemoryRead"].attribute_defaults() == {
        "scale": None,
        "epsilon": 1e-6,
    }


REAL_FP64_TOLERANCE = 1e-12  # the same math: torch in float64 and the reference agree to rounding
EPSILON = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _check_real(torch_op, reference_op, inputs: list[torch.Tensor], largest_logit: float, **attributes) -> int:
    """Compare an op on real features: fp32 torch vs the reference within 1e-6, float64 torch within 1e-12
    (the same math) — or, where a softmax sees large logits, within what the precision can resolve: a logit
    of magnitude L carries L * epsilon of rounding, which the softmax passes on (x 16 margin)."""
    expected = reference_op(*(t.numpy() for t in inputs), **attributes)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for precision, floor in ((torch.float32, TOLERANCE), (torch.float64, REAL_FP64_TOLERANCE)):
        tolerance = max(floor, 16 * EPSILON[precision] * largest_logit)
        actual = torch_op(*(t.to(precision) for t in inputs))
        actual = actual if isinstance(actual, tuple) else (actual,)
        for a, e in zip(actual, expected, strict=True):
            assert relative_error(a.numpy(), e) <= tolerance, (torch_op.__name__, precision, tolerance)
    return len(expected)


@torch.no_grad()
def _check_ops_on_real_features(model, davis16) -> int:
    """The ops' inputs as a model really produces them on blackswan frames (DIS flow): IMA4/IMA5 squeezed
    features, IMA keys/values and IFA memory entries. Returns the number of comparisons."""
    from dpa.images import read_rgb
    from dpa.runtime.flow import create_flow_estimator, flow_to_rgb
    from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb
    from dpa.training.model import MODALITIES

    size = model.config.size
    paths = sorted((davis16 / "blackswan" / "JPEGImages").glob("*.jpg"))[:4]
    frames = [read_rgb(p) for p in paths]
    estimator = create_flow_estimator("dis")
    flows = [flow_to_rgb(estimator(a, b)) for a, b in zip(frames, frames[1:] + frames[:1], strict=True)]
    rgb = torch.from_numpy(np.stack([preprocess_rgb(f, size) for f in frames]))
    flow = torch.from_numpy(np.stack([preprocess_flow(f, size) for f in flows]))
    encoded = model.encode(rgb, flow)
    checked = 0
    for block, block_features in (("4", encoded.f4), ("5", encoded.f5)):
        squeeze, ima = getattr(model, f"squeeze{block}"), getattr(model, f"ima{block}")
        squeezed = {m: squeeze[m](block_features[m]).flatten(2) for m in MODALITIES}
        for m in MODALITIES:
            largest = squeezed[m].abs().max().item()  # the soft-region softmax runs on the features themselves
            checked += _check_real(attention.prototypes, reference.prototypes, [squeezed[m]], largest)
            checked += _check_real(attention.prototype_correlation, reference.prototype_correlation, [squeezed[m]],
                                   largest)
        shape = block_features["appearance"].shape
        embedded = {m: attention.prototype_correlation(squeezed[m]).view(shape[0], -1, *shape[2:]) for m in MODALITIES}
        keys = [ima.key[m](embedded[m]).flatten(2) for m in MODALITIES]
        values = [ima.value[m](embedded[m]).flatten(2) for m in MODALITIES]
        scale = 1 / math.sqrt(keys[0].shape[-1])
        largest = (torch.bmm(keys[0], keys[1].transpose(1, 2)).abs().max() * scale).item()
        checked += _check_real(attention.cross_modal_attention, reference.cross_modal_attention, keys + values,
                               largest, scale=scale)
    # IFA: frames 1..3 form the memory of frame 0.
    entries = model.memory_entry({m: encoded.f5[m][1:] for m in MODALITIES})
    for m in MODALITIES:
        memory_keys, memory_values = (t[None] for t in entries[m])  # (1, 3, T, D)
        query = model.squeeze5[m](encoded.f5[m][:1]).flatten(2)
        scale = 1 / math.sqrt(query.shape[1])
        tokens = attention.prototypes(query)
        largest = (torch.bmm(tokens, memory_keys.flatten(1, 2).transpose(1, 2)).abs().max() * scale).item()
        checked += _check_real(attention.prototype_memory_read, reference.prototype_memory_read,
                               [query, memory_keys, memory_values, torch.ones(1, 3)], largest, scale=scale)
    return checked


def test_references_on_real_features_of_the_shipped_tiny_model(davis16):
    from dpa.training.checkpoint import load_model

    assert _check_ops_on_real_features(load_model("tiny")[0], davis16) == 14


@pytest.mark.slow
def test_references_on_real_features_of_a_unit_scaled_paper_network(davis16):
    """The paper network (full width, S = 128) with its seeded initialisation scaled to unit activations on
    the DAVIS dog clip: feature magnitudes ~10, as a trained network has, unlike the scratch-trained tiny."""
    from dpa.export.untrained import calibrated_model
    from dpa.training.config import get_config

    model, _ = calibrated_model(get_config("paper-iv", size=128), clip=davis16 / "dog")
    assert _check_ops_on_real_features(model, davis16) == 14
