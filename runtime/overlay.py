"""The annotated output frame: the mask as a tinted, outlined overlay with a few lines of text (fps, stage times)."""

from __future__ import annotations

import cv2
import numpy as np

OVERLAY_COLOUR = np.array([255, 64, 32], dtype=np.float32)  # RGB tint of the foreground
# floor((pixel + colour) / 2) = (pixel >> 1) + (colour >> 1) + (pixel & colour & 1), in uint8 without overflow
_HALF_COLOUR = OVERLAY_COLOUR.astype(np.uint8) >> 1
_ODD_COLOUR = OVERLAY_COLOUR.astype(np.uint8) & 1
TEXT_COLOUR = (255, 255, 255)


def draw_overlay(frame: np.ndarray, mask: np.ndarray, lines: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """uint8 RGB (H, W, 3) frame and bool (H, W) mask -> uint8 RGB (H, W, 3): mask tinted 50 %, outlined in
    white, and `lines` of text at the top left (scaled to the frame height, on a darkened box)."""
    if frame.shape[:2] != mask.shape:
        raise ValueError(f"frame {frame.shape[:2]} and mask {mask.shape} differ in size")
    shown = frame.copy()
    mask_bytes = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    x, y, width, height = cv2.boundingRect(mask_bytes)
    if width and height:  # blend inside the mask's bounding box only, in uint8: floor((pixel + colour) / 2)
        region = frame[y:y + height, x:x + width]
        tinted = (region >> 1) + _HALF_COLOUR + (region & _ODD_COLOUR)
        cv2.copyTo(tinted, mask_bytes[y:y + height, x:x + width], shown[y:y + height, x:x + width])
    contours, _ = cv2.findContours(mask_bytes, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, TEXT_COLOUR, 1)
    if lines:
        scale = min(1.2, max(0.4, frame.shape[0] / 600))  # font scale: ~10 px glyphs at 256 rows, ~20 px at 720
        sizes = [cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0] for line in lines]
        step = max(height for _, height in sizes) + int(round(10 * scale))
        box_width = max(width for width, _ in sizes) + 12
        box = shown[: step * len(lines) + 8, :box_width]
        box[:] = (box.astype(np.float32) * 0.4).astype(np.uint8)  # darken behind the text so it stays readable
        for row, line in enumerate(lines):
            cv2.putText(shown, line, (6, step * (row + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOUR, 1,
                        cv2.LINE_AA)
    return shown
