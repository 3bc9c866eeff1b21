"""Calibration feeds: what every stage graph receives when the fp32 chain runs on real frames. Torch-free.

One input contract (STYLE: calibration, comparison and replay consume the same feeds): for each graph an
iterable of input name -> array dicts, exactly as `StageChain` fed the graph. They are recorded by running an
export's fp32 graphs (ONNX Runtime, CPU) over real clips the way offline inference does: DIS flow in the offline
direction, the memory primed with the paper's reference frames k_i = floor(i (L-1) / (N-1)) of each clip, then
every frame encoded and decoded against that memory. The memory graph is recorded on the reference frames (the
entries the decoder reads) and on every other frame too (the same input distribution, more samples).

On disk (`save_feeds` / `load_feeds`), a folder holding:

- `<graph>.npz`: one array per graph input, named like the input, stacked over samples: (K, *input shape),
  dtype as the manifest declares (float32);
- `feeds.json` (format `dpa-feeds/1`): the export it was recorded from (config, S, N, weights sha256, form), the
  flow, the clips (name, source, frames, reference frames) and per graph the sample count, the inputs (name,
  shape, dtype) and each sample's origin {"clip", "frame", "role": "frame" | "reference"}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpa.calibration.clips import LabelledClip, offline_flows
from dpa.errors import DpaError
from dpa.files import atomic_path, write_text_atomically
from dpa.manifest import Manifest
from dpa.progress import Bar

log = logging.getLogger(__name__)

FEEDS_FORMAT = "dpa-feeds/1"
FEEDS_INDEX = "feeds.json"
FEEDS_FOLDER = "feeds"


@dataclass
class FeedSet:
    """Recorded feeds of every graph.

    arrays: graph -> input -> (K, *shape) stacked samples; origins: graph -> one {"clip", "frame", "role"} per
    sample; export: what they were recorded from; clips: per clip {"name", "source", "frames", "references"};
    flow: how the flow was computed.
    """

    arrays: dict[str, dict[str, np.ndarray]]
    origins: dict[str, list[dict]]
    export: dict
    clips: list[dict] = field(default_factory=list)
    flow: str = ""

    @property
    def graphs(self) -> list[str]:
        return list(self.arrays)

    def count(self, graph: str) -> int:
        """Number of samples of `graph` (0 when none were recorded)."""
        return len(self.origins.get(graph, []))

    def feeds(self, graph: str, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The samples of `graph` in recording order as input name -> array (the input's own shape);
        limit: at most that many, spread evenly over the samples."""
        count = self.count(graph)
        if count == 0:
            raise DpaError(f"no calibration feeds were recorded for graph {graph!r}")
        indices = range(count) if limit is None or limit >= count else np.linspace(0, count - 1, limit).round()
        arrays = self.arrays[graph]
        for index in indices:
            yield {name: np.ascontiguousarray(array[int(index)]) for name, array in arrays.items()}


class _Recorder:
    """Wraps an engine's runners so that every feed they receive is copied to the host, tagged with the current
    `origin`."""

    def __init__(self, engine):
        self.engine = engine
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in engine.runners}
        self.origins: dict[str, list[dict]] = {name: [] for name in engine.runners}
        self.origin: dict | None = None  # None: do not record
        self.capture: set[str] = set(engine.runners)

    def recording_engine(self):
        """The engine, answering through recording runners."""
        return self.engine.with_runners({name: _RecordingRunner(self, name) for name in self.engine.runners})


class _RecordingRunner:
    def __init__(self, recorder: _Recorder, graph: str):
        self.recorder = recorder
        self.graph = graph
        self.runner = recorder.engine.runners[graph]
        self.name, self.input_names, self.output_names = graph, self.runner.input_names, self.runner.output_names

    @property
    def last_seconds(self) -> float:
        return self.runner.last_seconds

    def _record(self, feed) -> None:
        recorder = self.recorder
        if recorder.origin is not None and self.graph in recorder.capture:
            download = recorder.engine.transfer.download
            recorder.feeds[self.graph].append({name: np.array(download(value), copy=True)
                                               for name, value in feed.items()})
            recorder.origins[self.graph].append(dict(recorder.origin))

    def run_resident(self, feed):
        self._record(feed)
        return self.runner.run_resident(feed)

    def run(self, output_names, feed):
        self._record(feed)
        return self.runner.run(output_names, feed)

    def infer(self, feed):
        self._record(feed)
        return self.runner.infer(feed)


def record_feeds(
    export_dir: str | Path, clips: list[LabelledClip], threads: int | None = None, progress: bool = True
) -> FeedSet:
    """Run the fp32 graphs of `export_dir` (ONNX Runtime, CPU) over `clips` and record every graph's feeds.

    Per clip: offline DIS flow, memory primed with the paper's reference frames (their memory-graph feeds are
    recorded with role "reference"), then every frame segmented (encoder, ima, decoder feeds, role "frame") and
    the memory graph run on each non-reference frame as well (role "frame"). Raises DpaError without clips.
    """
    from dpa.runtime.chain import StageChain
    from dpa.runtime.engines import open_engine

    if not clips:
        raise DpaError("calibration needs real frames: pass --frames with clip folders or synthetic:SEED "
                       "(random data is never used)")
    manifest = Manifest.load(export_dir)
    if manifest.precision != "fp32":
        raise DpaError(f"{export_dir} holds the {manifest.precision} variant; record feeds from the fp32 export")
    engine = open_engine(export_dir, "onnxruntime", device="cpu", threads=threads)
    recorder = _Recorder(engine)
    chain = StageChain(recorder.recording_engine())
    clip_records, flow_source = [], ""
    with Bar(sum(clip.length for clip in clips), "record feeds", "frame", enabled=progress) as bar:
        for clip in clips:
            flows, flow_source = offline_flows(clip.frames, manifest.size)
            clip_records.append(_record_clip(recorder, chain, clip, flows, bar.advance))
    arrays = {
        graph: {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]}
        for graph, feeds in recorder.feeds.items() if feeds
    }
    export = {"directory": str(Path(export_dir).resolve()), "config": manifest.config_name,
              "size": manifest.size, "memory": manifest.memory,
              "weights_sha256": manifest.model.weights_sha256, "form": engine.form}
    engine.close()
    return FeedSet(arrays, {g: o for g, o in recorder.origins.items() if o}, export, clip_records, flow_source)


