"""The dpa:: custom ops: same numbers as the model's PyTorch functions, swapped in only while exporting, and
translated to one `trt.plugins` node each."""

from __future__ import annotations

import math

import onnx
import pytest
import torch

from dpa.export import ops
from dpa.export.reference import PLUGIN_DOMAIN
from dpa.training import attention
from dpa.training.config import get_config
from dpa.training.model import build_model

SWAPPED = ("prototypes", "prototype_correlation", "cross_modal_attention", "prototype_memory_read")


def test_custom_ops_compute_what_the_model_computes():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 30, generator=generator)
    keys = [torch.randn(2, 8, 30, generator=generator) for _ in range(4)]
    memory = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    valid = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(torch.ops.dpa.prototypes(x), attention.prototypes(x))
    assert torch.equal(torch.ops.dpa.prototype_correlation(x, 1e-6), attention.prototype_correlation(x))
    for actual, expected in zip(torch.ops.dpa.cross_modal_attention(*keys, 1 / math.sqrt(30)),
                                attention.cross_modal_attention(*keys), strict=True):
        assert torch.equal(actual, expected)
    assert torch.equal(
        torch.ops.dpa.prototype_memory_read(x, *memory, valid, 1 / math.sqrt(8), 1e-6),
        attention.prototype_memory_read(x, *memory, valid.bool()),
    )
    with pytest.raises(ValueError, match="scale"):
        torch.ops.dpa.cross_modal_attention(*keys, 0.5)


def test_swap_is_scoped_to_the_block():
    originals = {name: getattr(attention, name) for name in SWAPPED}
    with pytest.raises(RuntimeError):
        with ops.custom_ops():
            assert all(getattr(attention, name) is not originals[name] for name in SWAPPED)
            raise RuntimeError("export failed")
    assert all(getattr(attention, name) is originals[name] for name in SWAPPED)


def test_model_inside_the_swap_gives_the_same_outputs():
    config = get_config("tiny", size=64, memory=2)
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(1)
    rgb, flow = torch.randn(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    references = torch.randn(1, 2, 3, 64, 64, generator=generator), torch.rand(1, 2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = model(rgb, flow, *references)
        with ops.custom_ops():
            actual = model(rgb, flow, *references)
    for name in expected:
        assert torch.equal(actual[name], expected[name])


class _TwoOps(torch.nn.Module):
    input_names = ("x", "keys", "values", "valid")
    output_names = ("psi", "psi2")

    def forward(self, x, keys, values, valid):
        psi = attention.prototype_correlation(x)
        return psi, attention.prototype_memory_read(psi, keys, values, valid)


def test_translation_writes_one_custom_node_per_op(tmp_path):
    from dpa.export.exporter import _torch_export

    example = (torch.randn(1, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.ones(1, 2))
    model = _torch_export(_TwoOps(), example, opset=18)
    custom = [node for node in model.graph.node if node.domain == PLUGIN_DOMAIN]
    assert [node.op_type for node in custom] == ["DpaPrototypeCorrelation", "DpaPrototypeMemoryRead"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in custom]
    assert attributes[0] == {"plugin_version": b"1", "epsilon": pytest.approx(1e-6)}
    assert attributes[1] == {"plugin_version": b"1", "epsilon": pytest.approx(1e-6),
                             "scale": pytest.approx(1 / math.sqrt(8))}
    assert any(entry.domain == PLUGIN_DOMAIN for entry in model.opset_import)
