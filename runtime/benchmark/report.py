"""`dpa bench` reports (torch-free): the speed-target ratios (ratios of medians, numerator first), their
evaluation, and the text and Markdown tables."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpa.runtime.benchmark.machine import machine_info, oversubscription_warning
from dpa.runtime.benchmark.timers import lifetime_peak_rss_bytes, stage_order

log = logging.getLogger(__name__)


SCHEMA = "dpa-bench/1"


@dataclass(frozen=True)
class Ratio:
    """A ratio of two reported medians: `numerator` / `denominator`, each "measurement.quantity" with quantity
    per_frame_ms, with_flow_ms, graphs_ms or stages_ms.<stage>. bound: the target (value <= bound), None when
    the ratio is only reported."""

    name: str
    numerator: str
    denominator: str
    bound: float | None
    meaning: str


TARGET_RATIOS = (
    Ratio("runtime_vs_eager", "runtime.per_frame_ms", "eager.per_frame_ms", 0.85,
          "runtime per frame (pre + graphs + post) / PyTorch eager per frame (encode + ima_block5 + decode), both "
          "with cached memory"),
    Ratio("runtime_vs_reference_code", "runtime.per_frame_ms", "reference_code.per_frame_ms", 0.30,
          "runtime per frame / the public reference code's per-frame cost re-enacted in PyTorch (the N references "
          "re-encoded through both encoders for every query frame)"),
    Ratio("ifa_marginal", "runtime.per_frame_ms", "runtime_paper_ii.per_frame_ms", 1.10,
          "runtime per frame of paper-iv (IMA + IFA) / of paper-ii (IMA only); the paper's Table 2 has 2.26"),
    Ratio("live_overhead", "live_loop.per_frame_ms", "segmenter_live.per_frame_ms", 1.05,
          "GStreamer live loop per frame / the same work (flow + segmenter, uniform policy) on pre-decoded frames"),
    Ratio("flow_share", "runtime.stages_ms.flow", "runtime.with_flow_ms", 0.10,
          "flow per frame (DIS estimation + rendering the colour image) / whole frame (flow + pre + graphs + post)"),
    Ratio("int8_vs_fp32", "runtime_int8.per_frame_ms", "runtime.per_frame_ms", None,
          "runtime per frame with the int8 (Q/DQ) graphs / with the fp32 graphs; below 1 is a speed-up"),
)


SUPPLEMENTARY_RATIOS = (
    Ratio("graphs_vs_eager", "runtime.graphs_ms", "eager.per_frame_ms", None,
          "the stage graphs alone (no pre/post-processing) / PyTorch eager per frame"),
    Ratio("ifa_marginal_eager", "eager.per_frame_ms", "eager_paper_ii.per_frame_ms", None,
          "PyTorch eager per frame, paper-iv / paper-ii (cached memory)"),
    Ratio("ifa_marginal_reference_code", "reference_code.per_frame_ms", "eager_paper_ii.per_frame_ms", None,
          "the reference code's paper-iv per frame / paper-ii per frame: the analogue of the paper's 2.26"),
)


def quantity(measurements: Mapping[str, dict], path: str) -> float | None:
    """The median of "measurement.quantity" (e.g. "runtime.stages_ms.flow") in milliseconds, None when absent."""
    name, _, key = path.partition(".")
    value = measurements.get(name)
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value.get("median") if isinstance(value, Mapping) else None


def evaluate_ratios(measurements: Mapping[str, dict], ratios: Sequence[Ratio],
                    skipped: Mapping[str, str] | None = None) -> tuple[dict[str, float | None], dict[str, dict]]:
    """(name -> value, name -> {numerator, denominator, value, target, met, meaning, reason}) from the medians.

    A ratio is None when either median is missing; `reason` then says why (from `skipped`: measurement ->
    reason).
    """
    skipped = skipped or {}
    values, details = {}, {}
    for ratio in ratios:
        numerator, denominator = quantity(measurements, ratio.numerator), quantity(measurements, ratio.denominator)
        value = numerator / denominator if numerator is not None and denominator else None
        reason = None
        if value is None:
            missing = [path.split(".")[0] for path, v in ((ratio.numerator, numerator),
                                                          (ratio.denominator, denominator)) if v is None]
            reason = "; ".join(f"{name}: {skipped.get(name, 'not measured')}" for name in dict.fromkeys(missing))
        values[ratio.name] = value
        details[ratio.name] = {
            "value": value,
            "numerator": ratio.numerator,
            "denominator": ratio.denominator,
            "numerator_ms": numerator,
            "denominator_ms": denominator,
            "target": None if ratio.bound is None else f"<= {ratio.bound:g}",
            "met": None if ratio.bound is None or value is None else value <= ratio.bound,
            "meaning": ratio.meaning,
            "reason": reason,
        }
    return values, details


def _ms(summary: Mapping | None, spread: bool = True) -> str:
    if not summary:
        return "-"
    text = f"{summary['median']:.1f}"
    return f"{text} [{summary['q1']:.1f}–{summary['q3']:.1f}]" if spread else text


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def measurement_rows(measurements: Mapping[str, dict]) -> list[tuple[str, ...]]:
    """Rows (name, ms per frame median [IQR], min–max, fps, ms with flow, peak RSS MiB) for the report tables."""
    rows = [("measurement", "ms/frame median [IQR]", "min–max", "fps", "ms/frame with flow", "peak RSS MiB")]
    for name, entry in measurements.items():
        per_frame = entry["per_frame_ms"]
        rows.append((name, _ms(per_frame), f"{per_frame['min']:.1f}–{per_frame['max']:.1f}",
                     f"{entry['fps']:.2f}" if entry.get("fps") else "-", _ms(entry.get("with_flow_ms")),
                     f"{entry['peak_rss_mib']:.0f}" if entry.get("peak_rss_mib") is not None else "-"))
    return rows


def stage_rows(measurements: Mapping[str, dict]) -> list[tuple[str, ...]]:
    """Rows (measurement, then the median ms per frame of every stage) for the report tables."""
    stages = sorted({stage for entry in measurements.values() for stage in entry["stages_ms"]}, key=stage_order)
    rows = [("measurement", *stages, "memory entry")]
    for name, entry in measurements.items():
        rows.append((name, *(_ms(entry["stages_ms"].get(stage), spread=False) for stage in stages),
                     _ms(entry.get("memory_entry_ms"), spread=False)))
    return rows


def ratio_rows(details: Mapping[str, dict]) -> list[tuple[str, ...]]:
    rows = [("ratio", "value", "target", "met", "numerator / denominator (median ms)")]
    for name, detail in details.items():
        met = "-" if detail["met"] is None else ("yes" if detail["met"] else "NO")
        if detail["value"] is None:
            fraction = detail["reason"] or "-"
        else:
            fraction = (f"{detail['numerator']} {detail['numerator_ms']:.1f} / {detail['denominator']} "
                        f"{detail['denominator_ms']:.1f}")
        rows.append((name, _ratio(detail["value"]), detail["target"] or "reported", met, fraction))
    return rows


def _text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def format_report(report: dict, markdown: bool = False) -> str:
    """The report's tables (measurements, stages, ratios) as console text or Markdown."""
    table = _markdown_table if markdown else _text_table
    machine, config = report["machine"], report["config"]
    heading = "### " if markdown else ""
    lines = [
        f"{heading}{report['kind']}: {config.get('description', '')}",
        f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, load {machine['load_average']}; "
        f"threads {config['timing']['threads']}; {config['timing']['repeats']} repeats x "
        f"{config['timing']['frames']} frames after {config['timing']['warmup']} warm-up",
        "",
        table(measurement_rows(report["measurements"])),
        "",
        "median ms per frame and stage:" if not markdown else "Median ms per frame and stage:",
        "",
        table(stage_rows(report["measurements"])),
    ]
    if report.get("targets"):
        lines += ["", table(ratio_rows(report["targets"]))]
    if report.get("supplementary"):
        lines += ["", table(ratio_rows(report["supplementary"]))]
    if report.get("skipped"):
        lines += ["", "not measured:"] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    if report.get("warnings"):
        lines += ["", "warnings:"] + [f"- {message}" for message in report["warnings"]]
    return "\n".join(lines)


def base_report(kind: str, config: dict) -> dict:
    return {"schema": SCHEMA, "kind": kind, "machine": machine_info(), "config": config, "measurements": {},
            "skipped": {}}


def finish_report(report: dict) -> dict:
    report["machine"]["load_average_end"] = (
        [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    report["peak_rss_mib_process"] = lifetime_peak_rss_bytes() / 2**20
    warning = oversubscription_warning(report["machine"], report["config"]["timing"]["threads"])
    report["warnings"] = [warning] if warning else []
    for message in report["warnings"]:
        log.warning("%s", message)
    return report