def _record_clip(recorder: _Recorder, chain, clip: LabelledClip, flows: list[np.ndarray],
                 frame_done: Callable[[], object]) -> dict:
    """Record one clip's feeds through `chain` (which answers through `recorder`): the memory primed with the
    reference frames, then every frame segmented; `frame_done` is called after each frame. Returns the clip's
    record {"name", "source", "frames", "references"}."""
    from dpa.runtime.memory import OfflinePolicy
    from dpa.runtime.segmenter import Segmenter

    memory = chain.memory
    policy = OfflinePolicy(clip.length, memory.capacity) if memory else None
    segmenter = Segmenter(chain, policy, keep_values=bool(memory))
    references = sorted(set(policy.references)) if policy else []
    if memory:
        _prime_references(recorder, chain, segmenter, clip, flows, references)
    for index, (frame, flow) in enumerate(zip(clip.frames, flows, strict=True)):
        recorder.origin = {"clip": clip.name, "frame": index, "role": "frame"}
        result = segmenter.segment(frame, flow, index)
        if memory and index not in references:
            chain.run_graph(memory.graph, memory.inputs, result.values)
        frame_done()
    recorder.origin = None
    return {"name": clip.name, "source": clip.source, "frames": clip.length,
            "references": policy.references if policy else []}


def _prime_references(recorder: _Recorder, chain, segmenter, clip: LabelledClip, flows: list[np.ndarray],
                      references: list[int]) -> None:
    """Write the memory entries of the reference frames into the segmenter's bank, recording only the memory
    graph's feeds (role "reference")."""
    policy, memory = segmenter.policy, chain.memory
    recorder.capture = {memory.graph}  # the reference frames' encoder feeds come again as frames below
    for index in references:
        recorder.origin = {"clip": clip.name, "frame": index, "role": "reference"}
        rgb, flow = segmenter.model_inputs(clip.frames[index], flows[index])
        entry = chain.memory_entry(chain.frame_values(rgb, flow))
        for slot in policy.slots_of(index):
            segmenter.bank.write(slot, entry)
    recorder.capture = set(recorder.engine.runners)


def save_feeds(feeds: FeedSet, directory: str | Path) -> Path:
    """Write `feeds` as <directory>/<graph>.npz + feeds.json; returns the index path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create {directory}: {error}") from error
    graphs = {}
    for graph, arrays in feeds.arrays.items():
        file = f"{graph}.npz"
        with atomic_path(directory / file) as temporary:
            np.savez(temporary, **arrays)
        graphs[graph] = {
            "file": file,
            "count": feeds.count(graph),
            "inputs": [{"name": name, "shape": list(array.shape[1:]), "dtype": str(array.dtype)}
                       for name, array in arrays.items()],
            "samples": feeds.origins[graph],
        }
    index = {"format": FEEDS_FORMAT, "export": feeds.export, "flow": feeds.flow, "clips": feeds.clips,
             "graphs": graphs}
    path = directory / FEEDS_INDEX
    write_text_atomically(path, json.dumps(index, indent=1) + "\n")
    return path


def load_feeds(directory: str | Path) -> FeedSet:
    """Read a feeds folder written by `save_feeds` (every array into memory)."""
    directory = Path(directory)
    path = directory / FEEDS_INDEX
    if not path.is_file():
        raise DpaError(f"{path} not found: record feeds with `dpa calibrate EXPORT_DIR --frames …`")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DpaError(f"cannot read {path}: {error}") from error
    if index.get("format") != FEEDS_FORMAT:
        raise DpaError(f"{path} is not a {FEEDS_FORMAT} index")
    arrays, origins = {}, {}
    for graph, entry in index["graphs"].items():
        file = directory / entry["file"]
        if not file.is_file():
            raise DpaError(f"{file} is missing: the feeds folder is incomplete; record it again")
        with np.load(file) as stored:
            arrays[graph] = {name: stored[name] for name in stored.files}
        origins[graph] = entry["samples"]
        for tensor in entry["inputs"]:
            array = arrays[graph].get(tensor["name"])
            if array is None or list(array.shape) != [entry["count"], *tensor["shape"]]:
                raise DpaError(f"{file}: input {tensor['name']} does not match {path}; record the feeds again")
    return FeedSet(arrays, origins, index["export"], index.get("clips", []), index.get("flow", ""))


def check_feeds_match(feeds: FeedSet, manifest: Manifest) -> None:
    """DpaError unless `feeds` were recorded from graphs with the manifest's weights and input shapes."""
    if feeds.export.get("weights_sha256") != manifest.model.weights_sha256:
        raise DpaError("these feeds were recorded from other weights (weights sha256 differs); record them again "
                       "from this export")
    for graph, spec in manifest.graphs.items():
        if graph not in feeds.arrays:
            raise DpaError(f"no feeds for graph {graph!r}; record them again from this export")
        for tensor in spec.inputs:
            array = feeds.arrays[graph].get(tensor.name)
            if array is None or tuple(array.shape[1:]) != tensor.shape:
                raise DpaError(f"feeds of {graph}/{tensor.name} do not match the graph's input "
                               f"{list(tensor.shape)}; record them again from this export")
