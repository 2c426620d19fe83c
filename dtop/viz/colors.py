"""Colour maps for segmentations and exit-stage maps (numpy in, uint8 RGB out)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# Exit stages: early stages in cool-to-warm colours, the final stage (tokens that ran every block) red.
EARLY_STAGE_COLOURS: list[tuple[int, int, int]] = [
    (49, 130, 189), (116, 196, 118), (253, 174, 97), (128, 100, 162), (140, 86, 75)]
FINAL_STAGE_COLOUR = (215, 48, 39)
IGNORE_COLOUR = (0, 0, 0)


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: Optional[int] = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ``ignore_index`` (and anything outside the palette) black."""
    K = len(palette)
    lut = np.asarray([*palette, IGNORE_COLOUR], dtype=np.uint8)  # row K: ignored or unknown
    idx = np.asarray(label).astype(np.int64)
    blank = (idx < 0) | (idx >= K) | (idx == ignore_index if ignore_index is not None else False)
    return lut[np.where(blank, K, idx)]


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour segmentation over an RGB image of the same size: (H, W, 3) uint8."""
    if image.shape != colour.shape:
        raise ValueError(f"overlay: image {image.shape} and segmentation {colour.shape} differ in size")
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round().astype(np.uint8)


def stage_colours(num_stages: int) -> list[tuple[int, int, int]]:
    """One colour per exit stage; the final stage always red."""
    if num_stages - 1 <= len(EARLY_STAGE_COLOURS):
        return EARLY_STAGE_COLOURS[: num_stages - 1] + [FINAL_STAGE_COLOUR]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [tuple(int(255 * c) for c in cmap(i / (num_stages - 2))[:3]) for i in range(num_stages - 1)] + \
        [FINAL_STAGE_COLOUR]


def colorize_stages(exit_stage: np.ndarray, num_stages: int) -> np.ndarray:
    """(H, W) exit-stage indices -> (H, W, 3) uint8 in :func:`stage_colours`."""
    return colorize(exit_stage, stage_colours(num_stages), ignore_index=None)
