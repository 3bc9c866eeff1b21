"""The training data of `dpa train`: the datasets behind --data, and which samples each rank sees at each step.

Determinism: the sample behind global index g = step * global_batch + k is a pure function of
(seed, g), rank r takes k in [r * local_batch, (r + 1) * local_batch). So a run on W processes sees
exactly the global batches of a single-process run, and a resumed run continues with the very samples
the uninterrupted run would have used.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dpa.errors import DpaError
from dpa.training.config import ModelConfig
from dpa.training.settings import TrainSettings


class GlobalIndexDataset(Dataset):
    """Maps a global sample index onto (epoch, index) of a finite dataset with `set_epoch`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, global_index: int):
        epoch, index = divmod(global_index, len(self.dataset))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class StepSampler(Sampler[int]):
    """Yields this rank's global sample indices for steps [start, stop)."""

    def __init__(self, start: int, stop: int, global_batch: int, rank: int, world: int):
        self.start, self.stop, self.global_batch = start, stop, global_batch
        self.local_batch = global_batch // world
        self.offset = rank * self.local_batch

    def __len__(self) -> int:
        return (self.stop - self.start) * self.local_batch

    def __iter__(self):
        for step in range(self.start, self.stop):
            base = step * self.global_batch + self.offset
            yield from range(base, base + self.local_batch)


def _split_root(spec: str) -> tuple[str, str]:
    root, _, layout = spec.partition(":")
    return root, layout or "auto"


def _data_sources(settings: TrainSettings) -> list[tuple[str, str | None]]:
    """(data spec, flow root or None) per --data; DpaError for missing roots or unpaired flow roots."""
    if not settings.data:
        raise DpaError("no training data: pass --data ROOT[:LAYOUT] (see `dpa synth` for a synthetic set)")
    if settings.flow_roots and len(settings.flow_roots) != len(settings.data):
        raise DpaError(f"{len(settings.flow_roots)} --flow-root for {len(settings.data)} --data: give one per "
                       "--data, in the same order, or none")
    flow_roots = settings.flow_roots or [None] * len(settings.data)
    for spec, flow_root in zip(settings.data, flow_roots, strict=True):
        for path, what in ((_split_root(spec)[0], "training data"), (flow_root, "flow root")):
            if path is not None and not Path(path).exists():
                raise DpaError(f"{what} {path} does not exist")
    return list(zip(settings.data, flow_roots, strict=True))


def _sequences(settings: TrainSettings, root: str, layout: str, flow_root: str | None):
    from dpa.training.layouts import load_sequences
    from dpa.training.sequences import select_sequences

    listing = load_sequences(root, layout=layout, split=settings.split, flow_root=flow_root)
    return select_sequences(listing, settings.sequences, settings.exclude)


def imagenet_frames(settings: TrainSettings, config: ModelConfig, count: int = 16) -> torch.Tensor:
    """(count, 3, S, S) frames of the first --data root, spread over it: what a narrow encoder's ImageNet filters
    are chosen on (`dpa.training.imagenet`)."""
    from dpa.training.layouts import detect_layout, load_duts
    from dpa.training.sequences import sample_frames

    spec, flow_root = _data_sources(settings)[0]
    root, layout = _split_root(spec)
    if layout in ("duts", "auto") and detect_layout(root, settings.split) == "duts":
        paths = [image for image, _ in load_duts(root)]
    else:
        paths = [path for sequence in _sequences(settings, root, layout, flow_root) for path in sequence.rgb]
    return torch.from_numpy(sample_frames(paths, count, config.size))


def build_dataset(settings: TrainSettings, config: ModelConfig) -> Dataset:
    """Stage 1: saliency images (DUTS); stage 2: clips (query + N references) from every root, mixed."""
    from dpa.training.datasets import ClipDataset, MixedDataset, SaliencyDataset
    from dpa.training.layouts import canonical_layout, detect_layout, load_duts
    from dpa.training.sequences import pairs_from_sequences

    if settings.stage == 1 and settings.camera_motion:
        raise DpaError("--camera-motion applies to stage 2 (video clips); stage 1 trains on still images")
    parts = []
    for spec, flow_root in _data_sources(settings):
        root, layout = _split_root(spec)
        if settings.stage == 1:
            if layout == "auto":
                resolved = detect_layout(root, settings.split)
            else:
                resolved = canonical_layout(layout)
            if resolved == "duts":
                pairs = load_duts(root)
            else:  # video data used as still images
                pairs = pairs_from_sequences(_sequences(settings, root, resolved, flow_root))
            parts.append(SaliencyDataset(pairs, config.size, augment=settings.augment, seed=settings.seed))
        else:
            sequences = _sequences(settings, root, layout, flow_root)
            parts.append(ClipDataset(sequences, config.size, memory=config.memory, augment=settings.augment,
                                     seed=settings.seed, camera_motion=settings.camera_motion))
    if len(parts) == 1:
        return parts[0]
    length = sum(len(part) for part in parts)
    return MixedDataset(parts, [1 / len(parts)] * len(parts), length=length, seed=settings.seed)


def make_loader(
    settings: TrainSettings, config: ModelConfig, start: int, stop: int, rank: int, world: int
) -> DataLoader:
    """This rank's batches for steps [start, stop): local batch = global batch / world (see the module doc)."""
    return DataLoader(
        GlobalIndexDataset(build_dataset(settings, config)),
        batch_size=settings.batch_size // world,
        sampler=StepSampler(start, stop, settings.batch_size, rank, world),
        num_workers=settings.workers,
        persistent_workers=settings.workers > 0,
        drop_last=False,
        worker_init_fn=_worker_signals,
    )


def _worker_signals(worker_id: int) -> None:
    """Data-loading workers leave SIGINT, SIGHUP and SIGTERM to the training process, which stops at the next step
    (saving last.pt) and then shuts them down. Ctrl-C in a terminal, `kill -- -PGID` and a service manager's stop
    signal the whole process group: a worker that died of it would crash the training process instead
    (PyTorch raises "DataLoader worker ... killed by signal" wherever the main process is). A worker whose training
    process is gone exits by itself (PyTorch's watchdog on the parent's PID); SIGKILL still ends it."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
