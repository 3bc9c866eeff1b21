"""Torch datasets for training and evaluation (SPEC §3), sampled from listed `VideoSequence`s
(`dpa.training.layouts`) or still (image, mask) pairs.

Unreadable files never stop training: datasets skip them when sampling (a warning each, counted in
`unreadable` and in each sample's "skipped") and draw another frame instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dpa.errors import DpaError
from dpa.runtime.flow import model_flow_estimator, offline_flow, zero_flow
from dpa.runtime.preprocess import preprocess_flow, preprocess_rgb
from dpa.training.augment import AugmentConfig, AugmentParams, apply_augment, draw_augment_params
from dpa.training.camera import FOLLOW_RANGE, follow_shift, followed_flow_image
from dpa.training.sequences import VideoSequence, read_mask_or_none, read_rgb_or_none, require_flow

log = logging.getLogger(__name__)

MAX_DRAWS = 64  # consecutive unreadable draws before a dataset gives up (it is then mostly broken)


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
    camera_motion: the chance that an item is seen from a camera following its object (`dpa.training.camera`):
    its flow images are then computed live, shifted and rendered, instead of read (0: never, the default).
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
        camera_motion: float = 0.0,
    ):
        if not sequences:
            raise DpaError("no video sequences to train on")
        if memory < 0:
            raise DpaError(f"memory (number of reference frames) must be >= 0, got {memory}")
        if not 0 <= camera_motion <= 1:
            raise DpaError(f"camera motion is a probability in [0, 1], got {camera_motion}")
        require_flow(sequences)
        self.sequences = list(sequences)
        self.size = size
        self.memory = memory
        self.augment = augment
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.augment_config = augment_config or AugmentConfig()
        self.camera_motion = camera_motion
        self._estimator = None  # DIS at S for camera motion, made where it is used (each loading process)
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
        follow = self._draw_follow(rng)
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
        chosen = self._references(s, q, rng, counter, (rgb, flow))
        if follow is not None:
            followed = self._followed_flows(sequence, {q: rgb, **{f: r for f, r, _ in chosen}}, q, mask, follow,
                                            counter)
            if followed is not None:
                flow = followed[q]
                chosen = [(f, r, followed[f]) for f, r, _ in chosen]
        rgb_input, flow_input, mask = _to_inputs(rgb, flow, mask, params, self.size)
        references = [
            _to_inputs(reference_rgb, reference_flow, None, params, self.size)[:2]
            for _, reference_rgb, reference_flow in chosen
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
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """N (frame, rgb, flow) reference images in frame order; unreadable frames are replaced by other frames.

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
        return [(frame, *loaded[frame]) for frame in sorted(chosen)]

    def _draw_follow(self, rng: np.random.Generator) -> float | None:
        """The followed fraction f of an item seen from a following camera, None for the item as filmed. Draws two
        values when camera motion is on and none when it is off (so runs without it sample as they always did)."""
        if self.camera_motion <= 0:
            return None
        chosen = rng.random() < self.camera_motion
        follow = float(rng.uniform(*FOLLOW_RANGE))
        return follow if chosen else None

    def _followed_flows(
        self,
        sequence: VideoSequence,
        frames: dict[int, np.ndarray],
        query: int,
        mask: np.ndarray,
        follow: float,
        counter: list[int],
    ) -> dict[int, np.ndarray] | None:
        """Frame -> flow image seen from a camera following `follow` of the query object's motion
        (`dpa.training.camera`); None (keep the stored images) when a neighbour frame is unreadable or the query
        has no object."""
        if self._estimator is None:
            self._estimator = model_flow_estimator(self.size)
        flows = {}
        for frame, rgb in frames.items():
            flow = self._live_flow(sequence, frame, rgb, counter)
            if flow is None:
                return None
            flows[frame] = flow
        shift = follow_shift(flows[query], mask, follow)
        if shift is None:
            return None
        return {frame: followed_flow_image(flow, shift) for frame, flow in flows.items()}

    def _live_flow(self, sequence: VideoSequence, frame: int, rgb: np.ndarray, counter: list[int]) -> np.ndarray | None:
        """`offline_flow` of `frame` from it and its neighbour (the next frame, the previous one for the last);
        None when the neighbour cannot be read."""
        neighbour = frame + 1 if frame + 1 < len(sequence) else frame - 1
        if neighbour < 0:
            return zero_flow(rgb, self._estimator)
        other = self.unreadable.rgb(sequence.rgb[neighbour], counter)
        if other is None:
            return None
        window, position = ([rgb, other], 0) if neighbour > frame else ([other, rgb], 1)
        return offline_flow(window, position, self._estimator)


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
