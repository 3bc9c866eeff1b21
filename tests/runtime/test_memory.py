"""Memory bank admission policies: the paper's offline sampling and the live uniform policy."""

import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.runtime.memory import OfflinePolicy, UniformPolicy, mask_confidence
from dpa.sampling import frames_for_references


def test_offline_sampling_formula():
    assert frames_for_references(50, 4) == [0, 16, 32, 49]
    assert frames_for_references(10, 5) == [0, 2, 4, 6, 9]
    assert frames_for_references(7, 1) == [0]
    assert frames_for_references(2, 4) == [0, 0, 0, 1]  # L < N repeats frames, as the paper's code
    for length in range(1, 40):
        for capacity in range(1, 7):
            expected = [0] if capacity == 1 else [i * (length - 1) // (capacity - 1) for i in range(capacity)]
            assert frames_for_references(length, capacity) == expected


def test_offline_policy_slots():
    policy = OfflinePolicy(length=3, capacity=4)
    assert policy.references == [0, 0, 1, 2]  # floor(i * 2 / 3)
    assert policy.slots_of(0) == [0, 1]
    assert policy.slots_of(1) == [2] and policy.slots_of(2) == [3]


def _admitted(policy, frames, confidences=None):
    admitted = []
    for frame in range(frames):
        confidence = None if confidences is None else confidences[frame]
        decision = policy.consider(frame, confidence)
        if decision is not None:
            admitted.append((frame, decision.slot))
    return admitted


def test_uniform_policy_spacing_and_fixed_capacity():
    policy = UniformPolicy(capacity=4, horizon=20)
    assert policy.stride == 5
    admitted = _admitted(policy, 43)
    assert [frame for frame, _ in admitted] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    # The first four fill slots 0..3, then each admission replaces the oldest entry.
    assert [slot for _, slot in admitted] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert sorted(policy.slot_frames) == [25, 30, 35, 40]  # evenly spaced, within the last 20 frames
    assert len(policy.slot_frames) == 4


def test_uniform_policy_horizon_shorter_than_capacity_admits_every_frame():
    policy = UniformPolicy(capacity=4, horizon=3)
    assert policy.stride == 1
    assert [frame for frame, _ in _admitted(policy, 6)] == [0, 1, 2, 3, 4, 5]
    assert sorted(policy.slot_frames) == [2, 3, 4, 5]


def test_uniform_policy_gating_defers_to_the_next_confident_frame():
    policy = UniformPolicy(capacity=2, horizon=4, min_confidence=0.8)
    confidences = [0.9, 0.9, 0.6, 0.7, 0.95, 0.9, 0.9, 0.9]
    admitted = _admitted(policy, 8, confidences)
    # stride 2: frame 0 admitted; frames 2 and 3 are due but unsure; frame 4 is admitted; then 6.
    assert [frame for frame, _ in admitted] == [0, 4, 6]
    assert policy.rejected == 2


def test_uniform_policy_reset_and_bad_settings():
    policy = UniformPolicy(capacity=2, horizon=4)
    _admitted(policy, 5)
    policy.reset()
    assert policy.slot_frames == [None, None]
    assert policy.consider(5).slot == 0  # the first frame after a reset is always admitted
    with pytest.raises(DpaError):
        UniformPolicy(capacity=0, horizon=4)
    with pytest.raises(DpaError):
        UniformPolicy(capacity=2, horizon=4, min_confidence=0.3)


def test_mask_confidence():
    assert mask_confidence(np.array([0.0, 1.0])) == 1.0
    assert mask_confidence(np.full((4, 4), 0.5)) == 0.5
    assert mask_confidence(np.array([0.9, 0.2])) == pytest.approx(0.85)
