"""Dataset layouts on disk (SPEC §3) → `DatasetListing`s of `VideoSequence` (or of still (image, mask) pairs).

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
`DatasetListing.skipped` (the torch datasets, `dpa.training.datasets`, skip unreadable files when sampling).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from dpa.errors import DpaError
from dpa.images import IMAGE_SUFFIXES, MASK_SUFFIXES, natural_key
from dpa.training.sequences import DatasetListing, VideoSequence

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
    base = _split_folder(root, split, "RGB")
    if base is not None and _subdirectories(base / "RGB"):
        sequences = _preprocessed_folder_per_sequence(root, base, flow_root, skipped)
    elif base is not None:
        sequences = _preprocessed_flat(root, base, flow_root, skipped)
    else:
        base = root / split if (root / split).is_dir() else root
        sequences = _preprocessed_test_form(root, base, flow_root, skipped)
        if not sequences:
            raise DpaError(
                f"{root} is not a pre-processed dataset: looked for {root / split / 'RGB'}, {root / 'RGB'} "
                f"and {base}/<sequence>/RGB"
            )
    return _finish(sequences, skipped, root, f"pre-processed split {split}")


def _preprocessed_folder_per_sequence(
    root: Path, base: Path, flow_root: str | Path | None, skipped: list[str]
) -> list[VideoSequence]:
    """The sequences of `base/RGB/<seq>/<frame>.*` (with GT/<seq>/ and FLOW/<seq>/ alongside)."""
    sequences = []
    for name in _subdirectories(base / "RGB"):
        flow_dir = _mirror(root, flow_root, base / "FLOW" / name)
        sequence = _folder_sequence(
            name, base / "RGB" / name, base / "GT" / name, flow_dir, skipped, root=root, layout="preprocessed"
        )
        if sequence is not None:
            sequences.append(sequence)
    return sequences


def _preprocessed_flat(root: Path, base: Path, flow_root: str | Path | None, skipped: list[str]) -> list[VideoSequence]:
    """The sequences of flat `base/RGB|GT|FLOW/<seq>_<frame>.*` files, the frame after the last underscore."""
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
    sequences = []
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
    return sequences


def _preprocessed_test_form(
    root: Path, base: Path, flow_root: str | Path | None, skipped: list[str]
) -> list[VideoSequence]:
    """The sequences of the public test form `base/<seq>/RGB|GT|FLOW/<seq>_<frame>.*`."""
    sequences = []
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
    return sequences


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

