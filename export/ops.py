"""The prototype-attention ops as PyTorch custom ops (`dpa::…`) with their ONNX translations, for export only.

The model calls plain PyTorch functions of `dpa.training.attention`; training and inference never see these
ops. While exporting, `custom_ops()` points the four functions the model calls at the custom ops, so
`torch.export` keeps each op as one opaque node, and `translation_table()` turns that node into one ONNX
node of domain `trt.plugins` (op type = TensorRT plugin name, attribute `plugin_version` = "1", the constants
`epsilon` and `scale` as float attributes; `dpa.export.reference.OP_SPECS` is the contract). The eager
implementation of each custom op is the model's own PyTorch function, so a model inside `custom_ops()`
computes exactly what it computes outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from onnx.defs import OpSchema
from onnxscript import values

from dpa.constants import L2_EPSILON
from dpa.export.reference import OP_SPECS, PLUGIN_DOMAIN, PLUGIN_VERSION
from dpa.training import attention

# The model's PyTorch functions, captured before anything can swap them.
_TORCH = {
    name: getattr(attention, name)
    for name in ("prototypes", "prototype_correlation", "cross_modal_attention", "prototype_memory_read")
}


def _require(name: str, value: float, expected: float) -> None:
    """The eager implementations are the model's functions, which use the model's constants only."""
    if not math.isclose(value, expected, rel_tol=1e-9):
        raise ValueError(f"{name} = {value}: the PyTorch implementation computes with {expected}")


def cross_modal_scale(key_appearance: torch.Tensor) -> float:
    """The model's Phi scale for keys (B, D, HW): 1 / sqrt(HW)."""
    return 1.0 / math.sqrt(key_appearance.shape[-1])


def memory_read_scale(memory_keys: torch.Tensor) -> float:
    """The model's IFA logit scale for memory keys (B, N, T, D): 1 / sqrt(D)."""
    return 1.0 / math.sqrt(memory_keys.shape[-1])


@torch.library.custom_op("dpa::prototypes", mutates_args=())
def prototypes(features: torch.Tensor) -> torch.Tensor:
    """`DpaPrototypes`: features (B, C, HW) -> prototype tokens (B, C, C)."""
    return _TORCH["prototypes"](features)


@prototypes.register_fake
def _(features):
    return features.new_empty(features.shape[0], features.shape[1], features.shape[1])


