"""Subcommands of dpa.runtime: `build` (TensorRT plans or ONNX Runtime sessions for an export directory, checked
on zero inputs), and the engine options every engine-using command shares (`add_engine_arguments`,
`engine_from_args`).

numpy, onnxruntime and tensorrt are imported inside the run functions, so `dpa --help` stays fast.
"""

from __future__ import annotations

import argparse
import os

from dpa.cli import command

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
    group.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: its own)")
    group.add_argument("--providers", metavar="LIST",
                       help="ONNX Runtime execution providers, comma-separated, best first: tensorrt, cuda, cpu "
                       "(or full names); each must load (default: from --device)")


def engine_from_args(export_dir: str | os.PathLike, args: argparse.Namespace):
    """Open the engine that the options of add_engine_arguments ask for -> dpa.runtime.engines.Engine."""
    from dpa.errors import DpaError
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
    from dpa.runtime.engines import check_engine

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
