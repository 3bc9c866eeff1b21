"""The `dpa compare` report: report.md, report.json and PNG plots (matplotlib, Agg backend).

- iou_per_frame.png: per clip, the mask IoU against the PyTorch fp32 reference of every frame, one line per run;
- error_histogram.png: per run, the histogram of the probability map's absolute error (log-log);
- worst_frames.png: the frames where some run's mask differs most from the reference, side by side: ground
  truth (where present), the reference and every run, as overlays with their IoU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dpa.errors import DpaError
from dpa.files import write_text_atomically

PLOTS = ("iou_per_frame.png", "error_histogram.png", "worst_frames.png")
TILE_HEIGHT = 240  # pixels of one overlay in worst_frames.png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _scientific(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.2e}"


def plot_iou_per_frame(report: dict, path: Path) -> None:
    """One subplot per clip: IoU vs reference per frame, one line per backend x precision."""
    pyplot = _pyplot()
    clips = [clip["name"] for clip in report["clips"]]
    columns = min(3, len(clips))
    rows = math.ceil(len(clips) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    lowest = min(min(row["iou_per_frame"]) for row in report["rows"])
    bottom = min(0.9, lowest - 0.02)
    for axis, clip in zip(axes.ravel(), clips, strict=False):
        for row in (row for row in report["rows"] if row["clip"] == clip):
            axis.plot(range(len(row["iou_per_frame"])), row["iou_per_frame"], marker=".", linewidth=1.2,
                      label=f"{row['backend']} {row['precision']}")
        axis.set_title(clip, fontsize=10)
        axis.set_ylim(bottom, 1.005)
        axis.set_xlabel("frame")
        axis.set_ylabel("mask IoU vs PyTorch fp32")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    for axis in axes.ravel()[len(clips):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def plot_error_histogram(report: dict, path: Path) -> None:
    """Probability abs error histograms per run, log x (bin edges) and log y (pixel counts)."""
    pyplot = _pyplot()
    edges = np.asarray(report["histograms"]["edges"])
    lower = edges[1] / 10  # where the [0, first edge) bin is drawn on a log axis
    plotted = np.concatenate([[lower], edges[1:]])
    figure, axis = pyplot.subplots(figsize=(7.5, 4.2))
    for label, counts in report["histograms"]["counts"].items():
        counts = np.asarray(counts, float)
        axis.stairs(np.where(counts > 0, counts, np.nan), plotted, label=label, linewidth=1.5)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(f"|probability - PyTorch fp32| per pixel (S x S); leftmost bin: < {edges[1]:.0e}")
    axis.set_ylabel("pixels")
    axis.set_title("probability map error")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def plot_worst_frames(worst_frames: list, labels: list[str], path: Path, reference_label: str) -> None:
    """Rows: the worst frames; columns: ground truth (when any row has it), the reference, each run."""
    import cv2

    from dpa.runtime.overlay import draw_overlay

    pyplot = _pyplot()
    with_truth = any(w.ground_truth is not None for w in worst_frames)
    columns = (["ground truth"] if with_truth else []) + [reference_label, *labels]
    rows = max(1, len(worst_frames))
    figure, axes = pyplot.subplots(rows, len(columns), figsize=(3.2 * len(columns), 2.4 * rows), squeeze=False)
    for row, candidate in enumerate(worst_frames):
        height, width = candidate.frame.shape[:2]
        size = (max(1, round(width * TILE_HEIGHT / height)), TILE_HEIGHT)
        frame = cv2.resize(candidate.frame, size, interpolation=cv2.INTER_AREA)
        for column, label in enumerate(columns):
            axis = axes[row, column]
            mask = candidate.ground_truth if label == "ground truth" else candidate.masks[label]
            title = label if label in ("ground truth", reference_label) else f"{label}\nIoU {candidate.ious[label]:.4f}"
            if column == 0:
                title = f"{candidate.clip} frame {candidate.name}\n{title}"
            if mask is None:
                axis.imshow(frame)
                title += " (none)"
            else:
                small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
                axis.imshow(draw_overlay(frame, small))
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    if not worst_frames:
        axes[0, 0].text(0.5, 0.5, "no frames", ha="center")
        for axis in axes.ravel():
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def format_markdown(report: dict) -> str:
    """report.md: summary, per-clip rows, per-stage errors, the layers that cost most, notes, plots."""
    lines = ["# dpa compare", ""]
    lines += _header_lines(report)
    lines += _summary_lines(report["summary"])
    lines += _clip_lines(report["rows"])
    lines += _reference_lines(report["reference"]["clips"])
    lines += _stage_lines(report["stages"])
    if report["layers"]:
        lines += _layer_lines(report["layers"])
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in PLOTS] + [""]
    lines += [f"Masks: {report['masks']}.", ""]
    return "\n".join(lines)


def _header_lines(report: dict) -> list[str]:
    """What was compared: the export, checkpoint, clips, flow and memory, the reference, latency, seconds."""
    model = report["model"]
    return [
        f"- export: `{report['export']}` ({model['config']}, S = {model['size']}, N = {model['memory']})",
        f"- checkpoint: `{report['checkpoint'].get('path')}`",
        "- clips: " + ", ".join(f"{c['name']} ({c['frames']} frames{', ground truth' if c['ground_truth'] else ''})"
                                 for c in report["clips"]),
        f"- flow: {report['flow']}; memory: {report['memory_policy']}",
        f"- reference: PyTorch fp32 on {report['reference']['device']}, "
        f"{report['reference']['latency_ms']:.1f} ms per frame (median)",
        f"- latency: {report['latency']}",
        f"- {report['seconds']} s",
        "",
    ]


def _summary_lines(summary: list[dict]) -> list[str]:
    """The summary table: one row per backend x precision over all clips."""
    lines = [
        "## Summary (all clips)",
        "",
        "| backend | precision | frames | IoU vs ref mean | IoU min | prob max abs | J | F | G | latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(f"| {row['backend']} | {row['precision']} | {row['frames']} | "
                     f"{_number(row['iou_vs_reference_mean'], 5)} | {_number(row['iou_vs_reference_min'], 5)} | "
                     f"{_scientific(row['probability_max_abs'])} | {_number(row['J_mean'])} | "
                     f"{_number(row['F_mean'])} | {_number(row['G'])} | {row['latency_ms']:.2f} |")
    return lines


def _clip_lines(rows: list[dict]) -> list[str]:
    """The per-clip table: one row per backend x precision x clip."""
    lines = ["", "## Per clip", "",
             "| backend | precision | clip | IoU mean | IoU min (frame) | prob max abs | prob mean abs | J | F | G "
             "| latency ms | prime ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        prime = f"{row['prime_ms']:.1f}" if row["prime_ms"] is not None else "—"
        lines.append(f"| {row['backend']} | {row['precision']} | {row['clip']} | "
                     f"{_number(row['iou_vs_reference_mean'], 5)} | {_number(row['iou_vs_reference_min'], 5)} "
                     f"({row['worst_frame']['name']}) | {_scientific(row['probability_max_abs'])} | "
                     f"{_scientific(row['probability_mean_abs'])} | {_number(row['J_mean'])} | "
                     f"{_number(row['F_mean'])} | {_number(row['G'])} | {row['latency_ms']:.2f} | {prime} |")
    return lines


def _reference_lines(references: list[dict]) -> list[str]:
    """The reference's table: one row per clip, with its uncertain share."""
    lines = ["", "## Reference (PyTorch fp32)", "",
             "Uncertain: the share of the reference's S x S probabilities in (0.3, 0.7), where small errors flip the "
             "mask; IoU against the reference is sensitive in proportion.", "",
             "| clip | frames | memory frames | J | F | G | uncertain | latency ms |",
             "|---|---|---|---|---|---|---|---|"]
    for reference in references:
        lines.append(f"| {reference['clip']} | {reference['frames']} | {reference['memory_frames']} | "
                     f"{_number(reference['J_mean'])} | {_number(reference['F_mean'])} | {_number(reference['G'])} | "
                     f"{reference['uncertain_share']:.3f} | {reference['latency_ms']:.2f} |")
    return lines


