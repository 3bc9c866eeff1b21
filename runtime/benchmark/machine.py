"""The machine a benchmark ran on (torch-free): CPU, SIMD flags, cores, load, GPU, package versions."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


# /proc/cpuinfo flags that decide fp32 and int8 kernel speed (reported with the machine).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gstreamer_version() -> str | None:
    """The GStreamer version: from PyGObject when this process has loaded GStreamer, else from `gst-launch-1.0
    --version`. GStreamer is not loaded just for this: with OpenCV also loaded, it makes the ONNX exporter abort
    in onnx.defs.get_schema (an uncaught C++ exception), and exports and `dpa calibrate` may follow."""
    loaded = sys.modules.get("gi.repository.Gst")
    if loaded is not None:
        return ".".join(str(part) for part in loaded.version()[:3])
    tool = shutil.which("gst-launch-1.0")
    if tool is None:
        return None
    try:
        output = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"GStreamer (\d+\.\d+\.\d+)", output)
    return match.group(1) if match else None


def machine_info() -> dict:
    """The machine a report was measured on: CPU model, cores, memory, OS, Python and package versions, load.

    Reads /proc/cpuinfo and /proc/meminfo where present; package versions come from their metadata (torch is
    not imported).
    """
    cpu, physical, flags, identity = platform.processor() or None, set(), [], {}
    try:
        current: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = (part.strip() for part in line.partition(":"))
            if not key:
                if "core id" in current:
                    physical.add((current.get("physical id", "0"), current["core id"]))
                current = {}
            else:
                current[key] = value
                if key == "model name" and cpu in (None, "", platform.machine()):
                    cpu = value
                if key in ("vendor_id", "cpu family", "model", "stepping") and key not in identity:
                    identity[key] = value
                if key == "flags" and not flags:
                    flags = [flag for flag in value.split() if flag in SIMD_FLAGS]
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    from dpa.runtime.engines import visible_gpus

    gpus = visible_gpus()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "cpu_id": identity or None,
        "simd": flags,
        "usable_cores": usable_cores(),
        "memory_gib": memory,
        "gpus_visible": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {
            "numpy": _package_version("numpy"),
            "opencv": _package_version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
            "onnxruntime": _package_version("onnxruntime", "onnxruntime-gpu"),
            "torch": _package_version("torch"),
            "tensorrt": _package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
            "gstreamer": _gstreamer_version(),
        },
        "load_average": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def oversubscription_warning(machine: Mapping, threads: int | None = None) -> str | None:
    """A warning when the 1-minute load average, at the start or the end of the run, exceeded the usable cores."""
    loads = [values[0] for values in (machine.get("load_average"), machine.get("load_average_end")) if values]
    cores = machine.get("usable_cores") or 1
    if not loads or max(loads) <= cores:
        return None
    load = f"the machine was oversubscribed (1-minute load {max(loads):.1f} on {cores} usable cores)"
    if threads == 1:
        return (f"{load}: absolute times are slower and noisier than on a quiet machine; the ratios, measured "
                "interleaved, are the numbers to use")
    return (f"{load}: multi-threaded timings are unreliable, PyTorch's most (its OpenMP barriers stall whenever one "
            "of its threads is preempted); re-run on a quiet machine, or compare with --threads 1")

