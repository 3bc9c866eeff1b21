"""Image files as every package reads and writes them (torch-free): which suffixes count as images, the frame
order of a folder, and uint8 RGB in and out."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from dpa.errors import DpaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # frames, in every layout and video source
MASK_SUFFIXES = (".png",)
MIN_FRAME_SIDE = 16  # frames the runtime takes: smaller ones carry no usable segmentation
MAX_FRAME_SIDE = 4096  # larger ones would take gigabytes in the loop (an 8000 x 8000 frame: 10.6 GB)


def natural_key(name: str | os.PathLike) -> list:
    """Sort key of a file name (or a path's name) that orders frame 2 before frame 10 whatever the zero padding."""
    text = name if isinstance(name, str) else Path(name).name
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder in frame order (natural sort of their names); [] for a missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((path for path in folder.iterdir() if path.is_file() and is_image(path)), key=natural_key)


def read_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB; DpaError naming the file when it is missing, cannot be decoded, is
    truncated (a JPEG without its end marker, a PNG without its IEND chunk: decoders would fill the rest grey), or
    is larger than `max_side` pixels a side (checked on the header, before decoding)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DpaError(f"image not found: {path}") from None
    except OSError as error:
        raise DpaError(f"cannot read image {path}: {error.strerror or error}") from error
    problem = truncation(data) if data else "the file is empty"
    if problem:
        raise DpaError(f"cannot use image {path}: {problem}")
    if max_side is not None:
        size = header_size(data)
        if size is not None and max(size) > max_side:
            raise DpaError(f"image {path} is {size[0]}x{size[1]}, larger than {max_side} pixels a side")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DpaError(f"cannot decode image {path} (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def truncation(data: bytes) -> str | None:
    """Why the bytes of a JPEG or PNG file are incomplete, or None (other formats are not checked)."""
    if data.startswith(JPEG_START) and JPEG_END not in data[-64:]:
        return "the JPEG is truncated (no end-of-image marker)"
    if data.startswith(PNG_SIGNATURE) and b"IEND" not in data[-16:]:
        return "the PNG is truncated (no IEND chunk)"
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding the pixels; None when not found."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(JPEG_START):
        return None
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            height = int.from_bytes(data[position + 5:position + 7], "big")
            return int.from_bytes(data[position + 7:position + 9], "big"), height
        position += 2 + length
    return None


def encode_image(image: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W) gray -> the bytes of an image file of that suffix (.jpg at jpeg_quality, .png)."""
    is_jpeg = suffix.lower() in (".jpg", ".jpeg")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if is_jpeg else []
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(suffix, pixels, params)
    if not ok:
        raise DpaError(f"cannot encode a {image.shape} {image.dtype} image as {suffix}")
    return encoded.tobytes()


def write_image(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write a uint8 RGB (H, W, 3) or gray (H, W) image whole or not at all (encoded in memory, then
    `write_bytes_atomically`); the format follows the suffix (.jpg at `jpeg_quality`, .png). DpaError naming the
    file and the reason (no space left, read-only, …) when it cannot."""
    from dpa.files import write_bytes_atomically

    write_bytes_atomically(path, encode_image(image, Path(path).suffix, jpeg_quality))
