"""The fault-injection suite's tools: real `dpa` processes, signals sent to them, mounted file systems, and checks
of what they leave behind (one error line, complete files)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

ENVIRONMENT = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Finished:
    """A `dpa` process that ended: its exit code and what it printed."""

    code: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("dpa") and ": error: " in line]


def run_dpa(*arguments: str, timeout: float = 300) -> Finished:
    """Run `python -m dpa ARGUMENTS` to its end."""
    result = subprocess.run([sys.executable, "-m", "dpa", *arguments], capture_output=True, text=True,
                            timeout=timeout, env=ENVIRONMENT)
    return Finished(result.returncode, result.stdout, result.stderr)


class Running:
    """A `dpa` process started in the background; its output goes to files (a full pipe never blocks it)."""

    def __init__(self, folder: Path, *arguments: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            # a process group of its own, as a shell job or a service has: stop_group signals all of it
            self.process = subprocess.Popen([sys.executable, "-m", "dpa", *arguments], stdout=stdout, stderr=stderr,
                                            env=ENVIRONMENT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        """Poll `condition()` until it holds; fail naming `what` (with the process's output) when the process
        ends first or the time is up."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the process ended (rc {self.process.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no {what} within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def stop(self, signum: int, timeout: float = 120) -> Finished:
        """Send `signum` and wait for the process to end."""
        self.process.send_signal(signum)
        return self.finish(timeout)

    def stop_group(self, signum: int, timeout: float = 120) -> Finished:
        """Send `signum` to the whole process group (the command and any helpers it started, as Ctrl-C in a
        terminal, `kill -- -PGID` or a service manager's stop do) and wait for the command to end."""
        os.killpg(self.process.pid, signum)
        return self.finish(timeout)

    def finish(self, timeout: float = 300) -> Finished:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the process did not end within {timeout} s:\n{self.output()[-3000:]}")
        return Finished(code, self.stdout_path.read_text(), self.stderr_path.read_text())


def assert_one_error_line(finished: Finished, *fragments: str) -> str:
    """Exit code 1, no traceback, exactly one `dpa COMMAND: error: ...` line, holding every fragment."""
    assert finished.code == 1, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    lines = finished.error_lines()
    assert len(lines) == 1, finished.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_stopped(finished: Finished, signum: int) -> None:
    """Exit code 128 + signum, no traceback, the stop said in one line."""
    name = signal.Signals(signum).name
    assert finished.code == 128 + signum, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert f"stopped by {name}" in finished.stderr, finished.stderr[-3000:]


def complete_masks(folder: Path, shape: tuple[int, int]) -> int:
    """The number of mask PNGs in `folder`; each must decode to a (H, W) = `shape` image of 0 and 255, and no
    temporary file may be left."""
    leftovers = [path.name for path in folder.iterdir() if path.name.endswith(".tmp") or ".tmp." in path.name]
    assert not leftovers, leftovers
    masks = sorted(folder.glob("*.png"))
    for path in masks:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape == shape, path
        assert set(np.unique(image)) <= {0, 255}, path
    return len(masks)


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text())


def video_frames(path: Path) -> tuple[int, float]:
    """(frames, seconds) of a video file read back with GStreamer: seconds = the last PTS + one frame."""
    from dpa.runtime.video import VideoSource

    frames, last = 0, 0.0
    with VideoSource(str(path)) as source:
        while (frame := source.read()) is not None:
            frames += 1
            last = frame.timestamp
        step = 1.0 / source.fps if source.fps else 0.0
    return frames, (last + step if frames else 0.0)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` mounted at `folder` (root only: skips elsewhere), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system of a chosen size needs root")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def write_video(path: Path, frames: int, width: int = 160, height: int = 120, container: str = "mp4mux") -> Path:
    """A real H.264 video of `frames` frames of the moving ball at 30 fps."""
    from gstreamer_support import run_to_eos

    run_to_eos(f"videotestsrc pattern=ball num-buffers={frames} ! video/x-raw,width={width},height={height},"
               "framerate=30/1 ! videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency "
               f"speed-preset=ultrafast key-int-max=30 ! h264parse ! {container} ! filesink location={path}",
               timeout_s=120)
    return path


def write_frames(folder: Path, count: int, size: tuple[int, int] = (160, 120), suffix: str = ".jpg") -> list[Path]:
    """`count` frames of a moving square (W, H = size) as image files 00000.jpg …"""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for index in range(count):
        image = np.full((height, width, 3), 40, np.uint8)
        x = 4 + (index * 3) % max(1, width - 24)
        image[height // 3: height // 3 + 16, x: x + 16] = (230, 200, 30)
        path = folder / f"{index:05d}{suffix}"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths
