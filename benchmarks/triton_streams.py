"""Many streams: one Triton server serving K streams against K local processes, side by side.

For each K, K `dpa run` processes read K different non-live synthetic clips at once (every frame processed,
nothing dropped): once with `--server` against one tritonserver (the nvidia-pytriton wheel's, Python backend,
ONNX Runtime with one thread per stage model instance), once each with the graphs in its own process
(`--export`, ONNX Runtime with `--threads` threads). A stream's fps is its loop's frames / seconds (from its
statistics JSON); the total is their sum (the streams run at the same time: the script checks that their loops
overlap). The server's own compute per frame (`server_compute`) and the round trip (`server`) are reported too.

    .venv/bin/dpa export --checkpoint tiny --out runs/tiny-graphs
    .venv/bin/python benchmarks/triton_streams.py --export runs/tiny-graphs --streams 1 2 4 --json runs/streams.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpa.files import write_text_atomically
from dpa.runtime.triton.repository import RepositorySettings, write_repository
from dpa.runtime.triton.server import Server, find_installation, free_port


def source(seed: int, frames: int, size: int) -> str:
    return f"test://synthetic?seed={seed}&frames={frames}&size={size}&live=0"


def run_streams(count: int, target: list[str], frames: int, size: int, folder: Path) -> dict:
    """K concurrent `dpa run` processes with `target` (--server URL or --export DIR ...); per-stream results."""
    processes, stats = [], []
    for stream in range(count):
        path = folder / f"stream-{stream}.json"
        stats.append(path)
        command = [sys.executable, "-m", "dpa", "run", source(100 + stream, frames, size), "null://", *target,
                   "--policy", "uniform", "--stats-json", str(path), "--stats-interval", "0", "--overwrite"]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise SystemExit(f"a stream failed: {stderr[-2000:]}")
    summaries = [json.loads(path.read_text()) for path in stats]
    ends = [path.stat().st_mtime for path in stats]
    starts = [end - summary["seconds"] for end, summary in zip(ends, summaries, strict=True)]
    per_stream = [summary["fps"] for summary in summaries]
    stages = summaries[0]["stages_ms"]
    return {
        "streams": count,
        "fps_per_stream": per_stream,
        "fps_total": sum(per_stream),
        "overlap": max(starts) < min(ends),
        "server_ms": stages.get("server", {}).get("median"),
        "server_compute_ms": stages.get("server_compute", {}).get("median"),
        "frames": [summary["frames"] for summary in summaries],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--size", type=int, default=256, help="synthetic frame side (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of each local process")
    parser.add_argument("--instances", type=int, default=1, help="server: instances of every model")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args()

    results = {"server": [], "local": [], "settings": vars(args)}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        repository = write_repository(args.export, folder / "repo", RepositorySettings(
            streams=max(args.streams), instances=args.instances, threads=1))
        with Server(repository, find_installation(), grpc_port=free_port(), http_port=free_port()) as server:
            for count in args.streams:
                results["server"].append(run_streams(count, ["--server", server.address], args.frames, args.size,
                                                     folder))
                results["local"].append(run_streams(count, ["--export", args.export, "--threads", str(args.threads)],
                                                    args.frames, args.size, folder))
                time.sleep(1)
    print("| streams | one server: fps total | per stream | round trip ms | server compute ms | "
          f"{'local processes'}: fps total | per stream |")
    print("|---|---|---|---|---|---|---|")
    for served, local in zip(results["server"], results["local"], strict=True):
        print(f"| {served['streams']} | {served['fps_total']:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in served['fps_per_stream'])} | {served['server_ms']:.1f} | "
              f"{served['server_compute_ms']:.1f} | {local['fps_total']:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in local['fps_per_stream'])} |")
    if args.json:
        write_text_atomically(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
