"""The supplement's figures as PNGs (matplotlib, Agg; no pyplot state, so safe in scripts and tests).

- :func:`exit_map_figure`: one image's exit-stage map, discrete colours with a legend (``dtop predict``);
- :func:`figure1`: per image, image / ground truth / dense / DToP / exit stages, with the image's GFLOPs
  reduction and category-agnostic pixel accuracy (supplement Figure 1);
- :func:`figure2`: per-category IoU, dense vs DToP (supplement Figure 2);
- :func:`sweep_plot`: mIoU against GFLOPs for a p0 sweep, with the other methods' points.

Sizes are fixed by the inputs (no tight bounding box), so a figure's pixel size is predictable:
``figsize * DPI``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from .colors import colorize, colorize_stages, overlay, stage_colours

DPI = 100
CELL = 2.4  # inches per image panel (width)


def shrink_png(path: Path, max_width: int) -> None:
    """Scale a PNG down to ``max_width`` pixels wide (aspect kept) with a 256-colour palette: gallery-sized."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _stage_legend(names: Sequence[str], fractions: Optional[Sequence[float]] = None) -> list[Patch]:
    colours = stage_colours(len(names))
    return [Patch(facecolor=np.array(c) / 255, edgecolor="none",
                  label=n if fractions is None else f"{n}: {100 * f:.0f}%")
            for n, c, f in zip(names, colours, fractions if fractions is not None else [0] * len(names))]


def exit_map_figure(exit_stage: np.ndarray, stage_names: Sequence[str], path: Path, title: str = "",
                    image: Optional[np.ndarray] = None) -> Path:
    """The exit stage of every pixel (H, W), over the image (H, W, 3) when given, with a legend of the
    stages and their share of the image."""
    H, W = exit_stage.shape
    S = len(stage_names)
    fractions = [float((exit_stage == s).mean()) for s in range(S)]
    colours = colorize_stages(exit_stage, S)
    if image is not None:
        colours = overlay(image, colours, 0.65)
    width, top, bottom = 6.0, 0.35, 0.75  # inches: image width, title band, legend band
    height = width * H / W
    total = top + height + bottom
    fig = Figure(figsize=(width, total))
    ax = fig.add_axes((0, bottom / total, 1, height / total))
    ax.imshow(colours, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1 - 0.5 * top / total, title, ha="center", va="center", fontsize=9)
    fig.legend(handles=_stage_legend(stage_names, fractions), loc="upper center", ncol=min(S, 4), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, bottom / total), title="stage at which tokens left",
               title_fontsize=8)
    return _save(fig, path)


@dataclass
class Sample:
    """One row of Figure 1. Arrays at the label's size; accuracies in percent."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) class indices
    dense: np.ndarray  # (H, W)
    dtop: np.ndarray  # (H, W)
    exit_stage: np.ndarray  # (H, W)
    reduction_pct: float
    acc_dense: float
    acc_dtop: float


def figure1(samples: Sequence[Sample], palette, stage_names: Sequence[str], path: Path, dtop_label: str = "DToP",
            ignore_index: int = 255) -> Path:
    """Supplement Figure 1: one row per image, images chosen across the range of savings."""
    if not samples:
        raise ValueError("figure1 needs at least one sample")
    H, W = samples[0].label.shape
    cell_h, band, legend, pad = CELL * H / W, 0.3, 0.5, 0.03  # inches: panel height, title band, legend band
    rows = len(samples)
    width, total = 5 * CELL, rows * (cell_h + band) + legend
    fig = Figure(figsize=(width, total))
    S = len(stage_names)
    for r, s in enumerate(samples):
        panels = [
            (s.image, f"{s.name}"),
            (colorize(s.label, palette, ignore_index), "ground truth"),
            (colorize(s.dense, palette, None), f"dense: acc {s.acc_dense:.1f}%"),
            (colorize(s.dtop, palette, None), f"{dtop_label}: acc {s.acc_dtop:.1f}%"),
            (overlay(s.image, colorize_stages(s.exit_stage, S), 0.65), f"exits: {s.reduction_pct:.1f}% fewer GFLOPs"),
        ]
        bottom = total - (r + 1) * (cell_h + band)
        for c, (img, title) in enumerate(panels):
            ax = fig.add_axes(((c * CELL + pad) / width, bottom / total, (CELL - 2 * pad) / width, cell_h / total))
            ax.imshow(img, interpolation="nearest", aspect="auto")
            ax.set_title(title, fontsize=7, pad=3)
            ax.set_axis_off()
    fig.legend(handles=_stage_legend(stage_names), loc="lower center", ncol=min(S, 6), fontsize=8, frameon=False)
    return _save(fig, path)


def figure2(classes: Sequence[str], iou_dense: Sequence[Optional[float]], iou_dtop: Sequence[Optional[float]],
            path: Path, labels: tuple[str, str] = ("dense", "DToP")) -> Path:
    """Supplement Figure 2: per-category IoU, dense vs DToP (classes absent from the data are left blank)."""
    K = len(classes)
    d = np.array([math.nan if v is None else v for v in iou_dense], dtype=float)
    t = np.array([math.nan if v is None else v for v in iou_dtop], dtype=float)
    bars, bottom, top = 0.26 * K, 0.5, 0.4  # inches
    total = bars + bottom + top
    fig = Figure(figsize=(7.0, total))
    ax = fig.add_axes((0.27, bottom / total, 0.68, bars / total))
    y = np.arange(K)
    ax.barh(y - 0.2, np.nan_to_num(d), height=0.4, color="#8c8c8c", label=labels[0])
    ax.barh(y + 0.2, np.nan_to_num(t), height=0.4, color="#d7301f", label=labels[1])
    ax.set_yticks(y, [str(c) for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return _save(fig, path)


def sweep_plot(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """mIoU against GFLOPs. ``points``: dicts with method (``dense``, ``dtop`` or another name), label,
    gflops, miou and p0 (DToP). DToP points are joined in p0 order and marked with their p0."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_axes((0.12, 0.12, 0.84, 0.8))
    dtop = sorted((p for p in points if p["method"] == "dtop"), key=lambda p: p["p0"])
    if dtop:
        ax.plot([p["gflops"] for p in dtop], [p["miou"] for p in dtop], "o-", color="#d7301f", label="DToP")
        for p in dtop:
            ax.annotate(f"p0 {p['p0']:g}", (p["gflops"], p["miou"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color="#d7301f")
    markers = iter("s^vD<>phX*")
    for p in points:
        if p["method"] == "dtop":
            continue
        dense = p["method"] == "dense"
        ax.plot([p["gflops"]], [p["miou"]], "*" if dense else next(markers, "o"), markersize=11 if dense else 7,
                color="black" if dense else None, label=p["label"], linestyle="none")
    ax.set_xlabel("GFLOPs per image", fontsize=9)
    ax.set_ylabel("mIoU (%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy against compute", fontsize=10)
    return _save(fig, path)
