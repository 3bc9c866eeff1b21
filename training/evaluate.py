"""DAVIS evaluation of binary masks: per-frame J and F, per-sequence statistics, dataset summary, table.

Protocols (`DAVIS_METRICS.md` §4):
- "all" (default, the unsupervised protocol of davis2017-evaluation): every frame is scored.
- "davis2016" (the DAVIS-2016 toolkit): the first and last frames are not scored (NaN); the mean is
  taken over the interior frames and recall / decay on v[1:-1].

Mask files are read as "any non-zero pixel is foreground", for ground truth and predictions alike. The
official readers differ (§5): davis2017-evaluation reads 255 as void and predictions as palette
indices (a 0/255 prediction is "object 255" and is rejected), the 2016 port thresholds predictions at
> 128. For DAVIS-2016 (one object, 0/255 ground truth, no void) reading non-zero as foreground gives the
numbers the official code gives once its inputs are in the form it expects (GT 255 → 1, predictions as
object 1). Nothing is resized: masks must be at the ground truth's resolution.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError
from dpa.files import write_text_atomically
from dpa.images import natural_key
from dpa.progress import progress as progress_bar
from dpa.training.metrics import boundary_f_measure, region_similarity, sequence_statistics

log = logging.getLogger(__name__)

PROTOCOLS = ("all", "davis2016")
MASK_SUFFIX = ".png"


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask image as an (H, W) bool array: any non-zero pixel (in any colour channel) is foreground.

    Palette PNGs are read through their colours, so palette entry 0 must be black (as in DAVIS).
    Raises DpaError when the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DpaError(f"mask {path} not found")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DpaError(f"cannot read mask {path}: not an image OpenCV can decode")
    if image.ndim == 3:
        image = image[:, :, :3].any(axis=2)  # colour (or palette expanded to colour); alpha ignored
    return image != 0


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise DpaError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def score_sequence(frames: list[tuple[str, np.ndarray, np.ndarray]], protocol: str = "all") -> dict:
    """Score one sequence given in memory as (frame_name, gt, pred) triples in temporal order.

    gt, pred: (H, W) masks of the same shape (bool, or any dtype with non-zero = foreground).
    Returns {"J": {"mean", "recall", "decay"}, "F": {...}, "G": (J mean + F mean) / 2,
    "frames": {frame_name: {"J", "F"}}}; under "davis2016" the first and last frames hold NaN.
    """
    _check_protocol(protocol)
    if not frames:
        raise DpaError("cannot score a sequence without frames")
    if protocol == "davis2016" and len(frames) < 3:
        raise DpaError(
            "the davis2016 protocol drops the first and last frames and needs at least 3, "
            f"got {len(frames)}; use --protocol all"
        )
    per_frame: dict[str, dict[str, float]] = {}
    last = len(frames) - 1
    for index, (name, gt, pred) in enumerate(frames):
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.ndim != 2 or pred.ndim != 2:
            raise DpaError(
                f"frame {name}: masks must be 2-D (H, W), got gt {gt.shape} and prediction {pred.shape}"
            )
        if gt.shape != pred.shape:
            raise DpaError(
                f"frame {name}: prediction is {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
                f"{gt.shape[1]}x{gt.shape[0]}; predict at the ground truth's resolution (nothing is resized)"
            )
        if name in per_frame:
            raise DpaError(f"frame {name} appears twice in the sequence")
        if protocol == "davis2016" and index in (0, last):
            per_frame[name] = {"J": math.nan, "F": math.nan}
        else:
            per_frame[name] = {"J": region_similarity(gt, pred), "F": boundary_f_measure(gt, pred)}

    scored = slice(1, -1) if protocol == "davis2016" else slice(None)
    j_stats = sequence_statistics([frame["J"] for frame in per_frame.values()][scored])
    f_stats = sequence_statistics([frame["F"] for frame in per_frame.values()][scored])
    return {
        "J": j_stats,
        "F": f_stats,
        "G": (j_stats["mean"] + f_stats["mean"]) / 2,
        "frames": per_frame,
    }


def summarise(sequences: Mapping[str, dict], protocol: str) -> dict:
    """The full result: {"protocol", "sequences", "dataset"} from per-sequence `score_sequence` results.

    Dataset values are means over sequences of the per-sequence values (not pooled over frames);
    dataset G = (J_mean + F_mean) / 2.
    """
    _check_protocol(protocol)
    if not sequences:
        raise DpaError("no sequences to summarise")

    def mean_of(metric: str, statistic: str) -> float:
        return float(np.mean([result[metric][statistic] for result in sequences.values()]))

    j_mean, f_mean = mean_of("J", "mean"), mean_of("F", "mean")
    return {
        "protocol": protocol,
        "sequences": dict(sequences),
        "dataset": {
            "J_mean": j_mean,
            "F_mean": f_mean,
            "G": (j_mean + f_mean) / 2,
            "J_recall": mean_of("J", "recall"),
            "J_decay": mean_of("J", "decay"),
            "F_recall": mean_of("F", "recall"),
            "F_decay": mean_of("F", "decay"),
        },
    }


def _mask_files(folder: Path) -> dict[str, Path]:
    """Mask files of one sequence folder by stem, in natural order."""
    files: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() == MASK_SUFFIX and not path.name.startswith("."):
            if path.stem in files:
                raise DpaError(
                    f"two masks for frame {path.stem} in {folder}: {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
    return {stem: files[stem] for stem in sorted(files, key=natural_key)}


def _sequence_folders(root: Path, role: str) -> dict[str, Path]:
    if not root.is_dir():
        raise DpaError(f"{role} directory {root} not found")
    return {
        path.name: path
        for path in sorted(root.iterdir(), key=natural_key)
        if path.is_dir() and not path.name.startswith(".")
    }


def score_directories(
    pred_dir: str | Path, gt_dir: str | Path, protocol: str = "all", progress: bool = False
) -> dict:
    """Score predicted masks against ground truth stored as DIR/<sequence>/<frame>.png.

    Every GT sequence and frame is scored; frames are matched by file stem. A GT frame without a
    prediction is an error; predicted sequences or frames without GT are ignored with a warning.
    progress: show a bar over sequences (on stderr). Returns the `summarise` result.
    """
    _check_protocol(protocol)
    pred_root, gt_root = Path(pred_dir), Path(gt_dir)
    gt_folders = _sequence_folders(gt_root, "ground truth")
    gt_sequences = {name: files for name, folder in gt_folders.items() if (files := _mask_files(folder))}
    pred_sequences = _sequence_folders(pred_root, "prediction")
    if not gt_sequences:
        raise DpaError(f"no ground truth found: expected {gt_root}/<sequence>/<frame>{MASK_SUFFIX}")
    for name in sorted(set(pred_sequences) - set(gt_sequences)):
        log.warning("prediction sequence %s has no ground truth in %s; ignored", name, gt_root)

    results: dict[str, dict] = {}
    for name, gt_files in progress_bar(gt_sequences.items(), "eval", unit="sequence", enabled=progress):
        if name not in pred_sequences:
            raise DpaError(f"no predictions for sequence {name}: {pred_root / name} not found")
        pred_files = _mask_files(pred_sequences[name])
        missing = [stem for stem in gt_files if stem not in pred_files]
        if missing:
            expected = pred_root / name / gt_files[missing[0]].name
            raise DpaError(
                f"prediction {expected} not found "
                f"({len(missing)} of {len(gt_files)} frames of {name} have no prediction)"
            )
        extra = [stem for stem in pred_files if stem not in gt_files]
        if extra:
            log.warning("%d predicted frames of %s have no ground truth (e.g. %s); ignored",
                        len(extra), name, pred_files[extra[0]].name)
        frames = []
        for stem, gt_path in gt_files.items():
            gt, pred = read_mask(gt_path), read_mask(pred_files[stem])
            if gt.shape != pred.shape:
                raise DpaError(
                    f"prediction {pred_files[stem]} is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
                    f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}; predict at the ground truth's resolution "
                    "(nothing is resized)"
                )
            frames.append((stem, gt, pred))
        results[name] = score_sequence(frames, protocol)
    return summarise(results, protocol)


def _json_ready(value):
    """Replace NaN / infinity by None so the result is strict JSON."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(result: dict, path: str | Path) -> None:
    """Write a `summarise` result as strict JSON (NaN frames, e.g. under davis2016, become null)."""
    path = Path(path)
    write_text_atomically(path, json.dumps(_json_ready(result), indent=1, allow_nan=False) + "\n")


