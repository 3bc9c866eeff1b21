"""Soak test of the stream loop: many frames through GStreamer and the engine; memory (RSS) and fps over time.

Runs `dpa.runtime.run.StreamRunner` with the uniform (live) memory policy and live flow on a GStreamer test
source, sampling the process's resident memory and the processed-frame count once a second from a side
thread. Reports RSS growth after warm-up and the fps of each tenth of the run.

    .venv/bin/dpa export --checkpoint tiny --out runs/tiny-graphs
    .venv/bin/python benchmarks/soak.py --export runs/tiny-graphs --frames 10000 --json runs/soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def summarize(samples: list[tuple[float, int, int]], summary: dict, frames: int, warmup: int) -> dict:
    """The soak's verdict from the (seconds, frames processed, RSS bytes) samples: RSS growth after the warm-up
    (it must stay under 5 %) and fps in each tenth of the run."""
    after_warmup = [s for s in samples if s[1] >= warmup]
    baseline, final = after_warmup[0][2], after_warmup[-1][2]
    growth = final / baseline - 1
    tenths = []
    for part in range(10):
        low, high = frames * part // 10, frames * (part + 1) // 10
        inside = [s for s in samples if low <= s[1] <= high]
        if len(inside) >= 2:
            tenths.append((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))
    return {
        "frames": summary["frames"],
        "seconds": summary["seconds"],
        "fps": summary["fps"],
        "fps_per_tenth": tenths,
        "rss_mb_after_warmup": baseline / 2**20,
        "rss_mb_final": final / 2**20,
        "rss_growth_after_warmup": growth,
        "rss_growth_ok": growth < 0.05,
        "samples": samples,
        "stages_ms": summary["stages_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="a `dpa export` folder")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=96, help="source frame side in pixels (default 96)")
    parser.add_argument("--warmup", type=int, default=1000, help="frames before the RSS baseline (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--json", help="write the samples and the verdict here")
    args = parser.parse_args(argv)

    from dpa.runtime.chain import StageChain
    from dpa.runtime.engines import open_engine
    from dpa.runtime.run import RunSettings, StreamRunner

    source = f"test://ball?width={args.size}&height={args.size}&fps=30&frames={args.frames}&live=0"
    settings = RunSettings(source=source, sink="null://", policy="uniform", stats_interval=0)
    samples: list[tuple[float, int, int]] = []  # (seconds, frames processed, rss bytes)
    with open_engine(args.export, threads=args.threads) as engine:
        runner = StreamRunner(StageChain(engine), settings, engine.describe())
        done = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not done.wait(1.0):
                samples.append((time.perf_counter() - start, runner.stats.frames, rss_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcome = runner.run()
        done.set()
        sampler.join()
    if outcome.error or outcome.summary["frames"] != args.frames:
        print(f"soak failed: {outcome.error or outcome.summary['frames']} frames", file=sys.stderr)
        return 1
    result = summarize(samples, outcome.summary, args.frames, args.warmup)
    result["source"] = source
    print(f"{result['frames']} frames in {result['seconds']:.0f} s ({result['fps']:.1f} fps); RSS "
          f"{result['rss_mb_after_warmup']:.1f} MB after {args.warmup} frames -> {result['rss_mb_final']:.1f} MB "
          f"({100 * result['rss_growth_after_warmup']:+.2f} %); fps per tenth: "
          f"{', '.join(f'{f:.1f}' for f in result['fps_per_tenth'])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["rss_growth_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
