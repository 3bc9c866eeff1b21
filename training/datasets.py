"""Training and evaluation data (SPEC §3): dataset layouts → `VideoSequence` lists → torch datasets.

Layouts (`load_sequences(root, layout=...)`, detected when "auto"):

- `davis2016`: `ROOT/JPEGImages/480p/<seq>/<frame>.jpg`, `ROOT/Annotations/480p/<seq>/<frame>.png`,
  splits from `ROOT/ImageSets/480p/<split>.txt` (frame pairs) or `ROOT/ImageSets/2016/<split>.txt`
  (sequence names); flow in `ROOT/FLOW/480p/<seq>/` (or TMO's `ROOT/JPEGFlows/480p/<seq>/`).
- `youtube-vos`: `ROOT/<split>/JPEGImages/<video>/`, `ROOT/<split>/Annotations/<video>/` (palette PNGs,
  any object id is foreground; often every 5th frame only), flow in `ROOT/<split>/FLOW/<video>/`.
- `preprocessed` (the public DPA/TMO layout, and what `dpa synth` writes): `ROOT/<split>/RGB|GT|FLOW/`
  holding either flat `<seq>_<frame>.*` files (the frame is the part after the last underscore) or one
  folder per sequence `<seq>/<frame>.*`; also the public test form `ROOT/<split>/<seq>/RGB|GT|FLOW/`.
- `images`: `ROOT/<seq>/JPEGImages/<frame>.jpg`, `ROOT/<seq>/Annotations/<frame>.png`, flow in
  `ROOT/<seq>/FLOW/`.
- `duts` (still images, stage 1): `ROOT/DUTS-TR/DUTS-TR-Image|DUTS-TR-Mask`, `ROOT/DUTS-TE/...`, read
  with `load_duts`.

`flow_root`, when given, mirrors ROOT for the flow tree only (e.g. `FLOW_ROOT/<seq>/FLOW/<frame>.png` for
`images`); each `VideoSequence.flow_targets[i]` is where `dpa flow` writes frame i's flow image.

Missing or corrupt files never stop training: listing skips what it cannot use and records it in
`DatasetListing.skipped`; datasets skip unreadable files when sampling (a warning each, counted in
`unreadable` and in each sample's "skipped") and draw another frame instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dpa.errors import DpaError
from dpa.images import IMAGE_SUFFIXES, MASK_SUFFIXES, natural_key, read_rgb
from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb
from dpa.training.augment import AugmentConfig, AugmentParams, apply_augment, draw_augment_params

log = logging.getLogger(__name__)

LAYOUTS = ("davis2016", "youtube-vos", "preprocessed", "images", "duts")
_LAYOUT_ALIASES = {
    "davis": "davis2016",
    "davis16": "davis2016",
    "davis2016": "davis2016",
    "youtube-vos": "youtube-vos",
    "youtube_vos": "youtube-vos",
    "ytvos": "youtube-vos",
    "preprocessed": "preprocessed",
    "images": "images",
    "duts": "duts",
}
FLOW_SUFFIXES = (".png", ".jpg", ".jpeg")  # the first one present wins; `dpa flow` writes .png
MAX_DRAWS = 64  # consecutive unreadable draws before a dataset gives up (it is then mostly broken)


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


# ---------------------------------------------------------------------------------------------- listing


def _files_by_stem(directory: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """stem → path for the files in `directory` with one of `suffixes` (earlier suffixes win)."""
    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found
    rank = {suffix: i for i, suffix in enumerate(suffixes)}
    with os.scandir(directory) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            suffix = suffix.lower()
            if suffix not in rank or not entry.is_file():
                continue
            previous = found.get(stem)
            if previous is None or rank[suffix] < rank[previous.suffix.lower()]:
                found[stem] = Path(entry.path)
    return found


def _subdirectories(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    with os.scandir(directory) as entries:
        return sorted((entry.name for entry in entries if entry.is_dir()), key=natural_key)


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DpaError(f"dataset folder {root} does not exist (or is not a folder)")
    return root


def _skip(skipped: list[str], message: str) -> None:
    log.warning("skipped: %s", message)
    skipped.append(message)


def _mirror(root: Path, flow_root: str | Path | None, path: Path) -> Path:
    """`path` (inside root) moved under flow_root when one is given."""
    return path if flow_root is None else Path(flow_root) / path.relative_to(root)


def _assemble(
    name: str,
    rgb: dict[str, Path],
    masks: dict[str, Path],
    flow: dict[str, Path],
    flow_target: Callable[[str], Path],
    skipped: list[str],
    *,
    root: Path,
    layout: str,
    frames: Sequence[str] | None = None,
    masks_expected: bool = True,
    mask_labels: bool = False,
) -> VideoSequence | None:
    """A `VideoSequence` from per-frame dictionaries (keyed by frame name), or None when it has no frames.

    frames: the frames to keep, in order (default: every RGB frame in natural order); listed frames
    without an RGB image are skipped. masks_expected: frames without a mask are recorded in `skipped`
    (they stay in the sequence, usable as references) with one warning per sequence.
    """
    if frames is None:
        frames = sorted(rgb, key=natural_key)
    kept = []
    for frame in frames:
        if frame in rgb:
            kept.append(frame)
        else:
            _skip(skipped, f"{layout} sequence {name}: frame {frame} has no RGB image")
    if not kept:
        _skip(skipped, f"{layout} sequence {name}: no frames")
        return None
    unannotated = [frame for frame in kept if frame not in masks] if masks_expected else []
    if unannotated:
        shown = ", ".join(unannotated[:5]) + (" ..." if len(unannotated) > 5 else "")
        log.warning("%s sequence %s: %d frame(s) have no mask (%s)", layout, name, len(unannotated), shown)
        skipped.extend(f"{layout} sequence {name}: frame {frame} has no mask" for frame in unannotated)
    return VideoSequence(
        name=name,
        frames=list(kept),
        rgb=[rgb[frame] for frame in kept],
        flow=[flow.get(frame) for frame in kept],
        masks=[masks.get(frame) for frame in kept],
        flow_targets=[flow_target(frame) for frame in kept],
        mask_labels=mask_labels,
        root=root,
        layout=layout,
    )


def _finish(sequences: list[VideoSequence], skipped: list[str], root: Path, what: str) -> DatasetListing:
    if not sequences:
        raise DpaError(f"no usable sequences in {root} ({what})")
    return DatasetListing(sequences, skipped)


def _davis_split(root: Path, split: str) -> dict[str, list[str] | None]:
    """sequence → listed frames (None = every frame) for a DAVIS 2016 split ("all": every sequence folder)."""
    if split == "all":
        return dict.fromkeys(_subdirectories(root / "JPEGImages" / "480p"))
    for folder in ("480p", "2016"):
        path = root / "ImageSets" / folder / f"{split}.txt"
        if path.is_file():
            return _parse_davis_image_set(path)
    raise DpaError(
        f"DAVIS 2016 split '{split}' not found: looked for {root}/ImageSets/480p/{split}.txt and "
        f"{root}/ImageSets/2016/{split}.txt (use split 'all' for every sequence)"
    )


def _parse_davis_image_set(path: Path) -> dict[str, list[str] | None]:
    """Either frame lines ("/JPEGImages/480p/<seq>/00000.jpg /Annotations/...") or one sequence per line."""
    listing: dict[str, list[str] | None] = {}
    for line in path.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if "/" in tokens[0]:
            image = Path(tokens[0])
            frames = listing.setdefault(image.parent.name, [])
            if frames is not None:
                frames.append(image.stem)
        else:
            listing[tokens[0]] = None
    return listing


def _folder_sequence(
    name: str,
    rgb_dir: Path,
    mask_dir: Path,
    flow_dir: Path,
    skipped: list[str],
    *,
    flow: dict[str, Path] | None = None,
    **options,
) -> VideoSequence | None:
    """`_assemble` for a sequence whose frames, masks and flow images are `<frame>.*` files in three folders.

    flow: the flow files when found elsewhere than flow_dir (new flow is still written to flow_dir).
    """
    return _assemble(
        name,
        _files_by_stem(rgb_dir, IMAGE_SUFFIXES),
        _files_by_stem(mask_dir, MASK_SUFFIXES),
        flow if flow is not None else _files_by_stem(flow_dir, FLOW_SUFFIXES),
        lambda frame: flow_dir / f"{frame}.png",
        skipped,
        **options,
    )


def load_davis2016(root: str | Path, split: str = "train", flow_root: str | Path | None = None) -> DatasetListing:
    """DAVIS 2016 in its official layout; split "train", "val" or "all" (ImageSets, see the module doc)."""
    root = _existing_root(root)
    images = root / "JPEGImages" / "480p"
    if not images.is_dir():
        raise DpaError(f"{root} is not DAVIS 2016: {images} not found")
    skipped: list[str] = []
    sequences = []
    for name, frames in _davis_split(root, split).items():
        flow_dir = _mirror(root, flow_root, root / "FLOW" / "480p" / name)
        flow = _files_by_stem(flow_dir, FLOW_SUFFIXES)
        if not flow:
            flow = _files_by_stem(_mirror(root, flow_root, root / "JPEGFlows" / "480p" / name), FLOW_SUFFIXES)
        sequence = _folder_sequence(
            name, images / name, root / "Annotations" / "480p" / name, flow_dir, skipped,
            flow=flow, root=root, layout="davis2016", frames=frames,
        )
        if sequence is not None:
            sequences.append(sequence)
    return _finish(sequences, skipped, root, f"DAVIS 2016 split {split}")


def _split_folder(root: Path, split: str, marker: str) -> Path | None:
    """root/split when it holds `marker`, else root itself when it does (ROOT given as the split folder)."""
    if split and (root / split / marker).exists():
        return root / split
    if (root / marker).exists():
        return root
    return None


def load_youtube_vos(root: str | Path, split: str = "train", flow_root: str | Path | None = None) -> DatasetListing:
    """YouTube-VOS 2018: every JPEG frame is listed (references); masks only where annotated.

    ROOT may be the dataset root (with `<split>/JPEGImages`) or the split folder itself.
    """
    root = _existing_root(root)
    base = _split_folder(root, split, "JPEGImages")
    if base is None:
        raise DpaError(
            f"{root} is not YouTube-VOS: neither {root / split / 'JPEGImages'} nor {root / 'JPEGImages'} found"
        )
    skipped: list[str] = []
    sequences = []
    for name in _subdirectories(base / "JPEGImages"):
        flow_dir = _mirror(root, flow_root, base / "FLOW" / name)
        sequence = _folder_sequence(
            name, base / "JPEGImages" / name, base / "Annotations" / name, flow_dir, skipped,
            root=root, layout="youtube-vos", masks_expected=False, mask_labels=True,
        )
        if sequence is not None:
            sequences.append(sequence)
    return _finish(sequences, skipped, root, f"YouTube-VOS split {split}")


def _strip_sequence(stem: str, sequence: str) -> str:
    prefix = sequence + "_"
    return stem[len(prefix) :] if stem.startswith(prefix) and len(stem) > len(prefix) else stem


def load_preprocessed(root: str | Path, split: str = "train", flow_root: str | Path | None = None) -> DatasetListing:
    """The public DPA/TMO pre-processed layout and `dpa synth` output; the form is detected (module doc)."""
    root = _existing_root(root)
    skipped: list[str] = []
    sequences: list[VideoSequence] = []
    base = _split_folder(root, split, "RGB")
    if base is not None and _subdirectories(base / "RGB"):
        # one folder per sequence: RGB/<seq>/<frame>.*
        for name in _subdirectories(base / "RGB"):
            flow_dir = _mirror(root, flow_root, base / "FLOW" / name)
            sequence = _folder_sequence(
                name, base / "RGB" / name, base / "GT" / name, flow_dir, skipped, root=root, layout="preprocessed"
            )
            if sequence is not None:
                sequences.append(sequence)
    elif base is not None:
        # flat: RGB/<seq>_<frame>.*, the frame after the last underscore
        flow_dir = _mirror(root, flow_root, base / "FLOW")
        grouped: dict[str, list[dict[str, Path]]] = {}
        for kind, (directory, suffixes) in enumerate(
            ((base / "RGB", IMAGE_SUFFIXES), (base / "GT", MASK_SUFFIXES), (flow_dir, FLOW_SUFFIXES))
        ):
            for stem, path in _files_by_stem(directory, suffixes).items():
                name, underscore, frame = stem.rpartition("_")
                if not underscore or not name or not frame:
                    if kind == 0:
                        _skip(skipped, f"{path}: name is not <sequence>_<frame>")
                    continue
                grouped.setdefault(name, [{}, {}, {}])[kind][frame] = path
        for name in sorted(grouped, key=natural_key):
            rgb, masks, flow = grouped[name]
            if not rgb:
                continue
            sequence = _assemble(
                name,
                rgb,
                masks,
                flow,
                lambda frame, name=name: flow_dir / f"{name}_{frame}.png",
                skipped,
                root=root,
                layout="preprocessed",
            )
            if sequence is not None:
                sequences.append(sequence)
    else:
        # public test form: <split>/<seq>/RGB|GT|FLOW/<seq>_<frame>.*
        base = root / split if (root / split).is_dir() else root
        for name in _subdirectories(base):
            if not (base / name / "RGB").is_dir():
                continue
            flow_dir = _mirror(root, flow_root, base / name / "FLOW")
            per_kind = []
            for directory, suffixes in (
                (base / name / "RGB", IMAGE_SUFFIXES),
                (base / name / "GT", MASK_SUFFIXES),
                (flow_dir, FLOW_SUFFIXES),
            ):
                per_kind.append(
                    {_strip_sequence(stem, name): path for stem, path in _files_by_stem(directory, suffixes).items()}
                )
            stems = {_strip_sequence(stem, name): stem for stem in _files_by_stem(base / name / "RGB", IMAGE_SUFFIXES)}
            sequence = _assemble(
                name,
                *per_kind,
                lambda frame, flow_dir=flow_dir, stems=stems: flow_dir / f"{stems[frame]}.png",
                skipped,
                root=root,
                layout="preprocessed",
            )
            if sequence is not None:
                sequences.append(sequence)
        if not sequences:
            raise DpaError(
                f"{root} is not a pre-processed dataset: looked for {root / split / 'RGB'}, {root / 'RGB'} "
                f"and {base}/<sequence>/RGB"
            )
    return _finish(sequences, skipped, root, f"pre-processed split {split}")


def load_image_folders(root: str | Path, flow_root: str | Path | None = None) -> DatasetListing:
    """`ROOT/<seq>/JPEGImages/<frame>.jpg` + `Annotations/<frame>.png` (+ `FLOW/<frame>.png`)."""
    root = _existing_root(root)
    skipped: list[str] = []
    sequences = []
    for name in _subdirectories(root):
        if not (root / name / "JPEGImages").is_dir():
            continue
        flow_dir = _mirror(root, flow_root, root / name / "FLOW")
        sequence = _folder_sequence(
            name, root / name / "JPEGImages", root / name / "Annotations", flow_dir, skipped, root=root, layout="images"
        )
        if sequence is not None:
            sequences.append(sequence)
    return _finish(sequences, skipped, root, "looked for <sequence>/JPEGImages")


def load_duts(root: str | Path, splits: Sequence[str] = ("DUTS-TR", "DUTS-TE")) -> DatasetListing:
    """DUTS (image, mask) path pairs from `ROOT/<split>/<split>-Image|<split>-Mask` for each split.

    Also reads the pre-processed form `ROOT/<split>/RGB|GT` (the public `DUTS_train`) or `ROOT/RGB|GT`.
    A missing split is a warning (stage 1 uses train and test when both are there); none is an error.
    """
    root = _existing_root(root)
    skipped: list[str] = []
    folders = []
    for split in splits:
        if (root / split / f"{split}-Image").is_dir():
            folders.append((root / split / f"{split}-Image", root / split / f"{split}-Mask"))
        elif (root / split / "RGB").is_dir():
            folders.append((root / split / "RGB", root / split / "GT"))
        else:
            _skip(skipped, f"DUTS split {split} not found under {root}")
    if not folders and (root / "RGB").is_dir():
        folders.append((root / "RGB", root / "GT"))
    if not folders:
        raise DpaError(
            f"{root} is not DUTS: looked for " + ", ".join(f"{root}/{s}/{s}-Image" for s in splits) + f", {root}/RGB"
        )
    pairs = []
    for image_dir, mask_dir in folders:
        masks = _files_by_stem(mask_dir, MASK_SUFFIXES)
        for stem, image in sorted(_files_by_stem(image_dir, IMAGE_SUFFIXES).items()):
            if stem in masks:
                pairs.append((image, masks[stem]))
            else:
                _skip(skipped, f"{image}: no mask in {mask_dir}")
    if not pairs:
        raise DpaError(f"no image/mask pairs found in {root}")
    return DatasetListing(pairs, skipped)


def detect_layout(root: str | Path, split: str = "train") -> str:
    """The layout name of the dataset at ROOT (one of LAYOUTS); DpaError saying what was looked for."""
    root = _existing_root(root)
    if (root / "JPEGImages" / "480p").is_dir():
        return "davis2016"
    if (root / split / "JPEGImages").is_dir() or ((root / "JPEGImages").is_dir() and (root / "Annotations").is_dir()):
        return "youtube-vos"
    if (root / split / "RGB").is_dir() or ((root / "RGB").is_dir() and (root / "GT").is_dir()):
        return "preprocessed"
    if any(
        (root / d / "DUTS-TR-Image").is_dir() or (root / d / "DUTS-TE-Image").is_dir() for d in ("DUTS-TR", "DUTS-TE")
    ):
        return "duts"
    children = _subdirectories(root)
    if any((root / child / "JPEGImages").is_dir() for child in children):
        return "images"
    test_base = root / split if (root / split).is_dir() else root
    if any((test_base / child / "RGB").is_dir() for child in _subdirectories(test_base)):
        return "preprocessed"
    raise DpaError(
        f"no dataset layout recognised in {root}: looked for JPEGImages/480p (DAVIS 2016), "
        f"{split}/JPEGImages (YouTube-VOS), {split}/RGB or RGB+GT (pre-processed), "
        "DUTS-TR/DUTS-TR-Image (DUTS), <sequence>/JPEGImages (image folders); pass --layout to choose"
    )


def canonical_layout(layout: str) -> str:
    """A layout name or alias ("davis", "ytvos", ...) → its name in LAYOUTS."""
    try:
        return _LAYOUT_ALIASES[layout.lower()]
    except KeyError:
        raise DpaError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)} or auto") from None


def load_sequences(
    root: str | Path, layout: str = "auto", split: str = "train", flow_root: str | Path | None = None
) -> DatasetListing:
    """The video sequences of the dataset at ROOT (a `DatasetListing` of `VideoSequence`).

    layout: "auto" (detected) or one of LAYOUTS (aliases davis, ytvos accepted); split: DAVIS
    train/val/all, the YouTube-VOS or pre-processed split folder (ignored for `images`).
    """
    layout = detect_layout(root, split) if layout == "auto" else canonical_layout(layout)
    if layout == "davis2016":
        return load_davis2016(root, split, flow_root)
    if layout == "youtube-vos":
        return load_youtube_vos(root, split, flow_root)
    if layout == "preprocessed":
        return load_preprocessed(root, split, flow_root)
    if layout == "images":
        return load_image_folders(root, flow_root)
    raise DpaError(f"{root} holds still images (DUTS), not videos: it is stage-1 data (read with load_duts)")


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


# ---------------------------------------------------------------------------------------------- datasets


class _UnreadableFiles:
    """Reads frames, skipping (warning once, counting) files that are missing or cannot be decoded."""

    def __init__(self) -> None:
        self.paths: set[Path] = set()

    def rgb(self, path: Path | None, counter: list[int]) -> np.ndarray | None:
        return self._read(path, read_rgb_or_none, counter)

    def mask(self, path: Path | None, labels: bool, counter: list[int]) -> np.ndarray | None:
        return self._read(path, lambda p: read_mask_or_none(p, labels), counter)

    def _read(self, path, reader, counter: list[int]):
        if path is None or path in self.paths:
            return None
        image = reader(path)
        if image is None:
            log.warning("skipped unreadable file %s (missing or corrupt)", path)
            self.paths.add(path)
            counter[0] += 1
        return image


def _to_inputs(
    rgb: np.ndarray,
    flow: np.ndarray,
    mask: np.ndarray | None,
    params: AugmentParams | None,
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Augment (when params) then pre-process: rgb (3,S,S) normalised, flow (3,S,S) in [0,1], mask (S,S) bool."""
    if params is not None:
        rgb, flow, mask = apply_augment(params, rgb, flow, mask, size)
    elif mask is not None and mask.shape != (size, size):
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    return preprocess_rgb(rgb, size), preprocess_flow(flow, size), mask


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32)[None])  # (1, S, S) in {0, 1}


