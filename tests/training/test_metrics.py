"""DAVIS metrics against hand-computed values and brute-force transcriptions of DAVIS_METRICS.md §1–3."""

import math

import numpy as np
import pytest

from dpa.training.metrics import (
    boundary_f_measure,
    boundary_map,
    boundary_tolerance,
    decay_edges,
    disk,
    region_similarity,
    sequence_statistics,
)

DAVIS_SHAPE = (480, 854)


def blank(shape=DAVIS_SHAPE) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def square(top: int, left: int, size: int, shape=DAVIS_SHAPE) -> np.ndarray:
    mask = blank(shape)
    mask[top : top + size, left : left + size] = True
    return mask


# ---- J and F special cases ----------------------------------------------------------------------------


def test_empty_prediction_scores_zero():
    gt = square(100, 100, 50)
    assert region_similarity(gt, blank()) == 0.0
    assert boundary_f_measure(gt, blank()) == 0.0


def test_empty_ground_truth_scores_zero():
    pred = square(100, 100, 50)
    assert region_similarity(blank(), pred) == 0.0
    assert boundary_f_measure(blank(), pred) == 0.0


def test_both_empty_scores_one():
    assert region_similarity(blank(), blank()) == 1.0
    assert boundary_f_measure(blank(), blank()) == 1.0


def test_full_frame_masks_have_no_boundary_and_score_one():
    full = np.ones(DAVIS_SHAPE, dtype=bool)
    assert not boundary_map(full).any()
    assert region_similarity(full, full) == 1.0
    assert boundary_f_measure(full, full) == 1.0


def test_full_ground_truth_against_full_prediction_with_hole():
    full = np.ones(DAVIS_SHAPE, dtype=bool)
    holed = full.copy()
    holed[100:110, 100:110] = False
    area = 480 * 854
    assert region_similarity(full, holed) == (area - 100) / area  # 0.99975605
    assert boundary_map(holed).sum() == 11 * 11 - 9 * 9  # ring over rows/cols 99..109
    assert boundary_f_measure(full, holed) == 0.0  # GT has no boundary, the prediction has
    assert boundary_f_measure(holed, full) == 0.0


def test_void_pixels_are_removed_from_j_and_zeroed_before_f():
    gt = square(0, 0, 10, (20, 20))
    pred = square(0, 0, 5, (20, 20))
    void = blank((20, 20))
    void[:, 5:] = True
    assert region_similarity(gt, pred) == 25 / 100
    assert region_similarity(gt, pred, void) == 25 / 50  # left: rows 0..9 x cols 0..4 vs rows/cols 0..4
    assert boundary_f_measure(gt, pred, void) == boundary_f_measure(gt & ~void, pred & ~void)
    assert boundary_f_measure(gt, pred, void) != boundary_f_measure(gt, pred)
    both_void = np.ones((20, 20), dtype=bool)
    assert region_similarity(gt, pred, both_void) == 1.0  # empty union after void
    assert boundary_f_measure(gt, pred, both_void) == 1.0  # both masks zeroed: no boundary at all


# ---- boundary map ---------------------------------------------------------------------------------------


def test_mask_touching_the_border_has_no_boundary_along_the_edge():
    corner = square(0, 0, 5, (20, 30))  # touches the top and left edges
    expected = blank((20, 30))
    expected[0:5, 4] = True  # last foreground column
    expected[4, 0:5] = True  # last foreground row
    assert np.array_equal(boundary_map(corner), expected)  # 9 pixels, none on row 0 or column 0

    left_half = blank((20, 30))
    left_half[:, :15] = True
    assert np.array_equal(np.argwhere(boundary_map(left_half)), [[y, 14] for y in range(20)])

    right_half = ~left_half  # boundary on the background pixel just before the run, last row included
    assert np.array_equal(np.argwhere(boundary_map(right_half)), [[y, 14] for y in range(20)])

    bottom_right = square(15, 25, 5, (20, 30))  # touches the bottom and right edges
    expected = blank((20, 30))
    expected[14, 24:30] = True  # background row above, including the south-east diagonal pixel
    expected[14:20, 24] = True  # background column to the left
    assert np.array_equal(boundary_map(bottom_right), expected)


