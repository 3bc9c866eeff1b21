"""The annotated frame: the mask tinted half-and-half, the rest untouched, text on a darkened box."""

import numpy as np
import pytest

from dpa.runtime.overlay import OVERLAY_COLOUR, draw_overlay


def test_mask_is_tinted_half_and_half_and_the_rest_untouched():
    frame = np.full((120, 160, 3), 100, np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[40:100, 60:140] = True
    shown = draw_overlay(frame, mask)
    inside = shown[50:90, 70:130].reshape(-1, 3)  # away from the outline
    expected = (0.5 * 100 + 0.5 * OVERLAY_COLOUR).astype(np.uint8)
    assert (inside == expected).all()
    assert (shown[:30] == 100).all() and (shown[:, :50] == 100).all()  # no text asked for: nothing else drawn
    assert (shown[40, 60:140] == 255).any()  # the outline


def test_text_sits_on_a_darkened_box_in_the_top_left():
    frame = np.full((256, 256, 3), 200, np.uint8)
    shown = draw_overlay(frame, np.zeros((256, 256), bool), ["12.0 fps", "model 5.0 ms"])
    corner = shown[:20, :40]
    assert corner.min() <= 80 and corner.max() >= 230  # dark box (200 * 0.4) with white glyphs on it
    assert (shown[120:, 120:] == 200).all()


def test_mismatched_mask_is_refused():
    with pytest.raises(ValueError):
        draw_overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((9, 10), bool))
