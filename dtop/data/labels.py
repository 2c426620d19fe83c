"""Label files: class ids from single-channel PNGs, or colour masks mapped through a palette."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError
from .meta import IGNORE_INDEX


def read_label_ids(path: Path) -> np.ndarray:
    """int64 (H, W) ids from a single-channel (or palette-indexed, or grey RGB) PNG."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read label {path}: {e}") from e
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        else:
            raise InputError(f"label {path} is a colour image ({arr.shape[2]} channels); class-id labels must be "
                             "single-channel PNGs (for colour masks use a folder dataset with label_mode='rgb')")
    return arr.astype(np.int64)


def read_label_rgb(path: Path, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 (H, W) ids from an RGB colour mask: colour ``palette[k]`` -> k, any other colour -> 255."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB")).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read label {path}: {e}") from e
    codes = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    pal = np.asarray(palette, np.int64).reshape(-1, 3)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_codes, kind="stable")
    sorted_codes = pal_codes[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    return np.where(sorted_codes[pos] == codes, order[pos], IGNORE_INDEX).astype(np.int64)
