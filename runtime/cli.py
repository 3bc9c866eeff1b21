"""Subcommands of dpa.runtime: `build` (TensorRT plans or ONNX Runtime sessions for an export directory, checked
on zero inputs), and the engine options every engine-using command shares (`add_engine_arguments`,
`engine_from_args`).

numpy, onnxruntime and tensorrt are imported inside the run functions, so `dpa --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dpa import options, stop
from dpa.command import command
from dpa.errors import DpaError
from dpa.outputs import FOLDER, Output

# The same values as dpa.runtime.engines.BACKENDS (+ auto) and PRECISIONS, written out so that building the
# parser imports nothing heavy; tests/runtime/test_engines.py checks that they agree.
BACKEND_CHOICES = ("onnxruntime", "tensorrt", "auto")
PRECISION_CHOICES = ("fp32", "fp16", "int8")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options: --backend, --precision, --device, --cache, --plugins, --threads, --providers."""
    group = parser.add_argument_group("engine")
    group.add_argument("--backend", choices=BACKEND_CHOICES, default="onnxruntime",
                       help="onnxruntime (default), tensorrt (needs an NVIDIA GPU, tensorrt and cuda-python), or auto "
                       "(TensorRT when present with a GPU, else ONNX Runtime on the GPU, else on the CPU)")
    group.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                       help="graph variant: fp32 (the export, default) or fp16/int8 (written by `dpa calibrate` into "
                       "EXPORT_DIR/fp16, EXPORT_DIR/int8; the precision lives in the graphs)")
    group.add_argument("--device", default="auto",
                       help="auto (default: the best present), cpu, cuda or cuda:N; asking for a GPU that cannot be "
                       "used is an error, never a silent CPU run")
    group.add_argument("--cache", metavar="DIR",
                       help="TensorRT plans and timing cache (default $DPA_CACHE, else ~/.cache/dpa/engines)")
    group.add_argument("--plugins", metavar="LIB",
                       help="libdpa_plugins.so or its folder (default: $DPA_PLUGIN_LIBRARY, build/, installed "
                       "locations; TensorRT uses it when found)")
    group.add_argument("--threads", type=options.THREADS, metavar="N",
                       help="ONNX Runtime intra-op threads (default: its own)")
    group.add_argument("--providers", metavar="LIST",
                       help="ONNX Runtime execution providers, comma-separated, best first: tensorrt, cuda, cpu "
                       "(or full names); each must load (default: from --device)")


def engine_from_args(export_dir: str | os.PathLike, args: argparse.Namespace):
    """Open the engine that the options of add_engine_arguments ask for -> dpa.runtime.engine.Engine."""
    from dpa.runtime.engines import open_engine

    def option(name: str, default=None):  # a namespace built by hand may leave options out
        value = getattr(args, name, None)
        return default if value is None else value

    threads, listed = option("threads"), option("providers")
    if threads is not None and threads < 1:
        raise DpaError("--threads must be at least 1")
    providers = [name.strip() for name in listed.split(",") if name.strip()] if listed else None
    return open_engine(export_dir, backend=option("backend", "onnxruntime"), precision=option("precision", "fp32"),
                       device=option("device", "auto"), threads=threads, providers=providers,
                       cache_dir=option("cache"), plugin_library=option("plugins"))


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="EXPORT_DIR", help="a `dpa export` output folder")
    add_engine_arguments(parser)


@command("build", "build TensorRT plans (or ONNX Runtime sessions) for an export and check them on zero inputs",
         arguments=_build_arguments)
def run_build(args: argparse.Namespace) -> int:
    from dpa.runtime.engine import check_engine

    with engine_from_args(args.directory, args) as engine:
        check_seconds = check_engine(engine)
        print(f"{engine.backend} {engine.precision} on {engine.device}, {engine.form} form, {engine.directory}")
        rows = [("graph", "file", "plan", "build/load s", "check ms", "providers")]
        for name, load in engine.loads.items():
            action = "built" if load.built else "loaded"
            rows.append((name, load.file.name, load.plan.name if load.plan else "-",
                         f"{action} {load.seconds:.2f}", f"{check_seconds[name] * 1e3:.1f}", ", ".join(load.providers)))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        cache = engine.describe().get("cache_dir")
        if cache:
            print(f"cache: {cache}")
    print("check: every graph ran on zero inputs, outputs finite")
    return 0


