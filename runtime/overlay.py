"""The annotated output frame: the mask as a tinted, outlined overlay with a few lines of text (fps, stage times)."""

from __future__ import annotations

import cv2
import numpy as np

OVERLAY_COLOUR = np.array([255, 64, 32], dtype=np.float32)  # RGB tint of the foreground
TEXT_COLOUR = (255, 255, 255)
SHADOW_COLOUR = (0, 0, 0)


def draw_overlay(frame: np.ndarray, mask: np.ndarray, lines: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """uint8 RGB (H, W, 3) frame and bool (H, W) mask -> uint8 RGB (H, W, 3): mask tinted 50 %, outlined in
    white, and `lines` of text at the top left (scaled to the frame height, shadowed to stay readable)."""
    if frame.shape[:2] != mask.shape:
        raise ValueError(f"frame {frame.shape[:2]} and mask {mask.shape} differ in size")
    shown = frame.astype(np.float32)
    shown[mask] = 0.5 * shown[mask] + 0.5 * OVERLAY_COLOUR
    shown = shown.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, TEXT_COLOUR, 1)
    scale = max(0.35, frame.shape[0] / 720)
    step = int(round(18 * scale)) + 2
    for row, line in enumerate(lines):
        origin = (6, step * (row + 1))
        cv2.putText(shown, line, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, SHADOW_COLOUR, 3, cv2.LINE_AA)
        cv2.putText(shown, line, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, TEXT_COLOUR, 1, cv2.LINE_AA)
    return shown
