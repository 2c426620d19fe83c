"""The supplement's figures as PNGs (matplotlib, Agg; no pyplot state, so safe in scripts and tests).

- :func:`exit_map_figure`: one image's exit-stage map, discrete colours with a legend (``dtop predict``);
- :func:`figure1`: per image, image / ground truth / dense / DToP / exit stages, with the image's GFLOPs
  reduction and category-agnostic pixel accuracy (supplement Figure 1);
- :func:`figure2`: per-category IoU, dense vs DToP (supplement Figure 2);
- :func:`sweep_plot`: mIoU against GFLOPs for a p0 sweep, with the other methods' points;
- :func:`class_legend`: a PNG of class colour swatches and names (beside ``dtop predict``'s colour maps).

Sizes are fixed by the inputs (no tight bounding box), so a figure's pixel size is predictable:
``figsize * DPI``. An image panel's height / width is kept within [:data:`MIN_ASPECT`, :data:`MAX_ASPECT`]
(:func:`panel_aspect`), so a very thin or very tall image still gives a figure of sane size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from matplotlib.transforms import Bbox
from PIL import Image

from .colors import colorize, colorize_stages, overlay, stage_colours
from .html import fixed, percent

DPI = 100
CELL = 2.4  # inches per image panel (width)
MIN_ASPECT, MAX_ASPECT = 0.25, 2.0  # the limits of an image panel's height / width
LEGEND_COLUMNS = 6  # class legend columns on Figure 1
MAX_NAME = 24  # characters of a class name in a legend


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


def panel_aspect(height: int, width: int) -> float:
    """The height / width of the panel showing an image of ``height`` x ``width`` pixels: the image's own
    aspect, limited to [MIN_ASPECT, MAX_ASPECT]. Beyond the limits the image keeps its aspect and sits in
    the middle of the panel with blank margins (so a 20 x 2000 image gives no 200-inch figure)."""
    return min(MAX_ASPECT, max(MIN_ASPECT, height / max(1, width)))


def _show(ax, img: np.ndarray) -> None:
    """An (H, W[, 3]) image filling its panel, or, where :func:`panel_aspect` limited the panel, centred in it
    at its own aspect."""
    H, W = img.shape[:2]
    clamped = abs(panel_aspect(H, W) - H / max(1, W)) > 1e-9
    ax.imshow(img, interpolation="nearest", aspect="equal" if clamped else "auto")
    ax.set_axis_off()


def _stage_legend(names: Sequence[str], fractions: Optional[Sequence[float]] = None) -> list[Patch]:
    colours = stage_colours(len(names))
    return [Patch(facecolor=np.array(c) / 255, edgecolor="none",
                  label=n if fractions is None else f"{n}: {percent(100 * f, 0)}")
            for n, c, f in zip(names, colours, fractions if fractions is not None else [0] * len(names))]


def present_classes(*maps: np.ndarray, num_classes: int) -> list[int]:
    """The class indices in [0, ``num_classes``) that occur in any of the (H, W) label maps, ascending
    (ignored and out-of-range values left out): the classes a legend of these maps needs."""
    seen: set[int] = set()
    for m in maps:
        seen |= {int(v) for v in np.unique(np.asarray(m))}
    return sorted(v for v in seen if 0 <= v < num_classes)


def _short(name: str, limit: int = MAX_NAME) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def class_handles(classes: Sequence[str], colours: Sequence[Sequence[int]],
                  include: Optional[Sequence[int]] = None) -> list[Patch]:
    """Legend entries (a swatch of the class's colour and its name) for the classes ``include`` (indices into
    ``classes`` / ``colours``, 0..255 RGB), default all."""
    idx = range(len(classes)) if include is None else include
    return [Patch(facecolor=np.array(colours[i][:3]) / 255, edgecolor="#808080", linewidth=0.5,
                  label=_short(str(classes[i]))) for i in idx]


def class_legend(classes: Sequence[str], colours: Sequence[Sequence[int]], path: Path,
                 include: Optional[Sequence[int]] = None, title: str = "classes", width: float = 6.0) -> Path:
    """A PNG of colour swatches and class names, ``width`` inches (x DPI pixels) wide, one 0.25-inch row per
    line of entries: the key to a colour segmentation. ``include``: the class indices to list (e.g.
    :func:`present_classes` of a prediction), default every class; ``colours``: 0..255 RGB per class. Each
    swatch is 22 x 16 pixels of the class's exact colour inside a grey outline."""
    idx = list(range(len(classes)) if include is None else include)
    names = [_short(str(classes[i])) for i in idx]
    col_w = 0.45 + 0.07 * max([len(n) for n in names] + [4])  # inches: swatch, gap, text at 8 pt
    cols = max(1, min(len(idx), int((width - 0.2) // col_w)))
    rows = math.ceil(len(idx) / cols)
    height = 0.35 + 0.25 * rows + 0.1
    fig = Figure(figsize=(width, height), dpi=DPI)
    inch = fig.dpi_scale_trans
    fig.text(0.1, height - 0.2, title if idx else f"{title}: none", transform=inch, fontsize=9, va="center")
    step = (width - 0.2) / cols
    for k, (i, name) in enumerate(zip(idx, names)):
        x, y = 0.1 + (k % cols) * step, height - 0.35 - 0.25 * (k // cols) - 0.2
        fig.add_artist(Rectangle((x, y), 0.22, 0.16, transform=inch, facecolor=np.array(colours[i][:3]) / 255,
                                 edgecolor="none", antialiased=False))
        fig.add_artist(Rectangle((x, y), 0.22, 0.16, transform=inch, fill=False, edgecolor="#808080",
                                 linewidth=0.6, antialiased=False))
        fig.text(x + 0.3, y + 0.08, name, transform=inch, fontsize=8, va="center")
    return _save(fig, path)


def exit_map_figure(exit_stage: np.ndarray, stage_names: Sequence[str], path: Path, title: str = "",
                    image: Optional[np.ndarray] = None) -> Path:
    """The exit stage of every pixel (H, W), over the image (H, W, 3) when given, with a legend of the
    stages and their share of the image. 6 inches wide; the image band is 6 x :func:`panel_aspect` inches."""
    H, W = exit_stage.shape
    S = len(stage_names)
    fractions = [float((exit_stage == s).mean()) for s in range(S)]
    colours = colorize_stages(exit_stage, S)
    if image is not None:
        colours = overlay(image, colours, 0.65)
    width, top, bottom = 6.0, 0.35, 0.75  # inches: image width, title band, legend band
    height = width * panel_aspect(H, W)
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


def _reduction_title(reduction_pct: float) -> str:
    """``"exits: 31.2% fewer GFLOPs"``, or ``"... more GFLOPs"`` when the heads cost more than the exits save."""
    word = "more" if fixed(reduction_pct) != "0.0" and reduction_pct < 0 else "fewer"
    return f"exits: {percent(abs(reduction_pct))} {word} GFLOPs"


def _figure1_row(fig: Figure, s: Sample, palette, num_stages: int, box: tuple[float, float, float, float],
                 dtop_label: str, ignore_index: int) -> None:
    """One row of Figure 1; ``box``: (bottom, panel height, figure width, figure height) in inches."""
    bottom, cell_h, width, total = box
    pad = 0.03  # inches between panels
    panels = [
        (s.image, f"{s.name}"),
        (colorize(s.label, palette, ignore_index), "ground truth"),
        (colorize(s.dense, palette, None), f"dense: acc {percent(s.acc_dense)}"),
        (colorize(s.dtop, palette, None), f"{dtop_label}: acc {percent(s.acc_dtop)}"),
        (overlay(s.image, colorize_stages(s.exit_stage, num_stages), 0.65), _reduction_title(s.reduction_pct)),
    ]
    for c, (img, title) in enumerate(panels):
        ax = fig.add_axes(((c * CELL + pad) / width, bottom / total, (CELL - 2 * pad) / width, cell_h / total))
        _show(ax, img)
        ax.set_title(title, fontsize=7, pad=3)


def figure1(samples: Sequence[Sample], palette, stage_names: Sequence[str], path: Path, dtop_label: str = "DToP",
            ignore_index: int = 255, classes: Optional[Sequence[str]] = None) -> Path:
    """Supplement Figure 1: one row per image, images chosen across the range of savings. ``palette``: 0..255
    RGB per class; ``classes``: their names, which add a legend of the classes the images show (ground truth
    and predictions). 12 inches wide; each row :func:`panel_aspect` x 2.4 inches + a 0.3-inch title band, then
    the class legend (0.2 + 0.17 inches a line of 6) and the stage legend (0.5 inches)."""
    if not samples:
        raise ValueError("figure1 needs at least one sample")
    H, W = samples[0].label.shape
    shown = [] if classes is None else present_classes(
        *(m for s in samples for m in (s.label, s.dense, s.dtop)), num_classes=min(len(palette), len(classes)))
    cell_h, band, legend = CELL * panel_aspect(H, W), 0.3, 0.5  # inches: panel height, title band, stage legend
    key = 0.2 + 0.17 * math.ceil(len(shown) / LEGEND_COLUMNS) if shown else 0.0  # inches: class legend
    width, total = 5 * CELL, len(samples) * (cell_h + band) + key + legend
    fig = Figure(figsize=(width, total))
    for r, s in enumerate(samples):
        box = (total - (r + 1) * (cell_h + band), cell_h, width, total)
        _figure1_row(fig, s, palette, len(stage_names), box, dtop_label, ignore_index)
    if shown:
        fig.legend(handles=class_handles(classes, palette, shown), loc="upper center", ncol=LEGEND_COLUMNS,
                   fontsize=7, frameon=False, bbox_to_anchor=(0.5, (key + legend) / total), title="classes",
                   title_fontsize=7, handlelength=1.6, columnspacing=1.2, borderaxespad=0.1)
    fig.legend(handles=_stage_legend(stage_names), loc="lower center", ncol=min(len(stage_names), 6), fontsize=8,
               frameon=False)
    return _save(fig, path)


ABSENT = "absent"


def iou_marks(values: Sequence[Optional[float]]) -> list[str]:
    """The note beside each class's IoU bar (IoU in percent): ``"absent"`` where it is undefined (None or NaN:
    the class is in neither the labels nor the predictions), ``"0"`` where it is a real 0 (the class is there
    and never right), else ``""``."""
    out = []
    for v in values:
        undefined = v is None or math.isnan(float(v))
        out.append(ABSENT if undefined else "0" if float(v) == 0 else "")
    return out


def figure2_figure(classes: Sequence[str], iou_dense: Sequence[Optional[float]],
                   iou_dtop: Sequence[Optional[float]], labels: tuple[str, str] = ("dense", "DToP")) -> Figure:
    """The Figure of :func:`figure2`: horizontal IoU bars (percent), two per class; an undefined IoU has no bar
    and the grey italic note "absent", a zero IoU the note "0" (see :func:`iou_marks`); a class absent for
    both has its name in grey italics."""
    K = len(classes)
    bars, bottom, top = 0.26 * K, 0.5, 0.4  # inches
    total = bars + bottom + top
    fig = Figure(figsize=(7.0, total))
    ax = fig.add_axes((0.27, bottom / total, 0.68, bars / total))
    y = np.arange(K)
    for values, dy, colour, label in ((iou_dense, -0.2, "#8c8c8c", labels[0]), (iou_dtop, 0.2, "#d7301f", labels[1])):
        v = np.array([math.nan if x is None else x for x in values], dtype=float)
        ax.barh(y + dy, np.nan_to_num(v), height=0.4, color=colour, label=label)
        for k, mark in enumerate(iou_marks(values)):
            if mark:
                ax.text(0.8, k + dy, mark, va="center", ha="left", fontsize=6,
                        color="#777777" if mark == ABSENT else colour, style="italic" if mark == ABSENT else "normal")
    ax.set_yticks(y, [str(c) for c in classes], fontsize=7)
    gone = [a == b == ABSENT for a, b in zip(iou_marks(iou_dense), iou_marks(iou_dtop))]
    for tick, absent in zip(ax.get_yticklabels(), gone):
        if absent:
            tick.set_color("#999999")
            tick.set_fontstyle("italic")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return fig


def figure2(classes: Sequence[str], iou_dense: Sequence[Optional[float]], iou_dtop: Sequence[Optional[float]],
            path: Path, labels: tuple[str, str] = ("dense", "DToP")) -> Path:
    """Supplement Figure 2: per-category IoU (percent), dense vs DToP; classes in neither the labels nor the
    predictions are marked "absent", IoUs of 0 "0" (:func:`figure2_figure`). 7 inches wide, 0.26 a class."""
    return _save(figure2_figure(classes, iou_dense, iou_dtop, labels), path)


def _label_offsets(rings: int = 4) -> list[tuple[float, float, str, str]]:
    """Candidate (dx, dy, ha, va) placements of a point's label, in points, nearest first: the four corners,
    then the same farther up and down, then left and right."""
    out = []
    for k in range(rings):
        dy = 4 + 11 * k
        out += [(4, dy, "left", "bottom"), (4, -dy, "left", "top"), (-4, dy, "right", "bottom"),
                (-4, -dy, "right", "top")]
    return out + [(10, 0, "left", "center"), (-10, 0, "right", "center")]


def _overlap(a: Bbox, others: Sequence[Bbox]) -> float:
    """The area (pixels^2) of ``a`` that overlaps the boxes ``others``."""
    total = 0.0
    for b in others:
        w, h = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
        total += max(0.0, w) * max(0.0, h)
    return total


def place_labels(ax, labels: Sequence, obstacles: Sequence[Bbox] = ()) -> None:
    """Move each annotation (``textcoords="offset points"``) of ``labels`` in turn to the first candidate of
    :func:`_label_offsets` that overlaps neither the labels placed before it nor ``obstacles`` (display
    boxes, e.g. the markers), else to the candidate that overlaps least: greedy collision avoidance. A label
    moved beyond the nearest four places gets a thin leader line to its point."""
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Bbox] = list(obstacles)
    candidates = _label_offsets()
    for ann in labels:
        best: Optional[tuple[float, tuple]] = None
        for cand in candidates:
            ann.set_position(cand[:2])
            ann.set_ha(cand[2])
            ann.set_va(cand[3])
            cost = _overlap(ann.get_window_extent(renderer).padded(1), placed)
            if best is None or cost < best[0]:
                best = (cost, cand)
            if cost == 0:
                break
        ann.set_position(best[1][:2])
        ann.set_ha(best[1][2])
        ann.set_va(best[1][3])
        placed.append(ann.get_window_extent(renderer))
        if candidates.index(best[1]) >= 4:
            ax.annotate("", ann.xy, xytext=best[1][:2], textcoords="offset points", arrowprops=dict(
                arrowstyle="-", lw=0.5, color=ann.get_color(), shrinkA=0, shrinkB=3))


def _marker_boxes(ax, xy: Sequence[tuple[float, float]], radius: float = 4.0) -> list[Bbox]:
    """Display boxes of ``radius`` pixels around the data points ``xy``."""
    pts = ax.transData.transform(np.asarray(xy, dtype=float).reshape(-1, 2))
    return [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in pts]


def sweep_figure(points: Sequence[dict[str, Any]]) -> Figure:
    """The Figure of :func:`sweep_plot` (6.4 x 4.4 inches); its DToP labels placed by :func:`place_labels`."""
    fig = Figure(figsize=(6.4, 4.4), dpi=DPI)
    FigureCanvasAgg(fig)  # a renderer, to measure the labels
    ax = fig.add_axes((0.12, 0.12, 0.84, 0.8))
    dtop = sorted((p for p in points if p["method"] == "dtop" and p.get("p0") is not None), key=lambda p: p["p0"])
    if dtop:
        ax.plot([p["gflops"] for p in dtop], [p["miou"] for p in dtop], "o-", color="#d7301f", label="DToP")
    markers = iter("s^vD<>phX*")
    for p in points:
        if p in dtop:
            continue
        dense = p["method"] == "dense"
        ax.plot([p["gflops"]], [p["miou"]], "*" if dense else next(markers, "o"), markersize=11 if dense else 7,
                color="black" if dense else None, label=p["label"], linestyle="none")
    ax.margins(0.12)
    for axis in (ax.xaxis, ax.yaxis):  # at most 6 ticks, no offset notation: close values do not crowd
        axis.set_major_locator(MaxNLocator(6))
        axis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.set_xlim(ax.get_xlim())  # fix the limits before measuring
    ax.set_ylim(ax.get_ylim())
    labels = [ax.annotate(f"p0 {p['p0']:g}", (p["gflops"], p["miou"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=7, color="#d7301f") for p in dtop]
    place_labels(ax, labels, _marker_boxes(ax, [(p["gflops"], p["miou"]) for p in points]))
    ax.set_xlabel("GFLOPs per image", fontsize=9)
    ax.set_ylabel("mIoU (%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy against compute", fontsize=10)
    return fig


def sweep_plot(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """mIoU against GFLOPs. ``points``: dicts with method (``dense``, ``dtop`` or another name), label,
    gflops, miou and p0 (DToP). DToP points are joined in p0 order and marked with their p0, the marks
    placed so that they do not overprint each other or the points."""
    return _save(sweep_figure(points), path)
