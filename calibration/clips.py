"""Clips for calibration and comparison, named on the command line: clip folders or `synthetic:SEED`.

Torch-free. A clip argument is a sequence folder (`<path>/JPEGImages/*.jpg`, with ground truth in
`<path>/Annotations/*.png` when present, as the DAVIS samples), a plain folder of images (ground truth from
the twin folder in the official DAVIS layout: `JPEGImages/480p/<seq>` -> `Annotations/480p/<seq>`), or
`synthetic:SEED` / `synthetic:FIRST..LAST` (clips of `dpa.synthetic.generate_clip`, which come with
exact masks). Frames are uint8 RGB (H, W, 3), masks bool (H, W).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.errors import DpaError

SYNTHETIC_PREFIX = "synthetic:"
_SYNTHETIC = re.compile(r"^synthetic:(\d+)(?:\.\.(\d+))?$")
MAX_SYNTHETIC_CLIPS = 1000


@dataclass
class LabelledClip:
    """A clip with its frame names and, where the source has them, ground-truth masks.

    name: unique label ("blackswan", "synthetic-1000"); frames: uint8 RGB (H, W, 3); frame_names: one per frame
    ("00000"); masks: bool (H, W) per frame, or None without ground truth; source: where it came from.
    """

    name: str
    frames: list[np.ndarray]
    frame_names: list[str]
    masks: list[np.ndarray] | None
    source: str

    @property
    def length(self) -> int:
        return len(self.frames)


def expand_clip_arguments(arguments: list[str]) -> list[str]:
    """Command-line clip arguments -> one entry per clip (`synthetic:A..B` becomes synthetic:A … synthetic:B)."""
    expanded = []
    for argument in arguments:
        if argument.startswith(SYNTHETIC_PREFIX):
            match = _SYNTHETIC.match(argument)
            if not match:
                raise DpaError(f"bad synthetic clip {argument!r}: write synthetic:SEED or synthetic:FIRST..LAST "
                               "(non-negative integers)")
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first or last - first >= MAX_SYNTHETIC_CLIPS:
                raise DpaError(f"bad synthetic seed range {argument!r}: need FIRST <= LAST and at most "
                               f"{MAX_SYNTHETIC_CLIPS} clips")
            expanded.extend(f"{SYNTHETIC_PREFIX}{seed}" for seed in range(first, last + 1))
        else:
            expanded.append(argument)
    if len(set(expanded)) != len(expanded):
        duplicates = sorted({a for a in expanded if expanded.count(a) > 1})
        raise DpaError(f"clip given twice: {', '.join(duplicates)}")
    return expanded


def load_labelled_clip(
    argument: str, size: int, synthetic_length: int = 12, max_frames: int | None = None
) -> LabelledClip:
    """One clip by its argument. size: the synthetic clips' side in pixels (the model's S);
    synthetic_length: frames per synthetic clip; max_frames: keep only the first N frames (None: all)."""
    if max_frames is not None and max_frames < 1:
        raise DpaError(f"--max-frames must be at least 1, got {max_frames}")
    if argument.startswith(SYNTHETIC_PREFIX):
        from dpa.synthetic import generate_clip

        seed = int(argument[len(SYNTHETIC_PREFIX):])
        if synthetic_length < 2:
            raise DpaError(f"synthetic clips need at least 2 frames, got {synthetic_length}")
        length = synthetic_length if max_frames is None else min(synthetic_length, max_frames)
        frames, masks = generate_clip(np.random.default_rng(seed), length, size)
        return LabelledClip(f"synthetic-{seed}", frames, [f"{i:05d}" for i in range(length)], masks,
                            f"synthetic (generate_clip, seed {seed}, {length} frames of {size} px)")
    return _folder_clip(Path(argument), max_frames)


def _folder_clip(path: Path, max_frames: int | None) -> LabelledClip:
    from dpa.export.frames import load_clip
    from dpa.images import list_images
    from dpa.training.evaluate import read_mask

    clip = load_clip(path)
    names = [image.stem for image in list_images(clip.source)]  # load_clip's own order, to name the frames
    frames = clip.frames
    if max_frames is not None:
        frames, names = frames[:max_frames], names[:max_frames]
    masks = None
    annotations = _annotations_folder(path)
    if annotations is not None:
        files = [annotations / f"{name}.png" for name in names]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise DpaError(f"{annotations} lacks masks for {len(missing)} frames ({', '.join(missing[:3])} …); "
                           "remove the folder or complete it")
        masks = [read_mask(file) for file in files]
        for name, frame, mask in zip(names, frames, masks, strict=True):
            if mask.shape != frame.shape[:2]:
                raise DpaError(f"{annotations / name}.png is {mask.shape[1]}x{mask.shape[0]} but the frame is "
                               f"{frame.shape[1]}x{frame.shape[0]}")
    source = f"{clip.source} ({len(frames)} frames{', ground truth from ' + str(annotations) if masks else ''})"
    name = path.resolve().name
    return LabelledClip(name, frames, names, masks, source)


def _annotations_folder(path: Path) -> Path | None:
    """Ground truth of a clip folder: <path>/Annotations (the samples' layout), or the official DAVIS layout's
    twin folder (JPEGImages/480p/<seq> -> Annotations/480p/<seq>); None when neither exists."""
    candidates = [path / "Annotations"]
    parts = path.resolve().parts
    if "JPEGImages" in parts:
        index = len(parts) - 1 - parts[::-1].index("JPEGImages")
        candidates.append(Path(*parts[:index], "Annotations", *parts[index + 1:]))
    return next((folder for folder in candidates if folder.is_dir()), None)


def load_labelled_clips(
    arguments: list[str], size: int, synthetic_length: int = 12, max_frames: int | None = None
) -> list[LabelledClip]:
    """Every clip of the command line (see `expand_clip_arguments`); clip names must be unique."""
    clips = [load_labelled_clip(a, size, synthetic_length, max_frames) for a in expand_clip_arguments(arguments)]
    names = [clip.name for clip in clips]
    if len(set(names)) != len(names):
        raise DpaError(f"two clips share a name ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))}); "
                       "reports and feeds are keyed by the folder name")
    return clips


def offline_flows(frames: list[np.ndarray], size: int) -> tuple[list[np.ndarray], str]:
    """The flow field (S, S, 2) float32 of every frame for a model of input size S in the offline direction,
    computed once per clip, and a description of it. Forward flow t -> t+1; the last frame -flow(t -> t-1)
    (`dpa.runtime.flow.offline_flow`, `model_flow_estimator`)."""
    from dpa.runtime.flow import model_flow_estimator, offline_flow

    estimator = model_flow_estimator(size)
    flows = [offline_flow(frames, index, estimator) for index in range(len(frames))]
    return flows, f"{estimator!r} (offline: forward flow t->t+1; last frame -flow(t->t-1))"
