"""Figures a person can read (issue 18, item 6): class legends, absent vs zero IoU, a pictured p0 with exits
and the report's provenance, no "-0.0%", sweep labels that do not overprint, sane sizes for thin images.
No model runs here: the figures take arrays, the report takes a run folder written by hand."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop._version import __version__
from dtop.apps.report import Variant, _class_table, _results_table, build_report, exit_alerts, pick_dtop
from dtop.errors import ConfigError
from dtop.viz import Sample, class_legend, exit_map_figure, figure1, figure2, fixed, percent, present_classes
from dtop.viz.figures import ABSENT, CELL, DPI, figure2_figure, iou_marks, sweep_figure

CLASSES = ["road", "sidewalk", "building", "wall", "traffic light", "sky"]
PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (250, 170, 30), (70, 130, 180)]
STAGES = ["stage 1 (block 3)", "stage 2 (block 7)", "stage 3 (block 11)"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _count(rgb: np.ndarray, colour) -> int:
    return int((rgb.reshape(-1, 3) == np.asarray(colour, np.uint8)).all(1).sum())


def _sample(H: int, W: int, classes=(0, 2, 5)) -> Sample:
    rng = np.random.default_rng(H * 7 + W)
    label = np.asarray(classes, np.uint8)[rng.integers(0, len(classes), (H, W))]
    return Sample("img.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8), label, label.copy(), label.copy(),
                  rng.integers(0, 3, (H, W)), 12.5, 80.0, 79.0)


# 1. class legends ---------------------------------------------------------------------------------------------

def test_class_legend_png_has_a_swatch_of_each_class_colour(tmp_path):
    path = class_legend(CLASSES, PALETTE, tmp_path / "legend.png")
    rgb = _pixels(path)
    assert rgb.shape[1] == 6 * DPI  # 6 inches wide
    rows = -(-len(CLASSES) // 4)  # names this short fit 4 columns
    assert rgb.shape[0] == round((0.45 + 0.25 * rows) * DPI)
    for c in PALETTE:
        assert _count(rgb, c) >= 14 * 20, c  # the swatch's inside, in the class's exact colour

    only = _pixels(class_legend(CLASSES, PALETTE, tmp_path / "some.png", include=[1, 5]))
    assert only.shape[:2] == (round(0.7 * DPI), 6 * DPI)  # one line
    assert _count(only, PALETTE[1]) >= 280 and _count(only, PALETTE[5]) >= 280
    assert _count(only, PALETTE[0]) == 0 and _count(only, PALETTE[4]) == 0  # left out (not grey, unlike text)
    assert _pixels(class_legend(CLASSES, PALETTE, tmp_path / "none.png", include=[])).shape[:2] == (45, 600)


def test_present_classes_ignores_ignored_and_unknown_values():
    a, b = np.array([[0, 255], [3, 3]]), np.array([[5, 9], [0, -1]])
    assert present_classes(a, b, num_classes=6) == [0, 3, 5]


def test_figure1_has_a_legend_of_the_classes_it_shows(tmp_path):
    H, W = 64, 96
    rgb = _pixels(figure1([_sample(H, W), _sample(H, W)], PALETTE, STAGES, tmp_path / "f1.png", classes=CLASSES))
    rows_px = round(2 * (CELL * H / W + 0.3) * DPI)
    key = rgb[rows_px:]  # below the image rows: the class legend, then the stage legend
    assert rgb.shape[0] == round((2 * (CELL * H / W + 0.3) + 0.2 + 0.17 + 0.5) * DPI)  # one line of classes
    for k in (0, 2, 5):  # the classes in the images
        assert _count(key, PALETTE[k]) > 20, CLASSES[k]
    for k in (1, 3, 4):  # not in them: not in the legend
        assert _count(key, PALETTE[k]) == 0, CLASSES[k]
    plain = _pixels(figure1([_sample(H, W)], PALETTE, STAGES, tmp_path / "plain.png"))  # no names: no class legend
    assert plain.shape[0] == round((CELL * H / W + 0.3 + 0.5) * DPI)


# 2. absent vs zero IoU ----------------------------------------------------------------------------------------

def test_figure2_tells_absent_classes_from_zero_ones(tmp_path):
    dense = [None, 0.0, 55.0, 40.0]
    dtop = [float("nan"), 0.0, 50.0, None]
    assert iou_marks(dense) == [ABSENT, "0", "", ""] and iou_marks(dtop) == [ABSENT, "0", "", ABSENT]
    fig = figure2_figure(CLASSES[:4], dense, dtop)
    ax = fig.axes[0]
    marks = sorted((round(float(t.get_position()[1]), 1), t.get_text()) for t in ax.texts)
    assert marks == [(-0.2, ABSENT), (0.2, ABSENT), (0.8, "0"), (1.2, "0"), (3.2, ABSENT)]
    assert all(t.get_position()[0] < 5 for t in ax.texts)  # at the axis, where the bar would start
    ticks = {t.get_text(): (t.get_color(), t.get_fontstyle()) for t in ax.get_yticklabels()}
    assert ticks["road"] == ("#999999", "italic")  # absent for both: greyed
    assert ticks["sidewalk"][1] == "normal" and ticks["wall"][1] == "normal"
    png = _pixels(figure2(CLASSES[:4], dense, dtop, tmp_path / "f2.png"))
    assert png.shape[:2] == (round((0.26 * 4 + 0.9) * DPI), 700)


# 3. a pictured p0 with exits, provenance ----------------------------------------------------------------------

def _metrics(p0, exits, gflops=5.0, ckpt="ckpt/last.pt", iou=None) -> dict:
    return {"miou": 50.0, "macc": 60.0, "gflops": gflops, "exit_fractions": exits, "p0": p0, "num_images": 7,
            "variant": "dense" if p0 is None else "dtop", "checkpoint": ckpt,
            "per_class_iou": iou or {"road": 90.0, "sidewalk": 0.0, "sky": None},
            "config": {"data": {"name": "camvid", "val_split": "val", "root": "/data/camvid"}},
            "run": {"dtop": __version__}}


def _run(tmp_path: Path, variants: list[tuple[str, dict]]) -> Path:
    """A dtop eval output folder: summary.json and each variant's metrics.json."""
    summary = []
    for name, m in variants:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
        summary.append({"name": name, "p0": m["p0"], "miou": m["miou"], "gflops": m["gflops"]})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def _variants(tmp_path: Path, p0_exits: dict) -> list[Variant]:
    out = []
    for p0, exits in p0_exits.items():
        folder = tmp_path / f"dtop_p0_{p0:g}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(_metrics(p0, exits)))
        out.append(Variant(folder.name, "dtop", p0, 50.0, 5.0, folder))
    return out


