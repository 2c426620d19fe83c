"""Figures, `dtop predict`, `dtop report` and the HTML report in a real headless browser."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop.cli import main
from dtop.apps.demo import demo_config
from dtop.engine import run_evaluation, train
from dtop.viz import colorize, overlay, stage_colours
from dtop.viz.figures import CELL, DPI
from dtop.apps.report import load_run, spread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint (synthetic scenes, 8 classes, 3 linear stage heads) and its config."""
    root = tmp_path_factory.mktemp("viz")
    cfg = demo_config(str(root / "run"), fast=True)
    cfg.train.iters = 2
    return train(cfg), cfg, root


@pytest.fixture(scope="module")
def evaluated(trained):
    ckpt, cfg, root = trained
    rows = run_evaluation(cfg, str(ckpt), [0.01, 0.5], out_dir=root / "eval", verbose=False)
    assert [r["name"] for r in rows] == ["dense", "dtop_p0_0.01", "dtop_p0_0.5"]
    return root / "eval", cfg


def test_colour_maps():
    pal = [(10, 20, 30), (200, 100, 0)]
    out = colorize(np.array([[0, 1], [255, 7]]), pal)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 0]
    assert out[1].tolist() == [[0, 0, 0], [0, 0, 0]]  # ignored and out-of-palette pixels are black
    blend = overlay(np.full((2, 2, 3), 100, np.uint8), np.full((2, 2, 3), 200, np.uint8), alpha=0.25)
    assert (blend == 125).all()
    with pytest.raises(ValueError, match="differ in size"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2, 3), np.uint8))
    for S in (2, 3, 6, 9):
        c = stage_colours(S)
        assert len(set(c)) == S and c[-1] == (215, 48, 39)  # distinct; the final stage always red


def test_spread_picks_across_the_range():
    values = [0.5, 0.1, 0.9, 0.3, 0.7]
    assert spread(values, 3) == [1, 0, 2]  # lowest, middle, highest
    assert sorted(spread(values, 9)) == [0, 1, 2, 3, 4]


def test_predict_writes_maps_and_goes_on_after_bad_files(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(src / "odd.png")  # not 16-multiples
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).convert("L").save(src / "grey.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    rc = main(["predict", str(ckpt), str(src), str(tmp_path / "missing.png"), "--out", str(out), "--p0", "0.01",
               "--palette", "cityscapes"])
    assert rc == 1  # finished, but some inputs failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "missing.png" in err and "Traceback" not in err
    result = json.loads((out / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in result["images"]] == ["grey.jpg", "odd.png"]
    assert {Path(e["file"]).name for e in result["errors"]} == {"broken.png", "missing.png"}
    for r in result["images"]:
        for kind in ("seg", "overlay"):
            assert Image.open(out / f"{r['stem']}_{kind}.png").size == (r["width"], r["height"])
        assert Image.open(out / f"{r['stem']}_exits.png").size[0] == 6 * DPI
        assert 0 < r["gflops"] < r["dense_gflops"] and r["reduction_pct"] > 0  # p0 0.01: most tokens leave early
        assert abs(sum(r[f"exit_s{s}"] for s in range(3)) - 1) < 1e-3
    seg = np.asarray(Image.open(out / "odd_seg.png"))
    cityscapes = {tuple(c) for c in __import__("dtop.data.meta", fromlist=["x"]).dataset_meta("cityscapes").palette}
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= cityscapes
    assert (out / "predictions.csv").read_text().startswith("file,stem,height,width,gflops")


def _png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_report_figures_have_the_expected_sizes(evaluated):
    run, cfg = evaluated
    assert main(["report", str(run), "--p0", "0.01", "--images", "3"]) == 0
    rep = run / "report"
    H, W = cfg.data.crop_size  # the synthetic validation images are 128 x 192
    rows = 3 * (CELL * H / W + 0.3) + 0.5  # inches: the image rows and the stage legend; then the class legend
    legends = {round((rows + 0.2 + 0.17 * k) * DPI) for k in (1, 2)}  # one or two lines of classes
    w, h = _png_size(rep / "figure1.png")
    assert w == round(5 * CELL * DPI) and h in legends
    assert _png_size(rep / "figure2.png") == (700, round((0.26 * 8 + 0.9) * DPI))  # 8 classes
    assert _png_size(rep / "sweep.png") == (640, 440)
    page = (rep / "report.html").read_text()
    assert page.count("<img ") == 3 and 'src="data:image/png;base64,' in page
    assert "DToP (p0 0.01)" in page and "Per-class IoU" in page
    assert "<th>dtop version</th>" in page and "<th>images</th>" in page and "-0.0%" not in page
    variants, compare = load_run(run)
    assert [v.method for v in variants] == ["dense", "dtop", "dtop"] and not compare
    # gallery-sized copies
    assert main(["report", str(run), "--out", str(run / "small"), "--images", "2", "--max-width", "320"]) == 0
    assert _png_size(run / "small" / "sweep.png") == (320, 220)
    assert _png_size(run / "small" / "figure1.png")[0] == 320


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no evaluation" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium(evaluated):
    playwright = pytest.importorskip("playwright.sync_api")
    run, _ = evaluated
    assert main(["report", str(run), "--out", str(run / "browser")]) == 0
    page_path = run / "browser" / "report.html"
    problems: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url[:80]}"))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({ok: e.complete && e.naturalWidth > 0, w: e.naturalWidth, "
                       "h: e.naturalHeight, alt: e.alt}))")
            title = page.title()
        finally:
            browser.close()
    assert not problems, problems
    assert len(images) == 3 and all(i["ok"] for i in images), images
    assert {(i["w"], i["h"]) for i in images if i["alt"] == "mIoU against GFLOPs"} == {(640, 440)}
    assert title.startswith("dtop report")


def test_eval_figures_writes_the_report(trained, tmp_path):
    import yaml

    ckpt, cfg, _ = trained
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "ev"
    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--p0", "0.01", "--out", str(out), "--figures"]) == 0
    assert {p.name for p in (out / "report").iterdir()} == {"figure1.png", "figure2.png", "sweep.png", "report.html"}
    assert json.loads((out / "dtop_p0_0.01" / "metrics.json").read_text())["checkpoint"] == str(ckpt)
