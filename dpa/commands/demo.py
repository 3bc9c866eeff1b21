"""`dpa demo`: the main job on its embedded default (SPEC §5).

The tiny checkpoint shipped in the repository is exported (once; reused while the checkpoint is unchanged),
opened on the best backend present, and run through the live loop on a synthetic clip streamed through
GStreamer. The output is an annotated video, mask PNGs, statistics and a report scored against the clip's
exact ground truth, or against a DAVIS-style folder's Annotations/ when --source is one. Importing this module
loads no torch; exporting does, only when no export is cached.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dpa.errors import DpaError
from dpa.files import file_sha256, write_text_atomically
from dpa.outputs import FOLDER, Output, claim_outputs

DEMO_SEED = 2026  # never used for training (train: seeds from 0, held-out test: 1000+)
DEFAULT_SOURCE = f"test://synthetic?seed={DEMO_SEED}&frames=96&size=256&fps=15"


def checkpoint_path(checkpoint: str) -> Path:
    """A shipped checkpoint's name (tiny, small) or a checkpoint path -> an existing file (without importing torch:
    a cached export needs none)."""
    shipped = Path(str(resources.files("dpa.training") / "checkpoints")) / f"{checkpoint}.pt"
    path = shipped if "/" not in checkpoint and not checkpoint.endswith(".pt") else Path(checkpoint)
    if not path.is_file():
        raise DpaError(f"checkpoint {checkpoint!r} not found at {path}")
    return path


def ensure_export(checkpoint: Path, directory: Path, say=print) -> tuple[Path, bool]:
    """Export `checkpoint` to `directory` unless an export of the same checkpoint file is there already.

    Returns (directory, whether it was exported now). Exporting needs the training extra (PyTorch).
    """
    from dpa.manifest import MANIFEST_NAME, Manifest

    digest = file_sha256(checkpoint)
    if (directory / MANIFEST_NAME).is_file() and Manifest.load(directory).checkpoint.sha256 == digest:
        return directory, False
    say(f"exporting {checkpoint} to {directory} (once; later runs reuse it)")
    try:
        from dpa.export.exporter import export_stage_graphs, model_for_export
    except ModuleNotFoundError as error:
        raise DpaError(f"exporting the demo checkpoint needs PyTorch ({error.name} is missing): run scripts/setup.sh, "
                       "or pass --export DIR with graphs exported on another machine") from error
    model, weights = model_for_export(str(checkpoint), None, None, None)
    export_stage_graphs(model, directory, weights)
    return directory, True


@dataclass
class GroundTruth:
    """The exact masks of the demo's source, by frame name: regenerated from the seed for `test://synthetic`,
    read from `Annotations/` for a DAVIS-style sequence folder (`SEQ/JPEGImages/*.jpg` + `SEQ/Annotations/*.png`).
    Frames without a mask (DAVIS 2017-style sparse annotations) are not scored."""

    masks: dict[str, np.ndarray | Path]  # by the frame names the run gives its mask files
    what: str
    synthetic: bool = False

    @classmethod
    def of(cls, source: str) -> GroundTruth | None:
        """The masks of a source URI, or None where the source has none (camera, file, RTSP, plain folder)."""
        from dpa.runtime.video import parse_source, stream_frame_name
        from dpa.synthetic import generate_clip

        spec = parse_source(source)
        if spec.kind == "synthetic":
            options = spec.options
            _, masks = generate_clip(np.random.default_rng(int(options["seed"])), int(options["frames"]),
                                     int(options["size"]))
            return cls({stream_frame_name(index): mask for index, mask in enumerate(masks)},
                       "the exact synthetic masks", synthetic=True)
        if spec.kind == "folder":
            from dpa.images import MASK_SUFFIXES

            root = Path(spec.location)
            sequence = root.parent if root.name == "JPEGImages" else root
            annotations = sequence / "Annotations"
            if annotations.is_dir():
                masks = {path.stem: path for path in annotations.iterdir() if path.suffix.lower() in MASK_SUFFIXES}
                return cls(masks, f"the ground truth in {annotations}") if masks else None
        return None

    def mask(self, name: str) -> np.ndarray | None:
        """Frame `name`'s mask (bool), or None when it has none."""
        from dpa.training.evaluate import read_mask

        mask = self.masks.get(name)
        return read_mask(mask) if isinstance(mask, Path) else mask


