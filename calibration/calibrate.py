"""`dpa calibrate` as a function: record calibration feeds from real frames, then write the fp16 and int8 variants.

Torch-free. `dpa bench --targets` calls it for the int8 ratio; the command line calls it for `dpa calibrate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpa.calibration.clips import load_labelled_clips
from dpa.calibration.feeds import FEEDS_FOLDER, FeedSet, record_feeds, save_feeds
from dpa.calibration.ranges import CALIBRATION_METHODS
from dpa.calibration.variants import VARIANT_PRECISIONS, write_variant
from dpa.errors import DpaError
from dpa.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What `calibrate` wrote: the feeds (and their index file) and one export folder per variant precision."""

    feeds: FeedSet
    feeds_index: Path
    variants: dict[str, Path]


def calibrate(export_dir: str | Path, frames: Sequence[str], out: str | Path | None = None,
              precisions: Sequence[str] = VARIANT_PRECISIONS, method: str = "entropy", exclude: Sequence[str] = (),
              max_frames: int | None = None, synthetic_length: int = 12, threads: int | None = None) -> Calibration:
    """Record feeds of the fp32 export `export_dir` on `frames` (clip folders or synthetic:SEED arguments; never
    random data) into OUT/feeds, then write OUT/<precision> for each of `precisions` (OUT defaults to the export).
    """
    if not frames:
        raise DpaError("calibration needs real frames: pass --frames with clip folders or synthetic:SEED "
                       "(random data is never used)")
    unknown = [p for p in precisions if p not in VARIANT_PRECISIONS]
    if unknown or not precisions:
        raise DpaError(f"--precisions {','.join(precisions)}: choose from {', '.join(VARIANT_PRECISIONS)}")
    if method not in CALIBRATION_METHODS:
        raise DpaError(f"--method {method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
    manifest = Manifest.load(export_dir)
    out = Path(out or export_dir)
    clips = load_labelled_clips(list(frames), manifest.size, synthetic_length, max_frames)
    log.info("calibrating on %d clips (%d frames): %s", len(clips), sum(c.length for c in clips),
             ", ".join(c.name for c in clips))
    feeds = record_feeds(export_dir, clips, threads=threads)
    index = save_feeds(feeds, out / FEEDS_FOLDER)
    variants = {precision: write_variant(export_dir, out, precision, feeds, method=method, exclude=list(exclude),
                                         threads=threads)
                for precision in precisions}
    return Calibration(feeds, index, variants)