def test_one_pixel_object_gives_a_2x2_block():
    mask = blank((7, 9))
    mask[3, 4] = True
    expected = blank((7, 9))
    expected[2:4, 3:5] = True
    assert np.array_equal(boundary_map(mask), expected)


def test_one_pixel_object_in_the_bottom_right_corner_gives_3():
    mask = blank((7, 9))
    mask[6, 8] = True
    assert sorted(map(tuple, np.argwhere(boundary_map(mask)))) == [(5, 7), (5, 8), (6, 7)]


def test_single_pixel_against_the_pixel_one_row_down():
    gt = blank()
    gt[200, 300] = True
    pred = blank()
    pred[201, 300] = True
    assert region_similarity(gt, pred) == 0.0
    assert boundary_f_measure(gt, pred) == 1.0  # within the 8-pixel tolerance


def test_one_pixel_wide_line_gives_two_columns_of_boundary():
    vertical = blank((5, 6))
    vertical[1:4, 2] = True
    expected = blank((5, 6))
    expected[0:4, 1:3] = True
    assert np.array_equal(boundary_map(vertical), expected)
    assert np.array_equal(boundary_map(vertical.T), expected.T)


def test_boundary_map_matches_a_pixel_by_pixel_transcription():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (6, 1), (13, 17)]:
        for density in (0.1, 0.5, 0.9):
            mask = rng.random(shape) < density
            assert np.array_equal(boundary_map(mask), reference_boundary_map(mask))


def reference_boundary_map(mask: np.ndarray) -> np.ndarray:
    height, width = mask.shape

    def at(y, x):
        return bool(mask[y, x]) if y < height and x < width else False

    result = blank(mask.shape)
    for y in range(height):
        for x in range(width):
            if y == height - 1 and x == width - 1:
                continue
            if y == height - 1:
                result[y, x] = at(y, x) != at(y, x + 1)
            elif x == width - 1:
                result[y, x] = at(y, x) != at(y + 1, x)
            else:
                neighbours = (at(y, x + 1), at(y + 1, x), at(y + 1, x + 1))
                result[y, x] = any(at(y, x) != neighbour for neighbour in neighbours)
    return result


# ---- tolerance, disk, F -----------------------------------------------------------------------------------


def test_disk_is_the_scikit_image_disk():
    assert disk(4).shape == (9, 9) and disk(4).sum() == 49
    assert disk(8).shape == (17, 17) and disk(8).sum() == 197
    assert disk(4)[0].sum() == 1 and disk(4)[:, 0].sum() == 1  # extreme rows and columns: one pixel
    assert disk(0).sum() == 1
    assert np.array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def test_boundary_tolerance():
    assert boundary_tolerance(480, 854) == 8
    assert boundary_tolerance(352, 352) == 4
    assert boundary_tolerance(720, 1280) == 12
    assert boundary_tolerance(1080, 1920) == 18
    assert boundary_tolerance(480, 854, bound_th=3) == 3  # ≥ 1: a radius in pixels


def test_partial_boundary_match_by_hand():
    # 40x60 image: tolerance ceil(0.008 * 72.1) = 1 (a plus-shaped disk).
    gt = blank((40, 60))
    gt[:, :30] = True  # boundary: column 29, 40 pixels
    pred = blank((40, 60))
    pred[:20, :30] = True  # boundary: column 29 rows 0..19 and row 19 columns 0..29, 49 pixels
    assert boundary_map(gt).sum() == 40 and boundary_map(pred).sum() == 49
    # 21 prediction pixels lie within 1 px of column 29 (20 on it, (19, 28) next to it) and 21 GT pixels
    # (rows 0..20) within 1 px of the prediction's boundary: P = 21/49, R = 21/40, F = 42/89.
    assert boundary_f_measure(gt, pred) == pytest.approx(42 / 89, rel=1e-12)
    assert region_similarity(gt, pred) == 0.5


