"""Simulated camera motion for training clips (`dpa train --camera-motion P`).

When the camera follows the object (a dog running past, an elephant walking, a rhino), the object stands almost
still in the image and the background moves: the flow image shows the background, and a model that learned
"what moves is the object" segments the background. DAVIS 2016 train has few such clips; its development split
(elephant, rhino) and validation's dog fail that way.

A camera that pans at the object's speed adds the same translation to the flow of every pixel (up to parallax
and the frame border). So a clip becomes one whose camera follows its object by adding

    shift = −f × (the query object's mean flow),   f drawn uniformly in FOLLOW_RANGE,

to the flow of each of its frames (the query and its references: one camera for the whole clip) before the flow
is rendered. f = 1 stops the object; f = 0.5 halves its motion and moves the background the other way. The flow
is the runtime's (`dpa.runtime.flow.model_flow_estimator`: DIS on the frames resized to S × S, offline direction
`offline_flow`), computed live from the frame and its neighbour, since a rendered flow image no longer holds the
vectors. Without this option, the stored flow images are used as they are.
"""

from __future__ import annotations

import cv2
import numpy as np

from dpa.runtime.flow import flow_to_rgb

FOLLOW_RANGE = (0.5, 1.0)  # fraction of the object's motion the simulated camera follows


def follow_shift(flow: np.ndarray, mask: np.ndarray, follow: float) -> np.ndarray | None:
    """The translation (2,) float32 a camera following `follow` × the object's mean motion adds to the flow.

    flow: (H, W, 2) the query frame's flow; mask: bool (H', W') its object mask at any size (resized to the
    flow's grid, nearest neighbour). None when the mask has no object pixel there (nothing to follow).
    """
    height, width = flow.shape[:2]
    mask = np.asarray(mask, bool)
    if mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    if not mask.any():
        return None
    return (-follow * flow[mask].mean(axis=0)).astype(np.float32)


def followed_flow_image(flow: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The rendered flow image (uint8 (H, W, 3)) of `flow` seen from a camera that adds `shift` to every vector."""
    return flow_to_rgb(flow + np.asarray(shift, np.float32))
