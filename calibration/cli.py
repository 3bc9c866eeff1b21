"""Subcommands of dpa.calibration: `calibrate` (feeds + fp16/int8 variants) and `compare` (accuracy report).

Heavy modules (onnx, onnxruntime, torch, matplotlib) are imported inside the run functions, so `dpa --help`
stays fast; `calibrate` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dpa import options
from dpa.command import command
from dpa.outputs import FOLDER, Output, optional

log = logging.getLogger(__name__)

CLIP_HELP = ("clip folders (a sequence folder with JPEGImages/ and optional Annotations/, or a folder of images) "
             "or synthetic:SEED / synthetic:FIRST..LAST (generated clips with exact masks, S x S pixels)")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="a `dpa export` output folder (fp32)")
    parser.add_argument("--frames", nargs="+", action="extend", metavar="PATH",
                        help=f"calibration frames (required; never random data): {CLIP_HELP}")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write feeds/, fp16/ and int8/ (default: EXPORT_DIR)")
    # dpa.calibration.ranges.CALIBRATION_METHODS (tested), copied: parsing should not load numpy
    parser.add_argument("--method", choices=("entropy", "mse", "percentile", "max"), default="entropy",
                        help="int8 activation calibration: entropy (KL, default), mse (least squared error), "
                             "percentile (99.999th), max")
    parser.add_argument("--precisions", type=_comma_list, default=["fp16", "int8"],
                        help="variants to write, comma-separated (default fp16,int8)")
    parser.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="int8: node-name patterns (fnmatch) to leave float, besides the prototype-attention "
                        "nodes (always excluded); GRAPH:PATTERN names one graph's nodes (e.g. encoder:node_conv2d_2?)")
    parser.add_argument("--max-frames", type=options.COUNT, metavar="N",
                        help="use only the first N frames of each clip")
    parser.add_argument("--synthetic-length", type=options.integer(1, 10000), default=12, metavar="L",
                        help="frames per synthetic clip (default 12)")
    parser.add_argument("--threads", type=options.THREADS, help="ONNX Runtime intra-op threads (default: its own)")


def _calibrate_outputs(args: argparse.Namespace) -> list[Output]:
    from dpa.calibration.feeds import FEEDS_FOLDER

    out = Path(args.out or args.export_dir)
    return [Output(out / FEEDS_FOLDER, FOLDER, "calibration feeds")] + [
        Output(out / precision, FOLDER, f"{precision} variant") for precision in args.precisions]


@command("calibrate", "record calibration feeds from real frames and write the fp16 and int8 (Q/DQ) graph variants",
         arguments=_calibrate_arguments, outputs=_calibrate_outputs)
def run_calibrate(args: argparse.Namespace) -> int:
    from dpa.calibration.calibrate import calibrate

    result = calibrate(args.export_dir, args.frames or [], out=args.out, precisions=args.precisions,
                       method=args.method, exclude=args.exclude, max_frames=args.max_frames,
                       synthetic_length=args.synthetic_length, threads=args.threads)
    feeds = result.feeds
    print(f"feeds: {result.feeds_index} ({', '.join(f'{g} {feeds.count(g)}' for g in feeds.graphs)})")
    for precision, target in result.variants.items():
        print(f"{precision}: {target / 'manifest.json'}")
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="the checkpoint the export was made from (path or shipped name: tiny): the fp32 "
                        "PyTorch reference (default: the one the export's manifest records, or its seeded "
                        "initialisation); its weights must hash to the manifest's")
    parser.add_argument("--export", required=True, metavar="DIR",
                        help="the fp32 export folder; fp16/int8 variants are found as DIR/fp16, DIR/int8")
    parser.add_argument("--clips", nargs="+", action="extend", required=True, metavar="PATH", help=CLIP_HELP)
    parser.add_argument("--backends", type=_comma_list, default=["onnxruntime"],
                        help="comma-separated: onnxruntime, tensorrt (NVIDIA machines) (default onnxruntime)")
    parser.add_argument("--precisions", type=_comma_list, default=["fp32", "fp16", "int8"],
                        help="comma-separated (default fp32,fp16,int8)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="report folder: report.md, report.json, PNG plots, masks/")
    parser.add_argument("--max-frames", type=options.COUNT, metavar="N",
                        help="use only the first N frames of each clip")
    parser.add_argument("--synthetic-length", type=options.integer(1, 10000), default=12, metavar="L",
                        help="frames per synthetic clip (default 12)")
    parser.add_argument("--layer-frames", type=options.COUNT_OR_ZERO, default=2, metavar="K",
                        help="frames per clip for the per-layer error analysis of fp16/int8 (0: skip; default 2)")
    parser.add_argument("--worst", type=options.COUNT_OR_ZERO, default=4, metavar="K",
                        help="worst frames to show (default 4)")
    group = parser.add_argument_group("engines (as for dpa build / dpa run)")
    group.add_argument("--device", default="auto",
                       help="auto (default: the best present), cpu, cuda or cuda:N; the PyTorch reference runs on "
                       "the GPU when an engine does")
    group.add_argument("--cache", metavar="DIR", help="TensorRT plans and timing cache (default $DPA_CACHE, else "
                       "~/.cache/dpa/engines)")
    group.add_argument("--plugins", metavar="LIB", help="libdpa_plugins.so or its folder (TensorRT)")
    group.add_argument("--providers", metavar="LIST",
                       help="ONNX Runtime execution providers, comma-separated (default: from --device)")
    group.add_argument("--threads", type=options.THREADS, metavar="N",
                       help="ONNX Runtime and PyTorch intra-op threads (default: their own)")


@command("compare", "compare backends x precisions with the PyTorch fp32 model on the same clips: IoU, J/F, errors",
         arguments=_compare_arguments, outputs=lambda args: optional(args.out, FOLDER, "report folder"))
def run_compare(args: argparse.Namespace) -> int:
    from dpa.calibration.compare import compare
    from dpa.calibration.report import format_summary

    engine_options = {"cache_dir": args.cache, "plugin_library": args.plugins}
    if args.providers:
        engine_options["providers"] = _comma_list(args.providers)
    report = compare(args.checkpoint, args.export, args.clips, backends=args.backends, precisions=args.precisions,
                     out=args.out, max_frames=args.max_frames, synthetic_length=args.synthetic_length,
                     layer_frames=args.layer_frames, worst=args.worst, device=args.device, threads=args.threads,
                     engine_options=engine_options)
    print(format_summary(report))
    for note in report["notes"]:
        print(f"note: {note}")
    files = report["files"]
    print(f"report: {files['markdown']} ({files['json']}, {', '.join(Path(p).name for p in files['plots'])})")
    return 0