def test_pick_dtop_prefers_the_nearest_p0_with_exits(tmp_path):
    v = _variants(tmp_path, {0.8: [0.5, 0.2, 0.3], 0.9: [0.0, 0.0, 1.0], 0.95: [0.1, 0.1, 0.8], 0.99: [0, 0, 1]})
    chosen = pick_dtop(v, None)
    assert chosen.p0 == 0.95  # 0.9 has no exits; 0.95 is the nearest that has
    alerts = exit_alerts(v, chosen, None)
    assert len(alerts) == 1 and "DToP p0 0.9 no token left" in alerts[0] and "p0 0.95" in alerts[0]
    asked = pick_dtop(v, 0.9)  # asked for: kept, and the report says which have exits
    assert asked.p0 == 0.9 and "p0 0.95, p0 0.8" in exit_alerts(v, asked, 0.9)[0]
    assert exit_alerts(v, pick_dtop(v, 0.8), 0.8) == []
    with pytest.raises(ConfigError, match="no DToP variant at p0 0.5"):
        pick_dtop(v, 0.5)


def test_pick_dtop_without_any_exits_says_so(tmp_path):
    v = _variants(tmp_path, {0.9: [0.0, 0.0, 1.0], 0.95: [0.0, 0.0, 1.0]})
    chosen = pick_dtop(v, None)
    assert chosen.p0 == 0.9
    assert exit_alerts(v, chosen, None)[0].startswith("No DToP variant of this run has a token that left")


