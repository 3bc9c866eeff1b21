"""Pre-computed flow images for a dataset (`dpa flow`, SPEC §3): offline direction, RAFT rendering (§2.7).

Layouts (what is read → what is written, relative to --data, or to --out when given):
- `davis`: JPEGImages/<res>/<seq>/<frame>.jpg → FLOW/<res>/<seq>/<frame>.png (res: 480p by default);
- `preprocessed`: <split>/RGB/<seq>/<frame>.jpg → <split>/FLOW/<seq>/<frame>.png; the flat training form
  <split>/RGB/<seq>_<frame>.jpg → <split>/FLOW/<seq>_<frame>.png (sequence = name up to the last "_"); the
  public test form <split>/<seq>/RGB/<frame>.jpg → <split>/<seq>/FLOW/<frame>.png; --data may also be
  one split folder;
- `images`: <seq>/JPEGImages/<frame>.jpg → <seq>/FLOW/<frame>.png (the layout of shared/data/davis16);
- `youtube-vos`: <split>/JPEGImages/<video>/<frame>.jpg → <split>/FLOW/<video>/<frame>.png, every split found
  (where `dpa train --data ROOT:youtube-vos --flow-root OUT` looks for them).
Each frame's flow is `dpa.runtime.flow.offline_flow`: forward t→t+1, the last frame −flow(t→t−1).
Unreadable frames are skipped with a warning and counted; their neighbours pair with the next readable frame.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpa.errors import DpaError, require_module
from dpa.images import list_images, read_rgb, write_image
from dpa.progress import Bar
from dpa.runtime.flow import FlowEstimator, create_flow_estimator, flow_to_rgb, offline_flow

log = logging.getLogger(__name__)

LAYOUTS = ("davis", "preprocessed", "images", "youtube-vos")


@dataclass(frozen=True)
class FlowSequence:
    """One sequence to process: its frames in temporal order and the flow image each one gets."""

    name: str
    frames: tuple[Path, ...]
    outputs: tuple[Path, ...]


@dataclass
class FlowSummary:
    """What a `compute_flow` run did (counts of frames)."""

    sequences: int = 0
    written: int = 0
    existing: int = 0
    unreadable: list[str] = field(default_factory=list)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def find_sequences(data: str | Path, layout: str, out: str | Path | None = None,
                   resolution: str = "480p") -> list[FlowSequence]:
    """The sequences of a dataset in `layout`, with output paths under `out` (default: the dataset itself)."""
    data = Path(data)
    target = Path(out) if out is not None else data
    if not data.is_dir():
        raise DpaError(f"dataset folder not found: {data}")

    def sequence(name: str, frames: list[Path], flow_folder: Path) -> FlowSequence:
        outputs = tuple(target / (flow_folder / f"{frame.stem}.png").relative_to(data) for frame in frames)
        return FlowSequence(name, tuple(frames), outputs)

    sequences: list[FlowSequence] = []
    if layout == "davis":
        images = data / "JPEGImages" / resolution
        expected = f"{images}/<sequence>/<frame>.jpg"
        if images.is_dir():
            for folder in _subfolders(images):
                flow_folder = data / "FLOW" / resolution / folder.name
                sequences.append(sequence(folder.name, list_images(folder), flow_folder))
    elif layout == "preprocessed":
        expected = (f"{data}/<split>/RGB/<sequence>/<frame>.jpg, {data}/<split>/RGB/<sequence>_<frame>.jpg "
                    f"or {data}/<split>/<sequence>/RGB/<frame>.jpg")
        for rgb in sorted(p for pattern in ("RGB", "*/RGB", "*/*/RGB") for p in data.glob(pattern) if p.is_dir()):
            owner = rgb.parent.relative_to(data).as_posix()  # "<split>", "<split>/<seq>" or "." for --data SPLIT
            prefix = "" if owner == "." else f"{owner}/"
            owner = data.name if owner == "." else owner
            for folder in _subfolders(rgb):
                sequences.append(sequence(prefix + folder.name, list_images(folder), rgb.parent / "FLOW" / folder.name))
            # Files directly in RGB/: "<seq>_<frame>" files, one sequence per name; plain "<frame>" names
            # (the public test form <split>/<seq>/RGB/) make one sequence, named after the folder.
            flat: dict[str, list[Path]] = defaultdict(list)
            for frame in list_images(rgb):
                flat[frame.stem.rpartition("_")[0]].append(frame)
            for name, frames in sorted(flat.items()):
                sequences.append(sequence(prefix + name if name else owner, frames, rgb.parent / "FLOW"))
    elif layout == "images":
        expected = f"{data}/<sequence>/JPEGImages/<frame>.jpg"
        for folder in _subfolders(data):
            if (folder / "JPEGImages").is_dir():
                sequences.append(sequence(folder.name, list_images(folder / "JPEGImages"), folder / "FLOW"))
    elif layout == "youtube-vos":
        expected = f"{data}/<split>/JPEGImages/<video>/<frame>.jpg"
        for images in sorted(p for p in data.glob("*/JPEGImages") if p.is_dir()):
            for folder in _subfolders(images):
                flow_folder = images.parent / "FLOW" / folder.name
                sequences.append(sequence(f"{images.parent.name}/{folder.name}", list_images(folder), flow_folder))
    else:
        raise DpaError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    sequences = [item for item in sequences if item.frames]
    if not sequences:
        raise DpaError(f"no frames found for layout {layout!r}: expected {expected}; "
                       f"check --data and --layout")
    return sequences


def compute_flow(sequences: list[FlowSequence], estimator: FlowEstimator, overwrite: bool = False,
                 progress: bool = True) -> FlowSummary:
    """Write each frame's offline flow rendered as RGB PNG; existing files are kept unless `overwrite`."""
    summary = FlowSummary(sequences=len(sequences))
    total = sum(len(item.frames) for item in sequences)
    with Bar(total, "flow", "frame", enabled=progress) as bar:
        for item in sequences:
            bar.describe(f"flow {item.name}")
            needed = [overwrite or not output.exists() for output in item.outputs]
            summary.existing += needed.count(False)
            if not any(needed):
                bar.advance(len(item.frames))
                continue
            # A window of the last two readable frames: offline_flow of its newer frame's predecessor
            # looks one frame ahead; the last frame, at the end, looks back.
            window: list[tuple[int, np.ndarray]] = []
            for index, path in enumerate(item.frames):
                bar.advance()  # a stop point: every flow image written so far is whole, a rerun keeps them
                try:
                    image = read_rgb(path)
                except DpaError as error:
                    log.warning("skipping frame: %s", error)
                    summary.unreadable.append(str(path))
                    continue
                if window and image.shape != window[-1][1].shape:
                    raise DpaError(f"{path} is {image.shape[1]}x{image.shape[0]} but the frame before it is "
                                   f"{window[-1][1].shape[1]}x{window[-1][1].shape[0]}; a sequence's frames "
                                   f"must share one size")
                window = [*window[-1:], (index, image)]
                if len(window) == 2:
                    summary.written += _write_flow(item, window, 0, needed, estimator)
            if window:
                summary.written += _write_flow(item, window, len(window) - 1, needed, estimator)
    return summary