def _stage_lines(stages: dict) -> list[str]:
    """Per run: its worst stage tensors, then the error of every stage tensor."""
    lines = ["", "## Per-stage tensor error (chained, against PyTorch fp32, worst over frames)", ""]
    for label, stage in stages.items():
        worst, cosine = stage["worst"], stage["worst_cosine"]
        lines += [f"### {label}", "",
                  f"Worst stage: **{worst['stage']}** — `{worst['tensor']}` relative max abs {worst['relative']:.3e}; "
                  f"lowest cosine `{cosine['tensor']}` {cosine['cosine_min']:.6f}.", "",
                  "| tensor | max abs | relative | mean abs | cosine min | cosine mean |", "|---|---|---|---|---|---|"]
        for name, error in stage["tensors"].items():
            lines.append(f"| {name} | {_scientific(error['max_abs'])} | {_scientific(error['relative'])} | "
                         f"{_scientific(error['mean_abs'])} | {error['cosine_min']:.6f} | {error['cosine_mean']:.6f} |")
        lines.append("")
    return lines


def _layer_lines(layers: dict) -> list[str]:
    """Per precision: the layers that add most error, per graph."""
    lines = ["## Layers that cost most (each graph alone, fed the reference's tensors; ONNX Runtime CPU)", "",
             "`added` = the layer output's relative error minus the worst relative error of its inputs.", ""]
    for precision, graphs in layers.items():
        lines += [f"### {precision}", "", "| graph | layer (node) | op | added | relative | cosine |",
                  "|---|---|---|---|---|---|"]
        for graph, entry in graphs.items():
            for layer in entry["top"]:
                lines.append(f"| {graph} | `{layer['tensor']}` ({layer['node']}) | {layer['op_type']} | "
                             f"{_scientific(layer['added'])} | {_scientific(layer['relative'])} | "
                             f"{layer['cosine']:.6f} |")
        lines.append("")
    return lines


