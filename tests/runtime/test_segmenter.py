"""The segmenter: offline inference through the ONNX Runtime chain equals PyTorch; the live policy fills the bank."""

import numpy as np
import pytest

from dpa.runtime.chain import StageChain
from dpa.runtime.engines import open_engine
from dpa.runtime.flow import create_flow_estimator, live_flow, offline_flow
from dpa.runtime.memory import UniformPolicy
from dpa.runtime.preprocess import postprocess_probability
from dpa.runtime.segmenter import Segmenter, segment_clip_offline
from dpa.synthetic import generate_clip


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@pytest.fixture(scope="module")
def chain(tiny_export):
    return StageChain(open_engine(tiny_export, device="cpu"))


def test_offline_segmentation_equals_pytorch(chain):
    from dpa.runtime.flow import flow_to_rgb
    from dpa.training.checkpoint import load_model
    from dpa.training.inference import OfflinePredictor, preprocess_video

    frames, _ = generate_clip(np.random.default_rng(1234), 10, 160)
    estimator = create_flow_estimator("dis")
    flows = [offline_flow(frames, i, estimator) for i in range(len(frames))]
    results, policy = segment_clip_offline(chain, frames, flows)
    assert policy.references == [0, 3, 6, 9]
    model, _ = load_model("tiny")
    rgb, flow = preprocess_video(frames, [flow_to_rgb(f) for f in flows], model.config.size)
    probabilities = OfflinePredictor(model).predict(rgb, flow)
    for result, probability in zip(results, probabilities, strict=True):
        expected_probability, expected_mask = postprocess_probability(probability, 160, 160)
        assert np.abs(result.probability - expected_probability).max() < 1e-4
        assert _iou(result.mask, expected_mask) >= 0.999
        assert set(result.seconds) >= {"pre", "encoder", "ima", "decoder", "post"}


def test_live_segmentation_admits_frames_on_the_uniform_schedule(chain):
    frames, _ = generate_clip(np.random.default_rng(7), 9, 128)
    segmenter = Segmenter(chain, UniformPolicy(capacity=4, horizon=8))
    estimator = create_flow_estimator("dis")
    previous, admitted, counts = None, [], []
    for index, frame in enumerate(frames):
        result = segmenter.segment(frame, live_flow(previous, frame, estimator), index)
        previous = frame
        counts.append(segmenter.bank.count)
        if result.admitted is not None:
            admitted.append((index, result.admitted))
            assert "ifa_memory" in result.seconds
    assert admitted == [(0, 0), (2, 1), (4, 2), (6, 3), (8, 0)]  # stride ceil(8 / 4) = 2, oldest replaced
    assert counts == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    segmenter.reset()
    assert segmenter.bank.count == 0


def test_memory_below_capacity_uses_only_that_many_slots(chain):
    frames, _ = generate_clip(np.random.default_rng(8), 5, 128)
    segmenter = Segmenter(chain, UniformPolicy(capacity=2, horizon=2))
    for index, frame in enumerate(frames):
        segmenter.segment(frame, np.zeros((*frame.shape[:2], 2), np.float32), index)
    assert segmenter.bank.valid.tolist() == [[1.0, 1.0, 0.0, 0.0]]
