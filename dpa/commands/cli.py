"""The top floor's subcommands: `dpa bench` (per-stage latency, fps and peak memory of the runtime, the PyTorch
baselines, `--targets`; `dpa.commands.bench`) and `dpa demo` (the main job; `dpa.commands.demo`).

Only argparse-level code runs at import; numpy, onnxruntime and torch load inside the run functions.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dpa import options
from dpa.command import command
from dpa.files import write_text_atomically
from dpa.outputs import FILE, optional
from dpa.runtime.cli import add_engine_arguments

log = logging.getLogger(__name__)

DEFAULTS = {"frames": 8, "warmup": 2, "repeats": 5}
QUICK = {"frames": 2, "warmup": 1, "repeats": 2, "size": 64, "memory": 2, "width": 0.125}


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "--device and --threads govern the PyTorch baselines too: PyTorch runs on the engine's device kind (cpu, or "
        "cuda, which must be usable), with as many threads as ONNX Runtime (default: every usable core, for both). "
        "Every measurement runs the same synthetic clip at S x S with DIS live flow; measurements alternate repeat "
        "by repeat; the report gives medians, quartiles and min/max over the repeats. Example: "
        "`dpa bench --targets --json bench.json` (paper-iv, S 352, N 4, CPU).")
    model = parser.add_argument_group("model (an export, or a preset exported into the benchmark cache)")
    model.add_argument("--export", metavar="DIR", help="a `dpa export` folder to benchmark (its S, N and weights)")
    model.add_argument("--config", default=None,
                       help="without --export: the preset to export with calibrated untrained weights (default "
                       "paper-iv), cached in $DPA_CACHE/bench or ~/.cache/dpa/bench/<config>-<S>-<N>")
    model.add_argument("--size", type=options.SIZE, help="without --export: input size S (default the preset's, 352)")
    model.add_argument("--memory", type=options.MEMORY,
                       help="without --export: reference frames N (default the preset's, 4)")
    model.add_argument("--width", type=options.WIDTH, help="without --export: channel width multiplier override")
    model.add_argument("--export-cache", metavar="DIR", help="where automatic exports go (default $DPA_CACHE/bench, "
                       "else ~/.cache/dpa/bench)")
    add_engine_arguments(parser)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--frames", type=options.COUNT,
                        help=f"timed frames per repeat (default {DEFAULTS['frames']})")
    timing.add_argument("--warmup", type=options.COUNT_OR_ZERO,
                        help=f"untimed frames before them (default {DEFAULTS['warmup']})")
    timing.add_argument("--repeats", type=options.COUNT, help=f"repeats; medians and spread are over these "
                        f"(default {DEFAULTS['repeats']})")
    timing.add_argument("--seed", type=options.SEED, default=0, help="synthetic clip seed (default 0)")
    timing.add_argument("--flow-preset", default="fast", choices=("ultrafast", "fast", "medium"),
                        help="DIS preset (default fast, as dpa run)")
    timing.add_argument("--horizon", type=options.COUNT, default=32,
                        help="live loop measurements: uniform memory policy horizon in frames (default 32, as dpa run)")
    timing.add_argument("--quick", action="store_true",
                        help=f"a smoke run: width {QUICK['width']}, S {QUICK['size']}, N {QUICK['memory']}, "
                        f"{QUICK['frames']} frames, {QUICK['warmup']} warm-up, {QUICK['repeats']} repeats (options "
                        "given explicitly win); for tests, not for numbers")
    what = parser.add_argument_group("what to measure")
    what.add_argument("--baseline", action="append", choices=("eager", "reference-code"), default=[],
                      help="also time PyTorch (repeatable): eager with cached memory, or the public reference code's "
                      "per-frame cost re-enacted (it re-encodes the N reference frames for every frame); the PyTorch "
                      "side runs on --device's kind (cpu, or cuda which must be usable)")
    what.add_argument("--targets", action="store_true",
                      help="measure the speed-target ratios of paper-iv (vs paper-ii, PyTorch eager, the reference "
                      "code, the GStreamer live loop, int8) in one run")
    what.add_argument("--paper-ii-export", metavar="DIR",
                      help="--targets: the paper-ii export to compare with (default: exported into the cache at the "
                      "same S, N, width)")
    what.add_argument("--live-source", metavar="URI",
                      help="--targets: the live loop's source (default the benchmark clip as "
                      "test://synthetic?...&live=0); it must deliver every frame")
    what.add_argument("--no-live", action="store_true", help="--targets: leave out the GStreamer live loop")
    what.add_argument("--no-int8", action="store_true", help="--targets: leave out int8")
    what.add_argument("--calibration-clips", default="synthetic:0..3", metavar="CLIPS",
                      help="--targets without an EXPORT/int8 variant: the clips `dpa calibrate --frames` calibrates "
                      "on (default synthetic:0..3)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the report as JSON")
    out.add_argument("--markdown", metavar="OUT", help="write the report's tables as Markdown")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def _option(args: argparse.Namespace, name: str):
    """An option's value: given explicitly, else --quick's, else the default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    if getattr(args, "quick", False) and name in QUICK:
        return QUICK[name]
    return DEFAULTS.get(name)