class _SeededItems(Dataset):
    """Item i of epoch e is `sample(i, default_rng([seed, e, i]))`: the same in every worker, process and
    resumed run. Subclasses set `seed`, `epoch` and `unreadable` and implement `sample`."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def skipped(self) -> int:
        """Unreadable files met so far in this process."""
        return len(self.unreadable.paths)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, np.random.default_rng([self.seed, self.epoch, index]))


class SaliencyDataset(_SeededItems):
    """Stage 1: still (image, mask) pairs (DUTS) for the appearance branch.

    Item: {"rgb": (3, S, S) float32 ImageNet-normalised, "flow": (3, S, S) float32 = the (augmented) RGB
    image scaled to [0, 1] (still images have no motion; stage 1 trains the appearance branch),
    "mask": (1, S, S) float32 in {0, 1}, "skipped": files skipped while building this item}.
    Deterministic in (seed, epoch, index); call `set_epoch` each epoch.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        size: int,
        augment: bool = True,
        seed: int = 0,
        augment_config: AugmentConfig | None = None,
    ):
        if not pairs:
            raise DpaError("no (image, mask) pairs to train on")
        self.pairs = list(pairs)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.augment_config = augment_config or AugmentConfig()
        self.epoch = 0
        self.unreadable = _UnreadableFiles()

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        """Item `index` with all randomness from `rng` (used by `MixedDataset`)."""
        params = draw_augment_params(rng, self.augment_config) if self.augment else None
        counter = [0]
        for _ in range(MAX_DRAWS):
            image_path, mask_path = self.pairs[index]
            rgb = self.unreadable.rgb(image_path, counter)
            mask = self.unreadable.mask(mask_path, False, counter) if rgb is not None else None
            if rgb is not None and mask is not None:
                break
            index = int(rng.integers(len(self.pairs)))
        else:
            raise DpaError(f"{MAX_DRAWS} image/mask pairs in a row could not be read; check the dataset files")
        if params is not None:
            rgb, _, mask = apply_augment(params, rgb, None, mask, self.size)
        rgb_input, flow_input, mask = _to_inputs(rgb, rgb, mask, None, self.size)
        return {
            "rgb": torch.from_numpy(rgb_input),
            "flow": torch.from_numpy(flow_input),
            "mask": _mask_tensor(mask),
            "skipped": counter[0],
        }