def format_summary(report: dict) -> str:
    """The terminal summary: per backend x precision over all clips, and the worst stage tensor."""
    lines = [f"{'run':<22} {'frames':>6} {'IoU mean':>9} {'IoU min':>9} {'J':>7} {'F':>7} {'G':>7} {'ms':>8}  "
             "worst stage tensor (relative)"]
    for row in report["summary"]:
        label = f"{row['backend']}-{row['precision']}"
        worst = report["stages"][label]["worst"]
        lines.append(f"{label:<22} {row['frames']:>6} {row['iou_vs_reference_mean']:>9.5f} "
                     f"{row['iou_vs_reference_min']:>9.5f} {_number(row['J_mean']):>7} {_number(row['F_mean']):>7} "
                     f"{_number(row['G']):>7} {row['latency_ms']:>8.2f}  {worst['tensor']} ({worst['relative']:.2e})")
    lines.append(f"{'pytorch-fp32 (reference)':<22} {'':>6} {'':>9} {'':>9} "
                 f"{'':>7} {'':>7} {'':>7} {report['reference']['latency_ms']:>8.2f}")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path, worst_frames: list, labels: list[str],
                 reference_label: str = "pytorch-fp32") -> dict:
    """Write the plots, report.md and report.json into `out`; returns {"markdown", "json", "plots"} paths (and
    records them in report["files"])."""
    out = Path(out)
    plots = [out / name for name in PLOTS]
    try:
        plot_iou_per_frame(report, plots[0])
        plot_error_histogram(report, plots[1])
        plot_worst_frames(worst_frames, labels, plots[2], reference_label)
        files = {"markdown": str(out / "report.md"), "json": str(out / "report.json"),
                 "plots": [str(plot) for plot in plots]}
        report["files"] = files
        write_text_atomically(out / "report.md", format_markdown(report))
        write_text_atomically(out / "report.json", json.dumps(json_ready(report), indent=1) + "\n")
    except OSError as error:
        raise DpaError(f"cannot write the report into {out}: {error}") from error
    return files


def json_ready(value):
    """A report as strict JSON: numpy scalars to Python numbers, NaN/Inf to null."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