def format_table(result: dict) -> str:
    """A Markdown table of a `summarise` result: one row per sequence, then the dataset means."""
    header = ("sequence", "frames", "J mean", "J recall", "J decay", "F mean", "F recall", "F decay", "G")
    rows: list[tuple[str, ...]] = []
    for name, sequence in result["sequences"].items():
        j, f = sequence["J"], sequence["F"]
        rows.append((name, str(len(sequence["frames"])),
                     *(f"{value:.3f}" for value in (j["mean"], j["recall"], j["decay"],
                                                     f["mean"], f["recall"], f["decay"], sequence["G"]))))
    dataset = result["dataset"]
    total_frames = sum(len(sequence["frames"]) for sequence in result["sequences"].values())
    rows.append(("mean", str(total_frames),
                 *(f"{dataset[key]:.3f}" for key in ("J_mean", "J_recall", "J_decay",
                                                     "F_mean", "F_recall", "F_decay", "G"))))
    widths = [max(len(header[column]), *(len(row[column]) for row in rows)) for column in range(len(header))]

    def line(cells) -> str:
        aligned = [cell.ljust(width) if column == 0 else cell.rjust(width)
                   for column, (cell, width) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(aligned) + " |"

    separator = "|" + "|".join(
        "-" * (width + 1) + (":" if column else "-") for column, width in enumerate(widths)
    ) + "|"
    return "\n".join([f"protocol: {result['protocol']}", "", line(header), separator, *map(line, rows)])