class ClipDataset(_SeededItems):
    """Stage 2: a query frame plus N reference frames of the same video.

    Queries are frames with a mask and a flow image; references are drawn uniformly from the video's
    frames with flow (annotated or not), distinct from each other and from the query where the video is
    long enough. One augmentation is drawn per item and applied to all N + 1 frames.
    samples_per_epoch: None → one item per query frame (index picks it); a number → that many items per
    epoch, each a random video then a random query frame in it.

    Item: {"rgb": (3, S, S), "flow": (3, S, S), "mask": (1, S, S) float32 {0,1},
    "reference_rgb": (N, 3, S, S), "reference_flow": (N, 3, S, S) (all float32, rgb normalised, flow in
    [0, 1]), "sequence": str, "frame": str, "skipped": files skipped while building this item}.
    Deterministic in (seed, epoch, index): `np.random.default_rng([seed, epoch, index])`.
    """

    def __init__(
        self,
        sequences: Sequence[VideoSequence],
        size: int,
        memory: int = 4,
        augment: bool = True,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        augment_config: AugmentConfig | None = None,
    ):
        if not sequences:
            raise DpaError("no video sequences to train on")
        if memory < 0:
            raise DpaError(f"memory (number of reference frames) must be >= 0, got {memory}")
        require_flow(sequences)
        self.sequences = list(sequences)
        self.size = size
        self.memory = memory
        self.augment = augment
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.augment_config = augment_config or AugmentConfig()
        self.epoch = 0
        self.unreadable = _UnreadableFiles()
        self.frames_without_flow = 0
        self.pools: list[list[int]] = []  # per sequence: frames with flow
        self.queries: list[tuple[int, int]] = []  # (sequence, frame) with mask and flow
        self.queries_by_sequence: dict[int, list[int]] = {}
        for s, sequence in enumerate(self.sequences):
            pool = sequence.with_flow
            if len(pool) < len(sequence):
                self.frames_without_flow += len(sequence) - len(pool)
                log.warning(
                    "sequence %s: %d of %d frames have no flow image and are not used",
                    sequence.name,
                    len(sequence) - len(pool),
                    len(sequence),
                )
            self.pools.append(pool)
            queries = [i for i in pool if sequence.masks[i] is not None]
            if queries:
                self.queries_by_sequence[s] = queries
                self.queries.extend((s, i) for i in queries)
        if not self.queries:
            raise DpaError("no frame has both a mask and a flow image: nothing to train on")
        self.query_sequences = sorted(self.queries_by_sequence)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.queries)

    def _random_query(self, rng: np.random.Generator) -> tuple[int, int]:
        s = self.query_sequences[int(rng.integers(len(self.query_sequences)))]
        frames = self.queries_by_sequence[s]
        return s, frames[int(rng.integers(len(frames)))]

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        """Item `index` with all randomness from `rng` (used by `MixedDataset`)."""
        params = draw_augment_params(rng, self.augment_config) if self.augment else None
        counter = [0]
        query = self.queries[index % len(self.queries)] if self.samples_per_epoch is None else self._random_query(rng)
        for _ in range(MAX_DRAWS):
            s, q = query
            sequence = self.sequences[s]
            rgb = self.unreadable.rgb(sequence.rgb[q], counter)
            flow = self.unreadable.rgb(sequence.flow[q], counter) if rgb is not None else None
            mask = self.unreadable.mask(sequence.masks[q], sequence.mask_labels, counter) if flow is not None else None
            if mask is not None:
                break
            query = self._random_query(rng)
        else:
            raise DpaError(f"{MAX_DRAWS} query frames in a row could not be read; check the dataset files")
        rgb_input, flow_input, mask = _to_inputs(rgb, flow, mask, params, self.size)
        references = [
            _to_inputs(reference_rgb, reference_flow, None, params, self.size)[:2]
            for reference_rgb, reference_flow in self._references(s, q, rng, counter, (rgb, flow))
        ]
        empty = np.zeros((0, 3, self.size, self.size), np.float32)
        return {
            "rgb": torch.from_numpy(rgb_input),
            "flow": torch.from_numpy(flow_input),
            "mask": _mask_tensor(mask),
            "reference_rgb": torch.from_numpy(np.stack([r for r, _ in references]) if references else empty),
            "reference_flow": torch.from_numpy(np.stack([f for _, f in references]) if references else empty),
            "sequence": sequence.name,
            "frame": sequence.frames[q],
            "skipped": counter[0],
        }

    def _references(
        self,
        s: int,
        q: int,
        rng: np.random.Generator,
        counter: list[int],
        query_images: tuple[np.ndarray, np.ndarray],
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """N (rgb, flow) reference images in frame order; unreadable frames are replaced by other frames.

        Distinct frames other than the query while the video has them; a shorter video repeats its
        frames (the query included).
        """
        sequence = self.sequences[s]
        loaded = {q: query_images}
        others = [i for i in self.pools[s] if i != q]
        chosen: list[int] = []
        while len(chosen) < self.memory:
            fresh = [i for i in others if i not in loaded]
            if not fresh:
                repeatable = sorted(loaded)
                chosen.append(repeatable[int(rng.integers(len(repeatable)))])
                continue
            frame = fresh[int(rng.integers(len(fresh)))]
            rgb = self.unreadable.rgb(sequence.rgb[frame], counter)
            flow = self.unreadable.rgb(sequence.flow[frame], counter) if rgb is not None else None
            if flow is None:
                others.remove(frame)
                continue
            loaded[frame] = (rgb, flow)
            chosen.append(frame)
        return [loaded[frame] for frame in sorted(chosen)]


class MixedDataset(Dataset):
    """Items drawn from several datasets with given probabilities (stage 2: DAVIS + YouTube-VOS, 1:1).

    Item `index` of epoch e: rng = `np.random.default_rng([seed, e, index])` picks the dataset (by
    `probabilities`, normalised to sum 1), then a uniform item of it, which is built with the same rng
    through the dataset's `sample(item, rng)`. So two indices never share augmentation or references,
    and the whole item is a function of (seed, epoch, index).
    """

    def __init__(self, datasets: Sequence[Dataset], probabilities: Sequence[float], length: int, seed: int = 0):
        if not datasets or len(datasets) != len(probabilities):
            raise DpaError(f"{len(datasets)} datasets but {len(probabilities)} probabilities")
        weights = np.asarray(probabilities, np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise DpaError(f"mixing probabilities must be non-negative and not all zero, got {list(probabilities)}")
        if length <= 0:
            raise DpaError(f"length must be positive, got {length}")
        for dataset in datasets:
            if not hasattr(dataset, "sample"):
                raise DpaError(f"{type(dataset).__name__} has no sample(index, rng) method to be mixed")
        self.datasets = list(datasets)
        self.probabilities = weights / weights.sum()
        self.length = length
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    @property
    def skipped(self) -> int:
        """Unreadable files met so far in this process, over all datasets."""
        return sum(dataset.skipped for dataset in self.datasets)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self.probabilities))]
        return dataset.sample(int(rng.integers(len(dataset))), rng)