def score_masks(mask_dir: Path, truth: GroundTruth) -> dict:
    """DAVIS J/F/G of the mask PNGs written by the run (named by frame) against the ground truth."""
    from dpa.training.evaluate import read_mask, score_sequence

    triples = []
    for path in sorted(mask_dir.glob("*.png")):
        expected = truth.mask(path.stem)
        if expected is None:
            continue
        prediction = read_mask(path)  # DpaError naming the file when it cannot be read
        if prediction.shape != expected.shape:
            raise DpaError(f"mask {path} is {prediction.shape[1]}x{prediction.shape[0]}, {truth.what} "
                           f"{expected.shape[1]}x{expected.shape[0]}")
        triples.append((path.stem, expected, prediction))
    if not triples:
        raise DpaError(f"no masks in {mask_dir} match {truth.what}")
    scores = score_sequence(triples)
    return {"J_mean": scores["J"]["mean"], "F_mean": scores["F"]["mean"], "G": scores["G"],
            "frames_scored": len(triples), "against": truth.what, "per_frame": scores["frames"]}


def run_demo(out: Path, checkpoint: str = "tiny", source: str = DEFAULT_SOURCE, export: Path | None = None,
             engine_args=None, say=print) -> tuple[dict, int]:
    """Run the demo into `out`; returns (report, exit code). engine_args: parsed engine options (backend…)."""
    out = Path(out)
    # the folder is locked against a second demo; the demo replaces its own files and reuses its cached export
    with claim_outputs([Output(out, FOLDER, "demo folder", keep=True)]):
        return _run_demo(out, checkpoint, source, export, engine_args, say)


def _run_demo(out: Path, checkpoint: str, source: str, export: Path | None, engine_args, say) -> tuple[dict, int]:
    from dpa.runtime.chain import StageChain
    from dpa.runtime.cli import engine_from_args
    from dpa.runtime.run import RunSettings, StreamRunner

    started = time.perf_counter()
    exported_now = False
    if export is None:
        export, exported_now = ensure_export(checkpoint_path(checkpoint), out / "export", say)
    engine = engine_from_args(export, engine_args)
    settings = RunSettings(source=source, sink=str(out / "overlay.mp4"), masks=str(out / "masks"),
                           stats_json=str(out / "stats.json"), stats_interval=2.0, overwrite=True)
    say(f"running {source} on {engine.backend} ({engine.device}, {engine.precision}) -> {settings.sink}")
    with engine:
        outcome = StreamRunner(StageChain(engine), settings, engine.describe(),
                               say=say).run()
    report = {"checkpoint": str(checkpoint), "export": str(export), "exported_now": exported_now,
              "source": source, **outcome.summary}
    truth = GroundTruth.of(source)
    if truth is not None and outcome.summary.get("masks_written"):
        report["scores"] = score_masks(out / "masks", truth)
    if truth is not None and truth.synthetic:
        report["note"] = SYNTHETIC_NOTE
    report["seconds_total"] = time.perf_counter() - started
    report["outputs"] = {"video": settings.sink, "masks": settings.masks, "stats": settings.stats_json,
                         "report": str(out / "report.md")}
    write_text_atomically(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomically(out / "report.md", format_report(report))
    return report, outcome.exit_code


SYNTHETIC_NOTE = ("a synthetic clip scores what a model learnt from synthetic clips: `tiny` was trained on such "
                  "clips, `small` on real video only. Real video is harder; README \"Real video\" has both models' "
                  "DAVIS scores. Run `dpa demo --checkpoint small --source SEQ` on a DAVIS-style sequence folder "
                  "(scored against its Annotations/) or `--source /dev/video0` on a camera.")


def format_report(report: dict) -> str:
    """The demo report as Markdown."""
    engine = report.get("engine", {})
    lines = [
        "# DPA demo",
        "",
        f"- checkpoint: `{report['checkpoint']}`, graphs: `{report['export']}`",
        f"- engine: {engine.get('backend')} on {engine.get('device')}, {engine.get('precision')}"
        + (f" ({engine['reason']})" if engine.get("reason") else ""),
        f"- source: `{report['source']}` ({'live' if report['live'] else 'file'}); flow {report['flow']}",
        f"- memory: {report['memory']['policy']} policy, {report['memory']['admissions']} admissions",
        f"- frames: {report['frames']} processed, {report['dropped']} dropped, {report['frames_written']} written; "
        f"{report['fps']:.1f} fps",
    ]
    if "scores" in report:
        scores = report["scores"]
        lines.append(f"- accuracy against {scores['against']} ({scores['frames_scored']} frames): "
                     f"J {scores['J_mean']:.3f}, F {scores['F_mean']:.3f}, G {scores['G']:.3f}")
    if report.get("note"):
        lines.append(f"- note: {report['note']}")
    if report.get("error"):
        lines.append(f"- error: {report['error']}")
    lines += ["", "| stage | mean ms | median ms | p90 ms |", "|---|---|---|---|"]
    lines += [f"| {stage} | {v['mean']:.2f} | {v['median']:.2f} | {v['p90']:.2f} |"
              for stage, v in report["stages_ms"].items()]
    lines += ["", f"video: `{report['outputs']['video']}`", ""]
    return "\n".join(lines)
