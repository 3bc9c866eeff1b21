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


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB; DpaError naming the file when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        if not Path(path).is_file():
            raise DpaError(f"image not found: {path}")
        raise DpaError(f"cannot decode image {path} (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W) gray -> the bytes of an image file of that suffix (.jpg at jpeg_quality, .png)."""
    is_jpeg = suffix.lower() in (".jpg", ".jpeg")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if is_jpeg else []
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, encoded = cv2.imencode(suffix, pixels, params)
    if not ok:
        raise DpaError(f"cannot encode a {image.shape} {image.dtype} image as {suffix}")
    return encoded.tobytes()


def write_rgb(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write a uint8 (H, W, 3) RGB image; the format follows the suffix (.jpg at `jpeg_quality`, .png)."""
    is_jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if is_jpeg else []
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise DpaError(f"cannot write image {path}; check that the folder exists and is writable")
