"""Small file helpers shared by every package (torch-free): hashes and whole-file writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from dpa.errors import DpaError


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, hex; read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder for a writer (torch.save, onnx.save, savefig, cv2.imwrite …) and
    rename it over `path` when the block ends without error, so a reader, a crash or a full disk never leaves a
    partial file at `path`; its folder is created. DpaError naming the file and the reason (e.g. "No space left on
    device") when it cannot be written; the temporary file never stays behind."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # keeps the suffix writers look at
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        if not temporary.is_file():
            raise DpaError(f"cannot write {path}: the writer produced no file")
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DpaError(f"cannot write {path}: {error.strerror or error}") from error
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all (`atomic_path`). Returns the path."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomically` for UTF-8 text."""
    return write_bytes_atomically(path, text.encode())
