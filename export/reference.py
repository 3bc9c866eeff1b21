"""NumPy reference of the custom prototype-attention ops (SPEC §2.3–2.5, §4.2): the single source of truth.

Every test of these ops (PyTorch composition, ONNX functions, CUDA kernels, TensorRT plugins) compares
against the functions here. They take float arrays of any precision, compute in float64 and return float64
(the exact result of the op on those inputs); cast the result to compare with a lower-precision output.

Layouts are row-major: feature maps flattened to (B, C, HW); prototype tokens (B, P, C), row j = prototype j.
Every softmax subtracts its maximum. `OP_SPECS` describes each custom op as exported to ONNX (domain
`trt.plugins`) and implemented by the plugins in `export/plugins/`: inputs, outputs, attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpa.constants import L2_EPSILON

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""


def _float64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _l2_normalize(array: np.ndarray, axis: int, epsilon: float) -> np.ndarray:
    """x / max(||x||_2, epsilon) along `axis` (torch.nn.functional.normalize)."""
    norm = np.sqrt(np.sum(array * array, axis=axis, keepdims=True))
    return array / np.maximum(norm, epsilon)


def soft_regions(features: np.ndarray) -> np.ndarray:
    """Eq. 1: softmax over the HW positions of each channel. (B, C, HW) -> (B, C, HW), rows sum to 1."""
    return _softmax(_float64(features), axis=-1)


def prototypes(features: np.ndarray) -> np.ndarray:
    """Op `DpaPrototypes` (Eq. 2). features X (B, C, HW) -> prototype tokens P (B, C, C).

    P[b, j, :] = sum_p S[b, j, p] * X[b, :, p] with S = soft_regions(X): token j is the S_j-weighted mean
    of the pixel features (C prototypes of C features each).
    """
    x = _float64(features)
    return np.matmul(soft_regions(x), np.swapaxes(x, 1, 2))


def correlation(prototype_tokens: np.ndarray, features: np.ndarray, epsilon: float = L2_EPSILON) -> np.ndarray:
    """Eq. 3 / 11: cosine similarity of every prototype with every pixel feature.

    prototype_tokens (B, P, C), features (B, C, HW) -> (B, P, HW) in [-1, 1]. Normalisation is
    x / max(||x||_2, epsilon) over the feature axis, so an all-zero token or pixel gives 0, never NaN.
    """
    tokens = _l2_normalize(_float64(prototype_tokens), axis=2, epsilon=epsilon)
    pixels = _l2_normalize(_float64(features), axis=1, epsilon=epsilon)
    return np.matmul(tokens, pixels)


def prototype_correlation(features: np.ndarray, epsilon: float = L2_EPSILON) -> np.ndarray:
    """Op `DpaPrototypeCorrelation` (IMA step 2). features X (B, C, HW) -> Psi (B, C, HW).

    Psi[b, j, p] = cos(P[b, j, :], X[b, :, p]) with P = prototypes(X).
    """
    return correlation(prototypes(features), features, epsilon)


def cross_modal_attention(
    key_appearance: np.ndarray,
    key_motion: np.ndarray,
    value_appearance: np.ndarray,
    value_motion: np.ndarray,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Op `DpaCrossModalAttention` (IMA steps 4-5). K_A, K_M, V_A, V_M (B, D, HW) -> T_A, T_M (B, D, HW).

    Phi = K_A K_M^T * scale (B, D, D); T_A = softmax_rows(Phi) V_M; T_M = softmax_rows(Phi^T) V_A.
    scale None: 1 / sqrt(HW), the model's value.
    """
    key_a, key_m = _float64(key_appearance), _float64(key_motion)
    if scale is None:
        scale = 1.0 / math.sqrt(key_a.shape[-1])
    affinity = np.matmul(key_a, np.swapaxes(key_m, 1, 2)) * scale
    to_appearance = np.matmul(_softmax(affinity, axis=2), _float64(value_motion))
    to_motion = np.matmul(_softmax(np.swapaxes(affinity, 1, 2), axis=2), _float64(value_appearance))
    return to_appearance, to_motion