def test_report_page_shows_provenance_alerts_legends_and_no_negative_zero(tmp_path):
    iou = {"road": 90.0, "sidewalk": 0.0, "sky": None}
    run = _run(tmp_path / "run", [
        ("dense", _metrics(None, [0.0, 0.0, 1.0], gflops=10.0, iou=iou)),
        ("dtop_p0_0.9", _metrics(0.9, [0.0, 0.0, 1.0], gflops=10.0004, iou={**iou, "road": 89.999})),  # -0.004%
        ("dtop_p0_0.95", _metrics(0.95, [0.0, 0.0, 1.0], gflops=10.0004, iou=iou))])
    page = build_report(run).read_text()
    for text in ("ckpt/last.pt", "camvid, split val at /data/camvid", "<th>images</th><td>7</td>",
                 f"<th>dtop version</th><td>{__version__}</td>", "No DToP variant of this run has a token",
                 "Figure 1 left out", "&quot;absent&quot;"):
        assert text in page, text
    assert "-0.0%" not in page and "-0.00" not in page and "+0.00" not in page
    assert page.count("<img ") == 2  # Figure 2 and the sweep (Figure 1 needs the checkpoints)


# 4. no "-0.0%" -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-0.0, -0.01, -0.049, 0.0, 0.04, -1e-12])
def test_a_rounded_zero_is_never_negative(value):
    assert percent(value) == "0.0%" and fixed(value / 10, 2) == "0.00" and fixed(value / 10, 2, signed=True) == "0.00"


def test_tables_format_signs_once_rounded(tmp_path):
    assert percent(-0.06) == "-0.1%" and percent(12.345, 1) == "12.3%" and fixed(0.5, 2, signed=True) == "+0.50"
    folder = _run(tmp_path, [("dense", _metrics(None, [0, 0, 1], gflops=10.0)),
                             ("dtop_p0_0.9", _metrics(0.9, [1e-7, 0.0, 1.0], gflops=10.001))])
    dense = Variant("dense", "dense", None, 50.0, 10.0, folder / "dense")
    dtop = Variant("dtop_p0_0.9", "dtop", 0.9, 50.0, 10.001, folder / "dtop_p0_0.9")
    header, rows = _results_table([dense, dtop], dense)
    cells = [c for r in rows for c in r]
    assert rows[1][4] == "0.0%" and rows[1][5] == "0.0% / 0.0% / 100.0%"
    assert not any(c.startswith("-0.0") for c in cells)
    dtop.metrics["per_class_iou"]["road"] = 89.998  # 90.0 - 0.002
    assert [r[3] for r in _class_table(dense, dtop)[1]] == ["0.00", "0.00", "-"]


# 5. sweep labels do not overprint -------------------------------------------------------------------------------

def test_sweep_labels_do_not_overlap_for_close_points():
    points = [{"method": "dense", "label": "dense", "gflops": 10.0, "miou": 60.0, "p0": None}]
    points += [{"method": "dtop", "label": "DToP", "gflops": 6.6 + 0.002 * i, "miou": 59.0 + 0.003 * i, "p0": p0}
               for i, p0 in enumerate([0.8, 0.85, 0.9, 0.93, 0.95, 0.97])]
    fig = sweep_figure(points)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("p0 ")]
    assert sorted(t.get_text() for t in labels) == ["p0 0.8", "p0 0.85", "p0 0.9", "p0 0.93", "p0 0.95", "p0 0.97"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for box in boxes:  # and none covers a point
        for p in points:
            x, y = ax.transData.transform((p["gflops"], p["miou"]))
            assert not box.contains(x, y)


# 6. very thin or tall images --------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [(2000, 20), (20, 2000), (11862, 600)])
def test_thin_or_tall_images_give_figures_of_sane_size(tmp_path, H, W):
    samples = [_sample(H, W)] * 4  # the report's default: 4 rows
    f1 = _pixels(figure1(samples, PALETTE, STAGES, tmp_path / "f1.png", classes=CLASSES))
    ex = _pixels(exit_map_figure(samples[0].exit_stage, STAGES, tmp_path / "ex.png", image=samples[0].image))
    for rgb in (f1, ex):
        assert rgb.shape[0] < 3000 and rgb.shape[1] < 3000 and min(rgb.shape[:2]) >= 200, rgb.shape
    assert f1.shape[1] == round(5 * CELL * DPI) and ex.shape[1] == 6 * DPI
