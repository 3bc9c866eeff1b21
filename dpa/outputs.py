"""The one output path (torch-free): every file or folder a command writes is claimed before the work starts.

`claim_outputs` (a context manager), for each output:
- takes a lock (`flock` on `.<name>.dpa-lock` next to it): a second process writing the same output is refused
  with a message naming the holder, and the lock goes with the process however it ends;
- refuses an output that exists already unless `overwrite` (a folder counts when it holds files; `overwrite`
  empties it first, so no stale file survives, and only a folder that dpa wrote: one holding the `.dpa-output`
  marker every output folder gets); an output marked `keep` (a resumed run, incremental flow images) is kept as it
  is, and the command decides what to replace;
- checks that it can be written (its folder is created, a probe file written and removed), so a read-only path
  fails before any work.
Files are then written whole or not at all (`dpa.files.write_bytes_atomically`), and a writer that meets a
failure keeps the first one to report (`FirstFailure`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpa.errors import DpaError

FILE, FOLDER = "file", "folder"
MARKER = ".dpa-output"  # in every output folder: `overwrite` empties only folders that hold it


@dataclass(frozen=True)
class Output:
    """An output a command is about to write: a file, or a folder of files (e.g. mask PNGs)."""

    path: Path
    kind: str = FILE
    what: str = "output"  # how messages name it ("video", "mask folder", "statistics")
    keep: bool = False  # what exists is kept and added to (a resumed training run, incremental flow images)

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.dpa-lock"


def optional(path: str | os.PathLike | None, kind: str = FILE, what: str = "output",
             keep: bool = False) -> list[Output]:
    """[the Output at `path`], or [] when the option was not given: `outputs=` functions add these up."""
    return [] if path is None else [Output(Path(path), kind, what, keep)]


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _lock(output: Output) -> int:
    """Take the output's lock; its descriptor, or DpaError naming the holder. The lock file is removed on release,
    so a lock taken on a file that was just removed is retried on the new one."""
    for _ in range(8):
        try:
            output.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(output.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise DpaError(f"cannot write the {output.what} {output.path}: {error.strerror or error}; choose a "
                           "writable path") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise DpaError(f"the {output.what} {output.path} is being written by {_holder(output.lock_path)}; wait "
                           "for it to finish or choose another path") from None
        try:
            if os.stat(output.lock_path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the holder released and removed it in between: lock the current file
    else:
        raise DpaError(f"could not lock the {output.what} {output.path}")
    command = " ".join(sys.argv[:6])
    record = f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {time.strftime('%H:%M:%S')}"
    os.ftruncate(descriptor, 0)
    os.write(descriptor, record.encode())
    return descriptor


def _exists(output: Output) -> bool:
    if output.kind == FOLDER:
        return output.path.is_dir() and any(entry.name != MARKER for entry in output.path.iterdir())
    return output.path.exists()


def _clear(output: Output) -> None:
    """Remove what an existing output holds (overwrite); a folder without the dpa marker is refused."""
    if output.kind == FOLDER:
        if not (output.path / MARKER).is_file():
            raise DpaError(f"the {output.what} {output.path} holds files that dpa did not write (no {MARKER} in it); "
                           "empty it yourself or choose another path")
        for entry in output.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif output.path.is_dir():
        raise DpaError(f"the {output.what} {output.path} is a folder; choose a file path")
    else:
        output.path.unlink(missing_ok=True)


def _probe(output: Output) -> None:
    """Create the output's folder and write and remove a probe file in it."""
    folder = output.path if output.kind == FOLDER else output.path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{output.path.name}.dpa-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if output.kind == FOLDER:
            (output.path / MARKER).write_text(f"written by `{' '.join(sys.argv[:6])}`\n")
    except OSError as error:
        raise DpaError(f"cannot write the {output.what} {output.path}: {error.strerror or error}; choose a writable "
                       "path") from error


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _holds_only_markers(folder: Path) -> bool:
    return all(entry.is_file() and entry.name == MARKER or entry.is_dir() and _holds_only_markers(entry)
               for entry in folder.iterdir())


@contextlib.contextmanager
def claim_outputs(outputs: Sequence[Output], overwrite: bool = False) -> Iterator[list[Output]]:
    """Lock, check and prepare every output before the work (module doc); the locks are released on exit. Folders
    created for the outputs are removed again when nothing was written into them (the command failed or stopped
    first)."""
    descriptors: list[tuple[Output, int]] = []
    created: list[Path] = []
    try:
        for output in outputs:
            folder = output.path if output.kind == FOLDER else output.path.parent
            if (missing := _first_missing(folder)) is not None:
                created.append(missing)
            descriptors.append((output, _lock(output)))
            if _exists(output) and not output.keep:
                if not overwrite:
                    raise DpaError(f"the {output.what} {output.path} exists already; pass --overwrite to replace it "
                                   "or choose another path")
                _clear(output)
            _probe(output)
        yield list(outputs)
    finally:
        for output, descriptor in reversed(descriptors):
            with contextlib.suppress(OSError):
                output.lock_path.unlink()
            os.close(descriptor)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                if folder.is_dir() and _holds_only_markers(folder):
                    shutil.rmtree(folder)


class FirstFailure:
    """The first write that failed, kept so that it, not a later consequence, is what the command reports."""

    def __init__(self):
        self.message: str | None = None

    def record(self, message: str) -> None:
        if self.message is None:
            self.message = message

    def raise_if_failed(self) -> None:
        if self.message is not None:
            raise DpaError(self.message)
