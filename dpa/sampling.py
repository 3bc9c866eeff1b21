"""The paper's reference sampling (SPEC §3): which N frames of a video of L frames fill the IFA memory offline.

Torch-free; offline inference, `dpa check`, `dpa compare` and the runtime's offline policy all use it.
"""

from __future__ import annotations

import math


def frames_for_references(length: int, memory: int) -> list[int]:
    """The paper's reference sampling over a video of `length` frames: k_i = floor(i (L-1) / (N-1)).

    Returns N frame indices, slot i holding frame k_i (repeats when L < N, as in the paper's code).
    """
    if length < 1 or memory < 1:
        raise ValueError(f"need a video of at least one frame and a memory of at least one slot, "
                         f"got length {length}, memory {memory}")
    if memory == 1:
        return [0]
    return [math.floor(i * (length - 1) / (memory - 1)) for i in range(memory)]
