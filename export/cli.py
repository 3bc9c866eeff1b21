"""Subcommands of dpa.export: `export` (stage graphs + manifest) and `check` (ONNX Runtime vs PyTorch).

Heavy modules (torch, onnx, onnxruntime) are imported inside `run`, so `dpa --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dpa import options
from dpa.command import command
from dpa.files import write_text_atomically
from dpa.outputs import FILE, FOLDER, optional

log = logging.getLogger(__name__)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="checkpoint path or shipped name (tiny); without it the config's seeded random "
                        "initialisation is exported (a warning; the manifest says so)")
    parser.add_argument("--config", help="preset (paper-i … paper-xi, paper, tiny); with --checkpoint only to "
                        "assert its architecture; without, the model to initialise (default paper-iv)")
    parser.add_argument("--size", type=options.SIZE, help="input size S, a multiple of 32 (default: the config's)")
    parser.add_argument("--memory", type=options.MEMORY,
                        help="memory capacity N, reference frames (default: the config's)")
    parser.add_argument("--width", type=options.WIDTH, help="without --checkpoint: channel width multiplier override")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for the .onnx files and manifest.json")
    parser.add_argument("--form", default="functions",
                        help="functions (custom nodes with standard-op function bodies: ONNX Runtime and TensorRT "
                        ">= 10.7; default), plugin (custom nodes only: TensorRT <= 10.6 with the plugin library), "
                        "portable (standard ops only), or all")
    parser.add_argument("--init", choices=("random", "calibrated"), default="random",
                        help="without --checkpoint: random (build_model's seeded initialisation, default) or "
                        "calibrated (the same weights scale-calibrated on a synthetic clip so that every layer has "
                        "a trained network's gain; saved as DIR/untrained.pt) — for parity checks of untrained "
                        "paper-size models, whose raw initialisation amplifies fp32 rounding past 1e-4")
    parser.add_argument("--calibration-clip", metavar="PATH",
                        help="with --init calibrated: a clip folder (JPEGImages/ or images) to calibrate on instead "
                        "of a synthetic clip; natural video gives the untrained network a realistic range")
    parser.add_argument("--opset", type=options.integer(18, 21), default=18, help="ai.onnx opset, 18-21 (default 18)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running each file in ONNX Runtime against PyTorch right after export")


def _export_outputs(args: argparse.Namespace):
    # the whole folder: --overwrite empties it, so no graph, variant (fp16/, int8/) or plan of another export stays
    return optional(args.out, FOLDER, "export folder")


@command("export", "export stage graphs (encoder, ima, ifa_memory, decoder) as ONNX with a manifest",
         arguments=_export_arguments, outputs=_export_outputs)
def run_export(args: argparse.Namespace) -> int:
    from dpa.export.exporter import export_stage_graphs, model_for_export, parse_forms

    forms = parse_forms(args.form)
    model, weights = model_for_export(args.checkpoint, args.config, args.size, args.memory, init=args.init,
                                      out=args.out, width=args.width,
                                      calibration_clip=args.calibration_clip)
    config = model.config
    log.info("model %s, S %d, N %d, weights: %s", config.name, config.size, config.memory,
             weights.path if weights.init == "checkpoint" else f"{weights.init} initialisation, seed {weights.seed}")
    manifest = export_stage_graphs(model, args.out, weights, forms=forms, opset=args.opset, verify=not args.no_verify)
    for name, graph in manifest.graphs.items():
        sizes = ", ".join(f"{file} {size / 2**20:.1f} MiB" for file, size in graph.details["bytes"].items())
        nodes = graph.custom_nodes[manifest.forms[0]]
        custom = ", ".join(f"{op} x{count}" for op, count in nodes.items()) or "no custom nodes"
        print(f"{name:<11} {graph.details['export_seconds']:6.1f} s  {sizes}  ({custom})")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a `dpa export` output folder")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="the checkpoint the graphs were exported from (not needed for a random-init export)")
    parser.add_argument("--clip", metavar="PATH",
                        help="a sequence folder with JPEGImages/ or a folder of images (default: a synthetic clip)")
    parser.add_argument("--frames", type=options.COUNT, default=8,
                        help="frames to compare, spread over the clip (default 8); the memory is sampled over the "
                        "whole clip")
    parser.add_argument("--clip-length", type=options.integer(1, 10000), default=12,
                        help="synthetic clip length (default 12)")
    parser.add_argument("--seed", type=options.SEED, default=0, help="synthetic clip and garbage seed (default 0)")
    parser.add_argument("--form", choices=("functions", "portable"),
                        help="which exported form to run (default functions, else portable)")
    parser.add_argument("--threads", type=options.THREADS, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")


@command("check", "compare exported stage graphs (ONNX Runtime, chained) with the PyTorch model on real frames",
         arguments=_check_arguments, outputs=lambda args: optional(args.json, FILE, "report JSON"))
def run_check(args: argparse.Namespace) -> int:
    from dpa.export.check import check_export, format_report

    report = check_export(args.directory, checkpoint=args.checkpoint, clip=args.clip, frames=args.frames,
                          clip_length=args.clip_length, seed=args.seed, form=args.form, threads=args.threads)
    print(format_report(report))
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0 if report["ok"] else 1
