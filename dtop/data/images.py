"""The one image reader of dtop: datasets, ``dtop predict`` and ``dtop bench`` decode images here.

``read_image(path)`` -> uint8 (H, W, 3) RGB as a viewer shows the file; ``open_displayed(path)``: the
Pillow image with its EXIF orientation applied (labels are opened the same way, ``labels.py``);
``reduced_depth(im)``: the 16-bit sample layout Pillow's decoder cut to 8 bits, if it did;
``IMAGE_SUFFIXES``: what a folder of images is searched for; ``image_files(inputs)``: the image files named
or found in folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError

# The raster formats Pillow reads that photos and masks come in (an earlier suffix wins a shared stem).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm",
                  ".jpe", ".jfif", ".jp2", ".j2k", ".avif", ".apng", ".pnm", ".tga", ".qoi")

# Modes whose RGB is Pillow's own conversion: grey and 1-bit repeated, palette colours looked up, alpha
# dropped (RGBa un-premultiplied first), CMYK / YCbCr / HSV / CIE LAB converted, RGBX's padding byte dropped.
_PILLOW_RGB = ("RGB", "RGBX", "RGBA", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB")
# 16-bit greyscale in any byte order: scaled 0..65535 -> 0..255 (value / 257, rounded).
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Multi-channel modes whose 16-bit samples Pillow's decoders cut to their high byte (16-bit RGB, RGBA and
# grey+alpha PNGs open as 8-bit RGB / RGBA): the decoder's raw mode is kept under this key of ``im.info``.
REDUCED_KEY = "dtop.reduced_from"


def open_displayed(path: Union[str, Path], what: str = "image") -> Image.Image:
    """The decoded Pillow image of ``path`` turned as a viewer shows it (EXIF Orientation applied with
    ``ImageOps.exif_transpose``; width and height swapped for orientations 5-8); mode, palette and
    transparency kept; a 16-bit-per-sample RGB(A) or grey+alpha file, which Pillow reads as its high bytes,
    is marked (:func:`reduced_depth`). InputError naming the file when Pillow cannot read it."""
    try:
        with Image.open(path) as im:
            raw = [t.args[0] if isinstance(t.args, tuple) else t.args for t in im.tile or []]
            im.load()  # pixels (and a PNG's trailing eXIf chunk) read: valid after the file is closed
            ImageOps.exif_transpose(im, in_place=True)
            reduced = [r for r in raw if isinstance(r, str) and ";16" in r and im.mode in ("RGB", "RGBA", "LA")]
            if reduced:
                im.info[REDUCED_KEY] = reduced[0]
            return im
    except _READ_ERRORS as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def reduced_depth(im: Image.Image) -> Optional[str]:
    """The decoder's raw mode (e.g. ``"LA;16B"``, ``"RGB;16B"``) when :func:`open_displayed` found 16-bit
    samples that Pillow read as 8-bit (their high byte), else None."""
    return im.info.get(REDUCED_KEY)


def read_image(path: Union[str, Path]) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file as a viewer shows it (H, W: the displayed, EXIF-rotated size).

    Every Pillow mode is decoded on purpose (:func:`to_rgb`): alpha (LA, RGBA, PA, P with transparency) is
    DROPPED, not composited, as OpenCV's ``imread`` does, so the colour under transparent pixels is kept;
    16-bit grey (I;16, I;16B, and I holding 0..65535, as 16-bit PGM/TIFF open) is scaled by /257, float
    grey (F) in 0..1 by x255; 16-bit-per-channel RGB files are reduced to 8 bits by Pillow's decoder
    (high byte). InputError naming the file: unreadable, a mode without a display convention (named), or
    I / F values outside the range above."""
    return to_rgb(open_displayed(path), path)


def to_rgb(im: Image.Image, path: Union[str, Path] = "<image>") -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded Pillow image, mode by mode (see :func:`read_image`); InputError naming
    ``path`` and the mode for a mode without a display convention."""
    if im.mode in _PILLOW_RGB:
        straight = {"RGBa": "RGBA", "La": "LA"}.get(im.mode)  # premultiplied alpha: un-premultiply first
        if im.mode == "P" and "transparency" in im.info:
            straight = "RGBA"  # the palette's colours, alpha then dropped (Pillow warns on P -> RGB here)
        return np.asarray((im.convert(straight) if straight else im).convert("RGB"))
    if im.mode in SIXTEEN_BIT or im.mode in ("I", "F"):
        grey = _grey_to_uint8(np.asarray(im), im.mode, path)
        return np.repeat(grey[..., None], 3, axis=2)
    raise InputError(f"image {path} has Pillow mode {im.mode!r}, which dtop cannot show as RGB; "
                     "save it as 8-bit RGB, greyscale or palette (e.g. PNG or JPEG)")


def _grey_to_uint8(arr: np.ndarray, mode: str, path: Union[str, Path]) -> np.ndarray:
    """uint8 (H, W) from 16-bit (I;16*, I) or float (F) grey: scaled by the range, never clipped."""
    if mode == "F":
        lo, hi, scale, kind = 0.0, 1.0, 255.0, "32-bit float greyscale (mode F), read as 0..1"
    else:
        lo, hi, scale, kind = 0, 65535, 1 / 257, f"high-bit-depth greyscale (mode {mode}), read as 16-bit 0..65535"
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= lo and arr.max() <= hi):
        shown = f"{arr.min()}..{arr.max()}" if np.isfinite(arr).all() else "non-finite values"
        raise InputError(f"image {path} is {kind}, but holds {shown}: no display range to scale it by; "
                         "save it as 8-bit or 16-bit greyscale (or as float scaled to 0..1)")
    return np.round(arr.astype(np.float64) * scale).astype(np.uint8)


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(inputs: Sequence[Union[str, Path]], recursive: bool = False,
                skipped: Optional[list[Path]] = None) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named, and image files found in the folders named (``recursive``: in their subfolders too), in
    order; returns them and the inputs that gave none (``{"file": ..., "error": ...}``: missing paths,
    folders without images). ``skipped``, when given, receives what the folders held but was not taken:
    subfolders (without ``recursive``) and files that are not images by their suffix."""
    files: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            entries = sorted(p.rglob("*") if recursive else p.iterdir())
            found = [f for f in entries if f.is_file() and is_image_file(f)]
            if skipped is not None:
                skipped += [f for f in entries if (f.is_dir() and not recursive) or (f.is_file() and f not in found)]
            if not found:
                errors.append({"file": str(p), "error": "no image files in this folder"
                                                        + ("" if recursive else " (--recursive searches its subfolders)")})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"file": str(p), "error": "no such file or folder"})
    return files, errors