@torch.library.custom_op("dpa::prototype_correlation", mutates_args=())
def prototype_correlation(features: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`DpaPrototypeCorrelation`: features (B, C, HW) -> Psi (B, C, HW)."""
    _require("epsilon", epsilon, L2_EPSILON)
    return _TORCH["prototype_correlation"](features)


@prototype_correlation.register_fake
def _(features, epsilon):
    return torch.empty_like(features)


@torch.library.custom_op("dpa::cross_modal_attention", mutates_args=())
def cross_modal_attention(
    key_appearance: torch.Tensor,
    key_motion: torch.Tensor,
    value_appearance: torch.Tensor,
    value_motion: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`DpaCrossModalAttention`: K_A, K_M, V_A, V_M (B, D, HW) -> T_A, T_M (B, D, HW)."""
    _require("scale", scale, cross_modal_scale(key_appearance))
    return _TORCH["cross_modal_attention"](key_appearance, key_motion, value_appearance, value_motion)


@cross_modal_attention.register_fake
def _(key_appearance, key_motion, value_appearance, value_motion, scale):
    return torch.empty_like(key_appearance), torch.empty_like(key_appearance)


@torch.library.custom_op("dpa::prototype_memory_read", mutates_args=())
def prototype_memory_read(
    features: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    epsilon: float,
) -> torch.Tensor:
    """`DpaPrototypeMemoryRead`: X^ (B, D, HW), memory (B, N, T, D) x2, valid (B, N) float -> Psi2 (B, D, HW)."""
    _require("scale", scale, memory_read_scale(memory_keys))
    _require("epsilon", epsilon, L2_EPSILON)
    return _TORCH["prototype_memory_read"](features, memory_keys, memory_values, valid)


@prototype_memory_read.register_fake
def _(features, memory_keys, memory_values, valid, scale, epsilon):
    return torch.empty_like(features)


# Signature-compatible stand-ins for the dpa.training.attention functions the model calls.
_REPLACEMENTS: dict[str, Callable] = {
    "prototypes": lambda features, detach_soft_regions=True: torch.ops.dpa.prototypes(features),
    "prototype_correlation": lambda features, detach_soft_regions=True: torch.ops.dpa.prototype_correlation(
        features, L2_EPSILON
    ),
    "cross_modal_attention": lambda key_a, key_m, value_a, value_m: torch.ops.dpa.cross_modal_attention(
        key_a, key_m, value_a, value_m, cross_modal_scale(key_a)
    ),
    "prototype_memory_read": lambda features, keys, values, valid, detach_soft_regions=True: (
        torch.ops.dpa.prototype_memory_read(
            features, keys, values, valid.to(features.dtype), memory_read_scale(keys), L2_EPSILON
        )
    ),
}


@contextmanager
def custom_ops() -> Iterator[None]:
    """Within the block, the model's prototype ops are the `dpa::` custom ops (export only).

    Swaps module attributes of `dpa.training.attention`, so it affects every thread of the process: do not
    train or run inference concurrently with an export.
    """
    saved = {name: getattr(attention, name) for name in _REPLACEMENTS}
    try:
        for name, replacement in _REPLACEMENTS.items():
            setattr(attention, name, replacement)
        yield
    finally:
        for name, function in saved.items():
            setattr(attention, name, function)


def _onnx_op(op_type: str) -> values.Op:
    """An onnxscript op of domain `trt.plugins` with a schema built from OP_SPECS[op_type]."""
    spec = OP_SPECS[op_type]
    float_types = ["tensor(float)", "tensor(float16)"]
    schema = OpSchema(
        op_type,
        PLUGIN_DOMAIN,
        1,
        spec.description,
        inputs=[
            OpSchema.FormalParameter(tensor.name, "V" if tensor.name == "valid" else "T", tensor.description)
            for tensor in spec.inputs
        ],
        outputs=[OpSchema.FormalParameter(tensor.name, "T", tensor.description) for tensor in spec.outputs],
        type_constraints=[("T", float_types, "features")]
        + ([("V", float_types, "slot validity")] if any(t.name == "valid" for t in spec.inputs) else []),
        attributes=[OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version")]
        + [OpSchema.Attribute(a.name, OpSchema.AttrType.FLOAT, a.description) for a in spec.attributes],
    )
    return values.Op(values.Opset(PLUGIN_DOMAIN, 1), op_type, schema)


def translation_table() -> dict[Callable, Callable]:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: dpa:: op -> one custom node."""
    nodes = {op_type: _onnx_op(op_type) for op_type in OP_SPECS}

    def prototypes_node(features):
        return nodes["DpaPrototypes"](features, plugin_version=PLUGIN_VERSION)

    def prototype_correlation_node(features, epsilon: float):
        return nodes["DpaPrototypeCorrelation"](features, epsilon=epsilon, plugin_version=PLUGIN_VERSION)

    def cross_modal_attention_node(key_appearance, key_motion, value_appearance, value_motion, scale: float):
        return nodes["DpaCrossModalAttention"](
            key_appearance, key_motion, value_appearance, value_motion, scale=scale, plugin_version=PLUGIN_VERSION
        )

    def prototype_memory_read_node(features, memory_keys, memory_values, valid, scale: float, epsilon: float):
        return nodes["DpaPrototypeMemoryRead"](
            features, memory_keys, memory_values, valid, scale=scale, epsilon=epsilon, plugin_version=PLUGIN_VERSION
        )

    return {
        torch.ops.dpa.prototypes.default: prototypes_node,
        torch.ops.dpa.prototype_correlation.default: prototype_correlation_node,
        torch.ops.dpa.cross_modal_attention.default: cross_modal_attention_node,
        torch.ops.dpa.prototype_memory_read.default: prototype_memory_read_node,
    }
