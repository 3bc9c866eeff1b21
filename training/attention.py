"""Prototype operations of DPA in PyTorch (SPEC §2.3–2.5), as small pure functions.

Layouts: feature maps are flattened to (B, C, HW). Prototypes are returned as *tokens*, (B, P, C): row j is
prototype j, the S_j-weighted mean of the pixel features (P = C prototypes, one per soft region).
Every softmax subtracts the maximum (torch does) and accumulates in fp32: inputs of lower precision
are promoted, the result is cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpa.constants import L2_EPSILON


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_regions(features: torch.Tensor) -> torch.Tensor:
    """Eq. 1: softmax over the HW positions, separately per channel. (B, C, HW) -> (B, C, HW)."""
    return torch.softmax(_fp32(features), dim=-1)


def prototypes(features: torch.Tensor, detach_soft_regions: bool = True) -> torch.Tensor:
    """Eq. 2: prototype tokens. (B, C, HW) -> (B, C, C); token j = sum_p S_j[p] * X[:, p]."""
    x = _fp32(features)
    regions = soft_regions(x)
    if detach_soft_regions:
        regions = regions.detach()
    return torch.bmm(regions, x.transpose(1, 2)).to(features.dtype)


def correlation(prototype_tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Eq. 3 / 11: cosine similarity of every prototype with every pixel feature.

    prototype_tokens (B, P, C), features (B, C, HW) -> (B, P, HW) in [-1, 1].
    N(.) is L2 normalisation over the feature axis: x / max(||x||, 1e-6).
    """
    tokens = F.normalize(_fp32(prototype_tokens), dim=2, eps=L2_EPSILON)
    pixels = F.normalize(_fp32(features), dim=1, eps=L2_EPSILON)
    return torch.bmm(tokens, pixels).to(features.dtype)


def prototype_correlation(features: torch.Tensor, detach_soft_regions: bool = True) -> torch.Tensor:
    """Prototypes of a feature map correlated with the same map: (B, C, HW) -> (B, C, HW) (IMA step 2)."""
    return correlation(prototypes(features, detach_soft_regions), features)


def cross_modal_attention(
    key_appearance: torch.Tensor,
    key_motion: torch.Tensor,
    value_appearance: torch.Tensor,
    value_motion: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMA steps 4–5. Keys and values (B, D, HW) -> (T_appearance, T_motion), each (B, D, HW).

    Phi = K_A K_M^T / sqrt(HW); T_A = softmax_rows(Phi) V_M; T_M = softmax_rows(Phi^T) V_A.
    """
    positions = key_appearance.shape[-1]
    affinity = torch.bmm(_fp32(key_appearance), _fp32(key_motion).transpose(1, 2)) / math.sqrt(positions)
    to_appearance = torch.bmm(torch.softmax(affinity, dim=2), _fp32(value_motion))
    to_motion = torch.bmm(torch.softmax(affinity.transpose(1, 2), dim=2), _fp32(value_appearance))
    return to_appearance.to(key_appearance.dtype), to_motion.to(key_appearance.dtype)


def memory_read(
    query: torch.Tensor, memory_keys: torch.Tensor, memory_values: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """IFA read (Eq. 9–10): attention of query tokens over the tokens of N memory slots.

    query (B, T, D); memory_keys, memory_values (B, N, T_m, D); valid (B, N) bool or 0/1.
    Returns (B, T, D) = softmax_rows(Q K^T / sqrt(D)) V over the valid slots only: invalid slots get
    exactly zero weight, so k valid of N slots equal the k references alone. At least one slot must be valid.
    """
    batch, slots, tokens, dim = memory_keys.shape
    keys = _fp32(memory_keys).reshape(batch, slots * tokens, dim)
    values = _fp32(memory_values).reshape(batch, slots * tokens, dim)
    logits = torch.bmm(_fp32(query), keys.transpose(1, 2)) / math.sqrt(dim)
    token_valid = valid.to(torch.bool).repeat_interleave(tokens, dim=1)[:, None, :]
    logits = logits.masked_fill(~token_valid, float("-inf"))
    return torch.bmm(torch.softmax(logits, dim=2), values).to(query.dtype)


def prototype_memory_read(
    features: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    valid: torch.Tensor,
    detach_soft_regions: bool = True,
) -> torch.Tensor:
    """IFA steps 1, 3 and 4 fused (the `DpaPrototypeMemoryRead` op): query prototypes read the memory,
    the read prototypes are correlated with the query's pixels.

    features = sq5(X) flattened (B, D, HW); memory (B, N, D, D) prototype tokens; valid (B, N).
    Returns Psi2 (B, D, HW).
    """
    query = prototypes(features, detach_soft_regions)
    return correlation(memory_read(query, memory_keys, memory_values, valid), features)
