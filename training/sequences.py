"""A video as listed files (`VideoSequence`), reading those files, and choosing among listed sequences (SPEC §3).

`dpa.training.layouts` makes `DatasetListing`s of sequences from the dataset layouts on disk; the torch datasets in
`dpa.training.datasets` sample from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.images import read_rgb
from dpa.runtime.preprocess import preprocess_rgb


@dataclass
class VideoSequence:
    """One video: per-frame file paths, in frame order.

    frames: frame names (file stems without the sequence prefix, e.g. "00000").
    rgb: RGB image per frame; flow: rendered flow image per frame or None; masks: mask per frame or None
    (YouTube-VOS annotates every 5th frame only).
    flow_targets: where each frame's flow image belongs (what `dpa flow` writes).
    mask_labels: masks are object-id maps (any non-zero id is foreground) rather than 0/255 masks.
    root, layout: where the sequence came from (for error messages that say what to run).
    """

    name: str
    frames: list[str]
    rgb: list[Path]
    flow: list[Path | None]
    masks: list[Path | None]
    flow_targets: list[Path] = field(default_factory=list)
    mask_labels: bool = False
    root: Path | None = None
    layout: str = ""

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def annotated(self) -> list[int]:
        """Indices of frames that have a mask."""
        return [i for i, mask in enumerate(self.masks) if mask is not None]

    @property
    def with_flow(self) -> list[int]:
        """Indices of frames that have a flow image."""
        return [i for i, flow in enumerate(self.flow) if flow is not None]


class DatasetListing(list):
    """A list (of `VideoSequence`, or of (image, mask) path pairs) plus what was skipped while listing.

    skipped: one message per skipped file or sequence (each was also logged as a warning).
    """

    def __init__(self, items=(), skipped: list[str] | None = None):
        super().__init__(items)
        self.skipped: list[str] = list(skipped or [])

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


# ---------------------------------------------------------------------------------------------- reading


def read_rgb_or_none(path: str | Path) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB, or None when the file is missing or cannot be decoded."""
    try:
        return read_rgb(path)
    except DpaError:
        return None


def read_mask_or_none(path: str | Path, labels: bool = False) -> np.ndarray | None:
    """A mask file as bool (H, W) foreground, or None when it is missing or cannot be decoded.

    Palette PNGs (YouTube-VOS, DAVIS 2017) are decoded by OpenCV into their palette colours, not indices:
    any non-black pixel is foreground (palette entry 0, the background, is black in those datasets).
    Other masks: labels=True reads object-id maps (any non-zero value is foreground); otherwise the mask is
    thresholded at half its range (> 127 for 8 bits), which keeps 0/255 masks exact and makes
    anti-aliased or JPEG-compressed masks binary.
    """
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        return None
    if image.ndim == 3:
        image = image[:, :, :3]
    if labels or _is_palette_png(data):
        foreground = image != 0
    else:
        threshold = np.iinfo(image.dtype).max // 2 if image.dtype.kind in "ui" else 0.5
        foreground = image > threshold
    return foreground.any(axis=2) if foreground.ndim == 3 else foreground


def _is_palette_png(data: np.ndarray) -> bool:
    # PNG signature, then the IHDR chunk; its colour type (3 = indexed) is byte 25 of the file.
    return data.size > 25 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and int(data[25]) == 3


# ---------------------------------------------------------------------------------------------- choosing


def select_sequences(
    sequences: DatasetListing, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> DatasetListing:
    """The sequences named in `include` (all when None) minus those in `exclude`, in their listed order.

    DpaError naming the unknown names (a typo would otherwise silently train or score on the wrong split) and
    when nothing is left.
    """
    names = {sequence.name for sequence in sequences}
    unknown = sorted(set(include or ()) - names) + sorted(set(exclude) - names)
    if unknown:
        raise DpaError(f"no sequence named {', '.join(unknown)} in the dataset (it has {len(names)}: "
                       f"{', '.join(sorted(names)[:8])}{' …' if len(names) > 8 else ''})")
    kept = [s for s in sequences if (include is None or s.name in include) and s.name not in exclude]
    if not kept:
        raise DpaError("no sequence left after --sequences/--exclude")
    return DatasetListing(kept, sequences.skipped)


def sample_frames(paths: Sequence[Path], count: int, size: int) -> np.ndarray:
    """`count` of the RGB images `paths` (e.g. every frame of a dataset), spread evenly, pre-processed for the model:
    (count, 3, S, S) float32 ImageNet-normalised (e.g. to choose the ImageNet filters of a narrow encoder).
    Unreadable files are skipped (the next readable one is taken)."""
    if not paths:
        raise DpaError("no frames to sample")
    picks = np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)
    frames = []
    for pick in picks:
        for path in paths[pick:]:
            image = read_rgb_or_none(path)
            if image is not None:
                frames.append(preprocess_rgb(image, size))
                break
    if not frames:
        raise DpaError("none of the sampled frames could be read")
    return np.stack(frames)


def pairs_from_sequences(sequences: Sequence[VideoSequence]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of every annotated frame: video data used as still images (stage 1)."""
    return [(sequence.rgb[i], sequence.masks[i]) for sequence in sequences for i in sequence.annotated]


def require_flow(sequences: Sequence[VideoSequence]) -> None:
    """DpaError naming the sequences that have no flow images and the `dpa flow` command that makes them."""
    missing = [sequence for sequence in sequences if not sequence.with_flow]
    if not missing:
        return
    first = missing[0]
    names = ", ".join(sequence.name for sequence in missing[:5]) + (" ..." if len(missing) > 5 else "")
    where = first.flow_targets[0].parent if first.flow_targets else "the flow folder"
    raise DpaError(
        f"{len(missing)} sequence(s) have no optical-flow images ({names}; looked in {where}): compute them "
        f"with `dpa flow --data {first.root} --layout {first.layout or 'auto'}`"
    )