def _write_flow(item: FlowSequence, window: list[tuple[int, np.ndarray]], position: int, needed: list[bool],
                estimator: FlowEstimator) -> int:
    index = window[position][0]
    if not needed[index]:
        return 0
    flow = offline_flow([image for _, image in window], position, estimator)
    output = item.outputs[index]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create {output.parent} ({error}); use --out to write the flow elsewhere") \
            from error
    write_image(output, flow_to_rgb(flow))
    return 1


class RAFTFlow:
    """torchvision's RAFT (large, C+T+S+K+H weights, downloaded on first use) as a FlowEstimator.

    Frames are padded to a multiple of 8 (edge replication) and the flow cropped back.
    device: a torch device string; default CUDA where available, else CPU.
    """

    name = "raft"

    def __init__(self, device: str | None = None):
        require_module("torchvision", "torchvision", "the RAFT flow estimator (--estimator raft)")
        import torch
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = Raft_Large_Weights.DEFAULT
        try:
            self._model = raft_large(weights=weights, progress=False).eval().to(self.device)
        except OSError as error:
            raise DpaError(f"cannot load the RAFT weights ({error}); torchvision downloads them on first "
                           f"use, so run once with network access or use --estimator dis") from error
        self._transforms = weights.transforms()

    def __call__(self, frame_from: np.ndarray, frame_to: np.ndarray) -> np.ndarray:
        torch = self._torch
        height, width = frame_from.shape[:2]

        def tensor(frame: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].to(self.device)

        first, second = self._transforms(tensor(frame_from), tensor(frame_to))
        padding = (0, -width % 8, 0, -height % 8)
        first = torch.nn.functional.pad(first, padding, mode="replicate")
        second = torch.nn.functional.pad(second, padding, mode="replicate")
        with torch.inference_mode():
            flow = self._model(first, second)[-1][0, :, :height, :width]
        return flow.permute(1, 2, 0).float().cpu().numpy()


def create_estimator(name: str, **options) -> FlowEstimator:
    """The runtime's estimators (`dpa.runtime.flow.FLOW_ESTIMATORS`) plus RAFT where torchvision is."""
    if name == "raft":
        return RAFTFlow(**options)
    return create_flow_estimator(name, **options)


def estimator_options(name: str, preset: str | None = None, flow_size: int | None = None) -> dict:
    """The options of estimator `name` that the command line sets (DIS: preset and working size)."""
    if name != "dis":
        if preset is not None or flow_size is not None:
            raise DpaError(f"--preset and --flow-size apply to the dis estimator, not {name}")
        return {}
    options: dict = {"preset": preset or "fast"}
    if flow_size is not None:
        options["size"] = flow_size
    return options