def _stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `dpa run` and `dpa demo`: memory policy, flow, outputs, statistics."""
    group = parser.add_argument_group("memory and flow")
    group.add_argument("--memory", type=options.MEMORY, metavar="N",
                       help="reference frames the memory holds (default and maximum: the graphs' capacity)")
    group.add_argument("--policy", choices=("auto", "uniform", "offline"), default="auto",
                       help="memory admission: auto (default: offline for files and image folders, uniform for "
                       "live sources), uniform (entries spread over the last --horizon frames), offline (the "
                       "paper's references over the whole file, found in a first pass)")
    group.add_argument("--horizon", type=options.COUNT, default=32, metavar="FRAMES",
                       help="uniform policy: frames the memory spans (default 32)")
    group.add_argument("--min-confidence", type=options.number(0.5, 1), metavar="C",
                       help="uniform policy: admit a frame only when its mask confidence, the mean of max(p, 1-p), "
                       "is at least C (0.5 .. 1; default: no gate)")
    group.add_argument("--flow-preset", choices=("ultrafast", "fast", "medium"), default="fast",
                       help="DIS optical flow preset (default fast)")
    group.add_argument("--flow-size", type=options.FLOW_SIZE, metavar="PIXELS",
                       help="compute DIS flow on the frames resized to PIXELS x PIXELS (default: the model's input "
                       "size S, as in training; 0: the frame's own size, ~200 ms at 854x480)")
    output = parser.add_argument_group("output")
    output.add_argument("--masks", metavar="DIR", help="also write a mask PNG (0/255) per frame, named by frame")
    output.add_argument("--stats-json", metavar="OUT", help="write the run's statistics (fps, per-stage ms, dropped "
                        "frames, memory, engine) as JSON")
    output.add_argument("--stats-interval", type=options.SECONDS, default=5.0, metavar="S",
                        help="seconds between statistics lines on the console (default 5; 0: none)")
    output.add_argument("--max-frames", type=options.COUNT, metavar="N", help="stop after N processed frames")
    output.add_argument("--no-overlay-text", action="store_true", help="draw the mask only, without fps/stage times")
    output.add_argument("--overwrite", action="store_true",
                        help="replace outputs that exist already (an output folder is emptied first); without it an "
                        "existing output is refused before any work")


def _settings(args: argparse.Namespace, source: str, sink: str):
    from dpa.runtime.run import RunSettings

    return RunSettings(source=source, sink=sink, policy=args.policy, memory=args.memory, horizon=args.horizon,
                       min_confidence=args.min_confidence, flow_preset=args.flow_preset, flow_size=args.flow_size,
                       masks=args.masks, stats_json=args.stats_json, stats_interval=args.stats_interval,
                       max_frames=args.max_frames, overlay_text=not args.no_overlay_text,
                       overwrite=getattr(args, "overwrite", False))


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="/dev/videoN, v4l2:///dev/videoN, csi://N, a video file, an image folder, rtsp://…, "
                        "test://PATTERN (ball, smpte, …) or test://synthetic; options as ?width=&height=&fps=&frames=")
    parser.add_argument("sink", metavar="SINK", nargs="?", default="null://",
                        help="display://N, a .mp4/.mkv file, an image folder DIR/ or DIR/%%05d.jpg, "
                        "rtsp://@:PORT/name, or null:// (default)")
    parser.add_argument("--export", metavar="DIR", help="a `dpa export` output folder (or --server)")
    parser.add_argument("--server", metavar="URL",
                        help="grpc://HOST:PORT: run the graphs on a Triton server serving a `dpa triton` repository "
                        "(this run is one stream; its memory lives on the server, with the uniform policy)")
    add_engine_arguments(parser)
    _stream_arguments(parser)


def _run_on_server(args: argparse.Namespace, settings):
    import dataclasses

    from dpa.runtime.run import StreamRunner
    from dpa.runtime.triton.client import TritonModel

    if args.policy == "offline":
        raise DpaError("--server keeps each stream's memory with the uniform policy; leave out --policy offline")
    model = TritonModel(args.server)
    try:
        runner = StreamRunner(model, dataclasses.replace(settings, policy="uniform"), model.describe(), say=print)
        print(f"{args.source} -> {args.sink}: Triton server {args.server} ({model.manifest.config_name}, "
              f"{model.manifest.precision}), uniform memory on the server, flow {runner.flow_direction}")
        return runner.run()
    finally:
        model.close()


@command("run", "segment a camera, file, stream or test source into a display, file, stream or folder",
         arguments=_run_arguments)
def run_stream(args: argparse.Namespace) -> int:
    from dpa.runtime.chain import StageChain
    from dpa.runtime.run import StreamRunner

    if (args.export is None) == (args.server is None):
        raise DpaError("give --export DIR (graphs run here) or --server grpc://HOST:PORT (graphs run on a server)")
    settings = _settings(args, args.source, args.sink)
    if args.server is not None:
        outcome = _run_on_server(args, settings)
    else:
        with engine_from_args(args.export, args) as engine:
            runner = StreamRunner(StageChain(engine), settings, engine.describe(), say=print)
            print(f"{args.source} -> {args.sink}: {engine.backend} ({engine.device}, {engine.precision}), "
                  f"{runner.policy_name} memory, flow {runner.flow_direction}")
            outcome = runner.run()
    summary = outcome.summary
    print(f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} fps), "
          f"{summary['dropped']} dropped, {summary['frames_written']} written to {args.sink}")
    for path in summary["outputs"]:
        print(f"wrote {path}")
    if outcome.error:
        raise DpaError(outcome.error)
    if outcome.signal is not None:  # `dpa.cli` reports it and exits with 128 + the signal number
        raise stop.Stopped(outcome.signal)
    return 0


def _triton_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", metavar="EXPORT", help="a `dpa export` output folder")
    parser.add_argument("--out", required=True, metavar="REPO", help="the model repository to write")
    parser.add_argument("--backend", choices=("python", "onnxruntime", "tensorrt"), default="python",
                        help="what runs the stage graphs: python (ONNX Runtime in Triton's Python backend: any "
                        "server, including the nvidia-pytriton wheel's; default), onnxruntime (Triton's onnxruntime "
                        "backend), tensorrt (plans built here, on the serving GPU)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="which variant of the export to serve (default fp32)")
    parser.add_argument("--streams", type=options.integer(1, 1024), default=4,
                        help="streams served at once (stream slots of the sequence model; default 4)")
    parser.add_argument("--instances", type=options.integer(1, 64), default=1,
                        help="instances of every model: streams computed in parallel (default 1)")
    parser.add_argument("--idle-timeout", type=options.number(0, low_open=True), default=30.0, metavar="SECONDS",
                        help="a stream silent this long is ended and its memory freed (default 30)")
    parser.add_argument("--threads", type=options.integer(0, 1024), default=1,
                        help="ONNX Runtime threads per stage model instance (default 1; 0: its default)")


def _tensorrt_plans(args: argparse.Namespace) -> dict:
    from dpa.runtime.engines import open_engine

    with open_engine(args.export, "tensorrt", precision=args.precision, device="cuda") as engine:
        return {name: load.plan for name, load in engine.loads.items()}


@command("triton", "write a Triton Inference Server model repository: stage models + a sequence model keeping "
         "each stream's memory", arguments=_triton_arguments,
         outputs=lambda args: [Output(Path(args.out), FOLDER, "model repository")])
def run_triton(args: argparse.Namespace) -> int:
    from dpa.runtime.triton.repository import RepositorySettings, write_repository

    settings = RepositorySettings(backend=args.backend, precision=args.precision, streams=args.streams,
                                  instances=args.instances, idle_seconds=args.idle_timeout, threads=args.threads)
    plans = _tensorrt_plans(args) if args.backend == "tensorrt" else None
    repository = write_repository(args.export, args.out, settings, plans)
    print(f"wrote {repository}: {args.backend} stage models, {args.streams} stream slots; serve it with "
          f"`dpa serve {repository}`")
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repository", metavar="REPO", help="a repository made by `dpa triton`")
    parser.add_argument("--port", type=options.integer(1, 65535), default=8001,
                        help="gRPC port (default 8001; HTTP on the next port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 serves the network)")
    parser.add_argument("--triton-env", metavar="DIR",
                        help="a virtual environment with the nvidia-pytriton wheel (default $DPA_TRITON_ENV, else "
                        "the project's .venv-triton, else tritonserver on PATH)")


@command("serve", "serve a `dpa triton` repository with Triton Inference Server until Ctrl-C or SIGTERM",
         arguments=_serve_arguments)
def run_serve(args: argparse.Namespace) -> int:
    from dpa.runtime.triton.server import Server, find_installation, serve_until_stopped

    server = Server(args.repository, find_installation(args.triton_env), grpc_port=args.port,
                    http_port=args.port + 1 if args.port < 65535 else args.port - 1, host=args.host)
    return serve_until_stopped(server)