def test_prediction_grown_past_the_tolerance_has_zero_f():
    gt = square(100, 300, 100)
    pred = square(90, 290, 120)  # 10 px > 8 px tolerance on every side
    assert region_similarity(gt, pred) == pytest.approx(10000 / 14400, rel=1e-12)
    assert boundary_f_measure(gt, pred) == 0.0


def test_j_and_f_are_symmetric():
    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = rng.random((48, 64)) < 0.3
        pred = rng.random((48, 64)) < 0.6
        assert region_similarity(gt, pred) == region_similarity(pred, gt)
        assert boundary_f_measure(gt, pred) == boundary_f_measure(pred, gt)


def test_f_matches_brute_force_distance_matching():
    rng = np.random.default_rng(2)
    shape = (37, 53)
    bound_th = 0.05  # radius ceil(0.05 * 64.6) = 4
    for _ in range(4):
        gt = np.zeros(shape, dtype=bool)
        pred = np.zeros(shape, dtype=bool)
        gt[rng.integers(0, 20) : rng.integers(21, 37), rng.integers(0, 25) : rng.integers(26, 53)] = True
        pred[rng.integers(0, 20) : rng.integers(21, 37), rng.integers(0, 25) : rng.integers(26, 53)] = True
        pred ^= rng.random(shape) < 0.05
        expected = reference_f_measure(gt, pred, boundary_tolerance(*shape, bound_th))
        assert boundary_f_measure(gt, pred, bound_th=bound_th) == pytest.approx(expected, rel=1e-12)


def reference_f_measure(gt: np.ndarray, pred: np.ndarray, radius: int) -> float:
    gt_points = np.argwhere(reference_boundary_map(gt))
    pred_points = np.argwhere(reference_boundary_map(pred))
    if len(gt_points) == 0 or len(pred_points) == 0:
        return float(len(gt_points) == len(pred_points))
    squared = ((pred_points[:, None, :] - gt_points[None, :, :]) ** 2).sum(axis=2)
    within = squared <= radius**2
    precision = within.any(axis=1).mean()
    recall = within.any(axis=0).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ---- sequence statistics -------------------------------------------------------------------------------


def test_mean_ignores_nan():
    assert sequence_statistics([1.0, math.nan, 0.0])["mean"] == 0.5


def test_recall_is_strict_and_counts_nan_as_failure():
    assert sequence_statistics([0.5, 0.5000001, 0.4, 1.0])["recall"] == 0.5
    assert sequence_statistics([math.nan, 0.9])["recall"] == 0.5
    assert sequence_statistics([0.5, 0.5])["recall"] == 0.0


def test_decay_edges():
    assert decay_edges(30) == [0, 7, 15, 22, 29]
    assert decay_edges(1) == [0, 0, 0, 0, 0]
    assert decay_edges(2) == [0, 0, 1, 1, 1]
    assert decay_edges(104) == [0, 26, 52, 77, 103]


def test_decay_short_sequences():
    assert sequence_statistics([0.7])["decay"] == 0.0
    assert sequence_statistics([0.9, 0.4])["decay"] == pytest.approx(0.5, rel=1e-12)


def test_decay_30_frames_uses_inclusive_bins_0_to_7_and_22_to_29():
    values = np.zeros(30)
    values[7] = 0.8  # last frame of bin 0: mean 0.8 / 8
    values[8] = 1.0  # outside bins 0 and 3
    values[21] = 1.0  # outside bins 0 and 3
    values[22] = 0.4  # first frame of bin 3: mean 0.4 / 8
    assert sequence_statistics(values)["decay"] == pytest.approx(0.1 - 0.05, rel=1e-12)


def test_decay_of_long_sequences_is_finite():
    # The official code casts the edges to uint8 and gets NaN here; ordinary ints give the intended value.
    values = np.r_[np.ones(150), np.zeros(150)]
    assert decay_edges(300) == [0, 75, 150, 224, 299]
    assert sequence_statistics(values)["decay"] == 1.0


def test_empty_sequence_statistics_are_nan():
    assert all(math.isnan(value) for value in sequence_statistics([]).values())