def _write(path: str, text: str) -> None:
    write_text_atomically(path, text)
    log.info("wrote %s", path)


def _bench_outputs(args: argparse.Namespace):
    return optional(args.json, FILE, "report JSON") + optional(args.markdown, FILE, "Markdown report")


@command("bench", "per-stage latency, fps and peak memory of the runtime and PyTorch; --targets: the speed targets",
         arguments=_bench_arguments, outputs=_bench_outputs)
def run_bench(args: argparse.Namespace) -> int:
    from dpa.commands import bench
    from dpa.errors import DpaError
    from dpa.runtime.benchmark.report import format_report
    from dpa.runtime.benchmark.timers import TimingSettings

    providers = [name.strip() for name in args.providers.split(",") if name.strip()] if args.providers else None
    engine_options = bench.EngineOptions(backend=args.backend, device=args.device, providers=providers,
                                         cache=args.cache, plugins=args.plugins)
    settings = TimingSettings(frames=_option(args, "frames"), warmup=_option(args, "warmup"),
                                    repeats=_option(args, "repeats"), seed=args.seed, flow_preset=args.flow_preset,
                                    horizon=args.horizon, threads=args.threads, progress=not args.no_progress)
    if args.export and any(getattr(args, name) is not None for name in ("config", "size", "memory", "width")):
        raise DpaError("--export fixes the model, S and N: leave out --config, --size, --memory and --width")
    size, memory, width = _option(args, "size"), _option(args, "memory"), _option(args, "width")
    if args.targets:
        if args.precision != "fp32":
            raise DpaError("--targets measures fp32 against int8 itself; leave out --precision")
        if args.config not in (None, "paper-iv", "paper"):
            raise DpaError("--targets measures paper-iv (against paper-ii); leave out --config")
        if args.baseline:
            raise DpaError("--targets measures both PyTorch baselines already; leave out --baseline")
        models = bench.target_models(args.export, args.paper_ii_export, size, memory, width, args.export_cache)
        report = bench.run_targets(models, settings, engine_options, live_source=args.live_source,
                                   calibration_clips=args.calibration_clips, live=not args.no_live,
                                   int8=not args.no_int8)
    else:
        if args.paper_ii_export or args.live_source or args.no_live or args.no_int8:
            raise DpaError("--paper-ii-export, --live-source, --no-live and --no-int8 go with --targets")
        export = args.export or bench.bench_export(args.config or "paper-iv", size, memory, width, args.export_cache)
        report = bench.run_bench(export, settings, engine_options, precision=args.precision,
                                 baselines=args.baseline)
    print(format_report(report))
    if args.json:
        _write(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        _write(args.markdown, format_report(report, markdown=True) + "\n")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    parser.add_argument("--checkpoint", default="tiny", metavar="CKPT",
                        help="checkpoint to export and run (default: the shipped tiny model)")
    parser.add_argument("--export", metavar="DIR", help="use these exported graphs instead of exporting --checkpoint")
    parser.add_argument("--source", metavar="URI",
                        help="source (default: a live synthetic clip streamed through GStreamer, "
                        "test://synthetic?seed=2026&frames=96&size=256&fps=15, scored against its exact masks); a "
                        "DAVIS-style sequence folder (SEQ/JPEGImages/, SEQ/Annotations/) is scored against its "
                        "annotations")
    add_engine_arguments(parser)
    parser.set_defaults(backend="auto")


@command("demo", "the main job on its embedded default: export the shipped tiny model, run the live loop on a "
         "synthetic clip through GStreamer, write an annotated video and a report", arguments=_demo_arguments)
def run_demo(args: argparse.Namespace) -> int:
    from dpa.commands.demo import DEFAULT_SOURCE, run_demo
    from dpa.errors import DpaError

    report, code = run_demo(Path(args.out), checkpoint=args.checkpoint, source=args.source or DEFAULT_SOURCE,
                            export=Path(args.export) if args.export else None, engine_args=args, say=print)
    if "scores" in report:
        scores = report["scores"]
        print(f"J {scores['J_mean']:.3f}  F {scores['F_mean']:.3f}  G {scores['G']:.3f} against {scores['against']} "
              f"({scores['frames_scored']} frames)")
    if report.get("note"):
        print(f"note: {report['note']}")
    print(f"{report['frames']} frames, {report['fps']:.1f} fps, {report['dropped']} dropped")
    for what, path in report["outputs"].items():
        print(f"{what}: {path}")
    if report.get("error"):
        raise DpaError(report["error"])
    return code
