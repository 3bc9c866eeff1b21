"""`dpa synth` (SPEC §3): procedural clips of `dpa.synthetic` written as a dataset in the pre-processed layout,
with exact masks and flow estimated as the runtime estimates it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.files import write_bytes_atomically, write_text_atomically
from dpa.images import write_image
from dpa.outputs import MARKER
from dpa.progress import progress as progress_bar
from dpa.runtime.flow import FlowEstimator, flow_to_rgb, offline_flow
from dpa.synthetic import check_size, clip_rng, generate_clip

MANIFEST_NAME = "manifest.json"
JPEG_QUALITY = 95
GENERATOR = "dpa synth"


def write_dataset(out: str | Path, *, clips: int = 20, frames: int = 12, size: int = 128, seed: int = 0,
                  split: str = "train", estimator_name: str = "dis", estimator_options: dict | None = None,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """Generate a split in the pre-processed layout, one folder per sequence; returns the manifest's path.

    OUT/<split>/RGB/<seq>/<frame>.jpg (quality 95), GT/<seq>/<frame>.png (0/255), FLOW/<seq>/<frame>.png
    (rendered flow, SPEC §2.7) and manifest.json. The flow is estimated offline (forward t→t+1, the last
    frame −flow(t→t−1)) on the JPEG frames as written, so `dpa flow` on this tree reproduces it.
    """
    from dpa.training.flowgen import create_estimator

    if clips < 1 or frames < 1:
        raise DpaError(f"need at least one clip of at least one frame, got {clips} clips of {frames} frames")
    check_size(size)
    estimator_options = dict(estimator_options or {})
    estimator = create_estimator(estimator_name, **estimator_options)
    root = prepare_split(Path(out) / split, overwrite)

    sequences = []
    for index in progress_bar(range(clips), f"synth {split}", unit="clip", enabled=progress):
        sequence = f"clip{index:04d}"
        clip_frames, masks = generate_clip(clip_rng(seed, index), frames, size)
        write_clip({kind: root / kind / sequence for kind in ("RGB", "GT", "FLOW")}, clip_frames, masks, estimator)
        sequences.append(sequence)

    manifest = {
        "generator": GENERATOR,
        "format": 1,
        "seed": seed,
        "clips": clips,
        "frames": frames,
        "size": size,
        "split": split,
        "flow": {
            "estimator": estimator_name,
            "options": estimator_options,
            "direction": "offline: forward t->t+1, last frame -flow(t->t-1)",
            "rendering": "RAFT flow_viz.flow_to_image (SPEC 2.7)",
        },
        "layout": {
            "rgb": "RGB/<seq>/<frame>.jpg", "gt": "GT/<seq>/<frame>.png", "flow": "FLOW/<seq>/<frame>.png"
        },
        "sequences": sequences,
    }
    manifest_path = root / MANIFEST_NAME
    write_text_atomically(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def write_clip(
    folders: dict[str, Path], frames: list[np.ndarray], masks: list[np.ndarray], estimator: FlowEstimator
) -> None:
    """One clip's files: folders["RGB"]/<t>.jpg, folders["GT"]/<t>.png (0/255) and folders["FLOW"]/<t>.png.

    frames: uint8 (S, S, 3) RGB; masks: bool (S, S). The flow is estimated on the frames as decoded from their
    JPEG files (forward t→t+1, the last frame −flow(t→t−1)), as `dpa flow` estimates it on the written tree.
    """
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    stored = []
    for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
        write_bytes_atomically(folders["RGB"] / f"{t:05d}.jpg", encoded.tobytes())
        stored.append(cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        write_image(folders["GT"] / f"{t:05d}.png", mask.astype(np.uint8) * 255)
    for t in range(len(stored)):
        write_image(folders["FLOW"] / f"{t:05d}.png", flow_to_rgb(offline_flow(stored, t, estimator)))


def prepare_split(root: Path, overwrite: bool) -> Path:
    """Make OUT/<split> ready: new or empty; with overwrite, a previous `dpa synth` split is cleared first."""
    if root.exists() and any(entry.name != MARKER for entry in root.iterdir()):  # dpa.outputs marks it
        if not overwrite:
            raise DpaError(f"{root} is not empty; pass --overwrite to replace a previous dpa synth split, "
                           f"or choose another --out or --split")
        manifest = root / MANIFEST_NAME
        try:
            ours = json.loads(manifest.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DpaError(f"{root} is not empty and has no {MANIFEST_NAME} written by dpa synth; "
                           f"refusing to overwrite it")
        manifest.unlink()
        for kind in ("RGB", "GT", "FLOW"):
            if (root / kind).exists():
                shutil.rmtree(root / kind)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create {root}: {error}") from error
    return root