class OfflineClip:
    """Evaluation: every frame of one sequence in order, read and pre-processed lazily (no augmentation).

    clip[i] → {"rgb": (3, S, S) float32 ImageNet-normalised, "flow": (3, S, S) float32 in [0, 1],
    "mask": (H, W) bool at the frame's original resolution or None (not annotated / unreadable),
    "frame": str, "index": i}; numpy arrays. clip[i] raises DpaError when the frame's RGB or flow image
    cannot be read; iterating skips such frames with a warning and counts them in `skipped`.
    Frames without a flow image (e.g. a last frame) use the nearest frame's flow, with a warning.
    """

    def __init__(self, sequence: VideoSequence, size: int):
        require_flow([sequence])
        self.sequence = sequence
        self.size = size
        self.skipped = 0
        with_flow = sequence.with_flow
        self.flow_paths = [
            sequence.flow[min(with_flow, key=lambda j, i=i: (abs(i - j), j))] for i in range(len(sequence))
        ]
        if len(with_flow) < len(sequence):
            log.warning(
                "sequence %s: %d frames have no flow image; they use the nearest frame's flow",
                sequence.name,
                len(sequence) - len(with_flow),
            )

    @property
    def name(self) -> str:
        return self.sequence.name

    @property
    def frames(self) -> list[str]:
        return self.sequence.frames

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, index: int) -> dict:
        item, problem = self._load(index)
        if item is None:
            raise DpaError(problem)
        return item

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self)):
            item, problem = self._load(index)
            if item is None:
                log.warning("skipped: %s", problem)
                self.skipped += 1
                continue
            yield item

    def _load(self, index: int) -> tuple[dict | None, str]:
        sequence = self.sequence
        if not -len(sequence) <= index < len(sequence):
            raise IndexError(f"frame index {index} out of range for {len(sequence)} frames")
        index %= len(sequence)
        rgb = read_rgb_or_none(sequence.rgb[index])
        if rgb is None:
            return None, f"sequence {sequence.name} frame {sequence.frames[index]}: cannot read {sequence.rgb[index]}"
        flow = read_rgb_or_none(self.flow_paths[index])
        if flow is None:
            return (
                None,
                f"sequence {sequence.name} frame {sequence.frames[index]}: cannot read {self.flow_paths[index]}",
            )
        mask = None
        if sequence.masks[index] is not None:
            mask = read_mask_or_none(sequence.masks[index], sequence.mask_labels)
            if mask is None:
                log.warning("skipped unreadable mask %s", sequence.masks[index])
                self.skipped += 1
        return {
            "rgb": preprocess_rgb(rgb, self.size),
            "flow": preprocess_flow(flow, self.size),
            "mask": mask,
            "frame": sequence.frames[index],
            "index": index,
        }, ""