def memory_read(
    query_tokens: np.ndarray,
    memory_keys: np.ndarray,
    memory_values: np.ndarray,
    valid: np.ndarray,
    scale: float | None = None,
) -> np.ndarray:
    """IFA read (Eq. 9-10): attention of query tokens over the tokens of N memory slots.

    query_tokens (B, Q, D); memory_keys, memory_values (B, N, T, D); valid (B, N), nonzero = valid.
    Returns (B, Q, D) = softmax_rows(Q K^T * scale) V over the N*T memory tokens, where the tokens of
    invalid slots get exactly zero weight (k valid of N slots equal those k slots alone). scale None:
    1 / sqrt(D). A batch item without any valid slot reads zeros (the model leaves it undefined; the CUDA
    kernel also writes zeros).
    """
    batch, slots, tokens, dim = memory_keys.shape
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    keys = _float64(memory_keys).reshape(batch, slots * tokens, dim)
    values = _float64(memory_values).reshape(batch, slots * tokens, dim)
    token_valid = np.repeat(np.asarray(valid) != 0, tokens, axis=1)  # (B, N*T)
    # Invalid slots are skipped, not multiplied by a zero weight: garbage (NaN, Inf) there cannot leak.
    keys = np.where(token_valid[:, :, None], keys, 0.0)
    values = np.where(token_valid[:, :, None], values, 0.0)
    logits = np.matmul(_float64(query_tokens), np.swapaxes(keys, 1, 2)) * scale
    logits = np.where(token_valid[:, None, :], logits, -np.inf)
    row_max = logits.max(axis=2, keepdims=True)  # -inf when no slot is valid
    weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))  # exactly 0 where invalid
    total = weights.sum(axis=2, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.matmul(weights, values)


def prototype_memory_read(
    features: np.ndarray,
    memory_keys: np.ndarray,
    memory_values: np.ndarray,
    valid: np.ndarray,
    scale: float | None = None,
    epsilon: float = L2_EPSILON,
) -> np.ndarray:
    """Op `DpaPrototypeMemoryRead` (IFA, Eq. 9-11). Returns Psi2 (B, D, HW).

    features X^ = sq5(X) (B, D, HW); memory_keys, memory_values (B, N, T, D) (prototype tokens of the
    reference frames, T = D in the model); valid (B, N), nonzero = valid.
    Q = prototypes(X^) (B, D, D); R = memory_read(Q, K, V, valid, scale) (B, D, D);
    Psi2 = correlation(R, X^, epsilon). scale None: 1 / sqrt(D). No valid slot: R = 0, so Psi2 = 0.
    """
    read = memory_read(prototypes(features), memory_keys, memory_values, valid, scale)
    return correlation(read, features, epsilon)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a custom op: its name and symbolic shape, e.g. ("B", "C", "HW")."""

    name: str
    shape: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of a custom op (= one PluginField of its TensorRT plugin).

    default None: optional, derived from the input shapes as `description` says.
    """

    name: str
    type: str  # ONNX attribute type: "float"
    default: float | None
    description: str


@dataclass(frozen=True)
class OpSpec:
    """A custom op in domain `trt.plugins`: op type = TensorRT plugin name, version "1", namespace ""."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttributeSpec, ...]
    reference: Callable[..., np.ndarray | tuple[np.ndarray, ...]]
    description: str
    domain: str = PLUGIN_DOMAIN
    version: str = PLUGIN_VERSION
    namespace: str = PLUGIN_NAMESPACE

    def attribute_defaults(self) -> dict[str, float | None]:
        """Attribute name -> default (None: derived from the shapes when absent)."""
        return {attribute.name: attribute.default for attribute in self.attributes}


_EPSILON = AttributeSpec("epsilon", "float", L2_EPSILON, "L2 normalisation floor: x / max(||x||_2, epsilon)")

OP_SPECS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            name="DpaPrototypes",
            inputs=(TensorSpec("features", ("B", "C", "HW"), "feature map X, flattened"),),
            outputs=(TensorSpec("prototypes", ("B", "C", "C"), "prototype tokens P, row j = prototype j"),),
            attributes=(),
            reference=prototypes,
            description="P = softmax_HW(X) X^T (Eq. 1-2)",
        ),
        OpSpec(
            name="DpaPrototypeCorrelation",
            inputs=(TensorSpec("features", ("B", "C", "HW"), "feature map X, flattened"),),
            outputs=(TensorSpec("correlation", ("B", "C", "HW"), "Psi, cosine of prototype j and pixel p"),),
            attributes=(_EPSILON,),
            reference=prototype_correlation,
            description="Psi = N(P) N(X) with P = prototypes(X) (Eq. 3)",
        ),
        OpSpec(
            name="DpaCrossModalAttention",
            inputs=(
                TensorSpec("key_appearance", ("B", "D", "HW"), "K_A"),
                TensorSpec("key_motion", ("B", "D", "HW"), "K_M"),
                TensorSpec("value_appearance", ("B", "D", "HW"), "V_A"),
                TensorSpec("value_motion", ("B", "D", "HW"), "V_M"),
            ),
            outputs=(
                TensorSpec("to_appearance", ("B", "D", "HW"), "T_A = softmax_rows(Phi) V_M"),
                TensorSpec("to_motion", ("B", "D", "HW"), "T_M = softmax_rows(Phi^T) V_A"),
            ),
            attributes=(
                AttributeSpec("scale", "float", None, "Phi = K_A K_M^T * scale; absent: 1/sqrt(HW) (the model)"),
            ),
            reference=cross_modal_attention,
            description="IMA cross-modal attention (SPEC §2.4 steps 4-5)",
        ),
        OpSpec(
            name="DpaPrototypeMemoryRead",
            inputs=(
                TensorSpec("features", ("B", "D", "HW"), "query features X^ = sq5(X)"),
                TensorSpec("memory_keys", ("B", "N", "T", "D"), "key prototype tokens of N slots"),
                TensorSpec("memory_values", ("B", "N", "T", "D"), "value prototype tokens of N slots"),
                TensorSpec("valid", ("B", "N"), "slot validity, 0 or 1 (nonzero = valid)"),
            ),
            outputs=(TensorSpec("correlation", ("B", "D", "HW"), "Psi2 = correlation(R, X^)"),),
            attributes=(
                AttributeSpec("scale", "float", None, "logits = Q K^T * scale; absent: 1/sqrt(D) (the model)"),
                _EPSILON,
            ),
            reference=prototype_memory_read,
            description="IFA memory read with prototype query and correlation (SPEC §2.5, Eq. 9-11)",
        ),
    )
}
