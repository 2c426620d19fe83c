"""The one image reader of dtop: datasets, ``dtop predict`` and ``dtop bench`` decode images here.

``read_image(path)`` -> uint8 (H, W, 3) RGB; ``IMAGE_SUFFIXES``: what a folder of images is searched for;
``image_files(inputs)``: the image files named or found in folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


def read_image(path: Union[str, Path]) -> np.ndarray:
    """uint8 (H, W, 3) RGB from any file Pillow decodes; InputError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(inputs: Sequence[Union[str, Path]]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named, and image files found (not recursively) in the folders named, in order; returns them and
    the inputs that gave none (``{"file": ..., "error": ...}``: missing paths, folders without images)."""
    files: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if is_image_file(f))
            if not found:
                errors.append({"file": str(p), "error": "no image files in this folder"})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"file": str(p), "error": "no such file or folder"})
    return files, errors
