"""Label files: class ids read exactly from the modes users save, or colour masks mapped through a palette.

``read_label_ids`` (``label_mode='ids'``) and ``read_label_rgb`` (``label_mode='rgb'``) open the file as a
viewer shows it (EXIF orientation applied, :func:`dtop.data.images.open_displayed`) and give int64 (H, W).
A file that could mean two things is refused with an InputError naming its Pillow mode and the fix.
Colours a colour mask holds that its palette lacks are read as the ignore id and reported in one warning per
palette (they may be a class the palette forgot, or the blur of a lossy format).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .images import SIXTEEN_BIT, open_displayed, reduced_depth
from .meta import IGNORE_INDEX

# Single-channel modes whose pixel values are the class ids as stored (P: the palette index).
ID_MODES = ("L", "P", "1", "I") + SIXTEEN_BIT
_ALPHA_MODES = ("LA", "PA", "RGBA")
_IDS_HINT = "label_mode='ids' reads class ids from single-channel PNGs (L, P index, 1-bit, I;16)"
_RGB_HINT = "label_mode='rgb' (with palette=[(r, g, b), ...], a folder dataset) reads colour masks"
_WARNED_PALETTES: set[tuple[int, ...]] = set()  # palettes whose unknown colours were reported


def _require_opaque(im: Image.Image, path: Path) -> None:
    """InputError when the alpha channel of ``im`` (LA, PA, RGBA) is not 255 everywhere."""
    alpha = np.asarray(im.getchannel("A"))
    if (alpha != 255).any():
        raise InputError(f"label {path} (mode {im.mode}) has an alpha channel that is not fully opaque "
                         f"({int((alpha != 255).sum())} pixels): transparent pixels have no class; save the "
                         f"label without alpha ({_IDS_HINT}; {_RGB_HINT})")


def label_ids(im: Image.Image, path: Path) -> np.ndarray:
    """int64 (H, W) class ids of a decoded label image (``label_mode='ids'``).

    L, P (palette index = id, palette and transparency ignored), 1 (0/1), I;16* and I (exact, up to 65535
    and beyond); LA / PA / RGB(A) whose alpha is fully opaque, the grey (or index) channel, RGB only when
    R == G == B. InputError naming the mode: a colour RGB mask (set label_mode='rgb'), alpha that is not
    opaque, float (F), negative ids, a 16-bit RGB(A) or grey+alpha file (Pillow reads only the high byte
    of its samples, :func:`~dtop.data.images.reduced_depth`), any other mode."""
    mode = im.mode
    if reduced_depth(im):
        raise InputError(f"label {path} stores 16-bit samples ({reduced_depth(im)}: 16-bit "
                         f"{'grey+alpha' if reduced_depth(im).startswith('LA') else 'colour'}), which Pillow reads as "
                         f"their high 8 bits (mode {mode}): its class ids would be wrong; save it as a single-channel "
                         f"16-bit PNG without alpha (mode I;16) or an 8-bit one ({_IDS_HINT})")
    if mode in _ALPHA_MODES:
        _require_opaque(im, path)
        im = im.convert("RGB") if mode == "RGBA" else im.getchannel(0)
    if im.mode in ("RGB", "RGBX"):
        rgb = np.asarray(im)[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 0] == rgb[..., 2])).all():
            raise InputError(f"label {path} is a colour image (mode {mode}) but label_mode is 'ids'; "
                             f"{_RGB_HINT}")
        return rgb[..., 0].astype(np.int64)
    if im.mode not in ID_MODES:
        kind = "32-bit float (mode F)" if mode == "F" else f"Pillow mode {mode}"
        raise InputError(f"label {path} is {kind}, which holds no exact class ids: save it as an 8- or "
                         f"16-bit PNG ({_IDS_HINT}; {_RGB_HINT})")
    arr = np.asarray(im).astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"label {path} (mode {mode}) has negative values ({arr.min()}); class ids are >= 0 "
                         "(255 = ignore)")
    return arr


def read_label_ids(path: Path) -> np.ndarray:
    """int64 (H, W) class ids from a label file (``label_mode='ids'``, see :func:`label_ids`); InputError
    naming the file when it cannot be read or its mode is ambiguous."""
    return label_ids(open_displayed(path, "label"), path)


def _colour_codes(im: Image.Image, path: Path) -> tuple[np.ndarray, bool]:
    """int64 (H, W) colour codes ``r << 16 | g << 8 | b`` of a label image (-1: a grey value above 255), and
    whether it was grey (value v read as colour (v, v, v)). P goes through its OWN palette."""
    mode = im.mode
    if mode in _ALPHA_MODES:
        _require_opaque(im, path)
    if mode in ("P", "PA", "RGB", "RGBX", "RGBA", "LA"):
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], mode == "LA"
    if mode in ID_MODES:
        grey = np.asarray(im.convert("L") if mode == "1" else im).astype(np.int64)
        return np.where((grey >= 0) & (grey <= 255), grey * 0x010101, -1), True
    raise InputError(f"label {path} has Pillow mode {mode}, which is neither class ids nor a colour mask; "
                     f"save it as an RGB or palette PNG ({_RGB_HINT}; {_IDS_HINT})")


def read_label_rgb(path: Path, palette: Sequence[Sequence[int]], ignore_index: int = IGNORE_INDEX,
                   ignored: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """int64 (H, W) ids from a colour mask (``label_mode='rgb'``): colour ``palette[k]`` -> k, any other
    colour -> ``ignore_index`` (255 by default). RGB, opaque RGBA, and P-mode files through their own
    palette (its order may differ per file); a greyscale file (L, 1, I;16) only when every grey level is a
    palette colour, else InputError (it probably holds class ids: set label_mode='ids'). InputError for
    non-opaque alpha and other modes. Colours in neither ``palette`` nor ``ignored`` (colours known to mean
    'ignore', e.g. the one reduce_zero_label drops) are reported in a UserWarning, once per palette."""
    codes, grey = _colour_codes(open_displayed(path, "label"), path)
    pal = np.asarray(palette, np.int64).reshape(-1, 3)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_codes, kind="stable")
    sorted_codes = pal_codes[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    hit = sorted_codes[pos] == codes
    if grey and not hit.all():
        levels = [int(c) // 0x010101 if c >= 0 else ">255" for c in np.unique(codes[~hit])[:8]]
        raise InputError(f"label {path} is greyscale but label_mode is 'rgb', and its grey levels "
                         f"{', '.join(map(str, levels))} are no palette colour: if it holds class ids set "
                         "label_mode='ids', else save it as an RGB colour mask")
    known = hit | np.isin(codes, [(r << 16) | (g << 8) | b for r, g, b in ignored])
    if not known.all():
        _warn_unknown_colours(path, codes, known, pal_codes, ignore_index)
    return np.where(hit, order[pos], ignore_index).astype(np.int64)  # other colours: the ignore id


def _warn_unknown_colours(path: Path, codes: np.ndarray, hit: np.ndarray, pal_codes: np.ndarray,
                          ignore_index: int) -> None:
    """A UserWarning (the first file of each palette only) naming the colours of ``codes`` that are not in the
    palette, how many pixels have them, and that they are read as the ignore id."""
    key = tuple(int(c) for c in pal_codes)
    if key in _WARNED_PALETTES:
        return
    _WARNED_PALETTES.add(key)
    colours, counts = np.unique(codes[~hit], return_counts=True)
    shown = ", ".join(f"({c >> 16}, {c >> 8 & 255}, {c & 255}) x {n}"
                      for c, n in sorted(zip(colours.tolist(), counts.tolist()), key=lambda cn: -cn[1])[:5])
    missed = int(counts.sum())
    warnings.warn(f"label {path}: {missed} of {codes.size} pixels ({100 * missed / codes.size:.1f}%) have "
                  f"{len(colours)} colour(s) that are not in the palette (most common: {shown}); they are read "
                  f"as the ignore id {ignore_index}. If a colour is a class, add it to data.options.palette; a "
                  f"lossy format (JPEG, lossy WebP) blurs colours: save masks as PNG (reported for the first such "
                  f"file only)", UserWarning, stacklevel=3)
