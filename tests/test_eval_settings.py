"""Evaluation settings that cannot be right are refused, degenerate evaluations are flagged, every JSON
file is strict JSON, and the GFLOPs `dtop flops` / `dtop bench` report are those of what runs."""
from __future__ import annotations

import ast
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dtop
from conftest import tiny_model
from dtop.apps import bench as bench_app
from dtop.apps.bench import Timing, run_bench
from dtop.cli import main
from dtop.config import EvalSection, ExperimentConfig, load_config
from dtop.engine.evaluate import Prediction, _windows, class_table, evaluate, predict, summary_table, write_results
from dtop.errors import ConfigError, InputError
from dtop.flops import preset_gflops
from dtop.jsonio import dumps, write_json
from dtop.models.config import parse_reduction

PACKAGE = Path(__file__).resolve().parents[1] / "dtop"


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (as jq, JavaScript and Go do)."""
    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize("window,stride", [([64, 64], [100, 100]), ([64, 64], [64, 65]), ([48, 32], [49, 16])])
def test_stride_larger_than_window_is_refused_by_the_config(window, stride):
    with pytest.raises(ConfigError, match=r"eval.stride .* exceeds eval.window .*use a stride <= the window"):
        load_config(sets=["eval.mode=slide", f"eval.window={window}", f"eval.stride={stride}"])


@pytest.mark.parametrize("key,value", [("window", "[64]"), ("window", "[0, 64]"), ("stride", "[-4, 8]")])
def test_window_and_stride_must_be_two_positive_integers(key, value):
    with pytest.raises(ConfigError, match=f"eval.{key} must be two positive integers"):
        load_config(sets=["eval.mode=slide", f"eval.{key}={value}"])


def test_whole_mode_ignores_window_settings_and_equal_stride_is_accepted():
    assert load_config(sets=["eval.window=[64, 64]", "eval.stride=[100, 100]"]).eval.mode == "whole"
    cfg = load_config(sets=["eval.mode=slide", "eval.window=[64, 64]", "eval.stride=[64, 64]"])
    assert cfg.eval.stride == [64, 64]


def test_predict_refuses_a_stride_larger_than_the_window():
    """An EvalSection built without the config loader is checked at inference (case slide-gap)."""
    ecfg = EvalSection(mode="slide", window=[64, 64], stride=[100, 100])
    with pytest.raises(ConfigError, match=r"eval.stride \[100, 100\] exceeds eval.window \[64, 64\]"):
        predict(tiny_model(), torch.randn(3, 128, 192), ecfg)


@pytest.mark.parametrize("H,W,window,stride", [(128, 192, (64, 64), (64, 64)), (100, 130, (64, 64), (40, 40)),
                                               (70, 101, (48, 48), (48, 48)), (30, 40, (64, 64), (32, 32)),
                                               (128, 192, (64, 64), (100, 100)), (97, 33, (32, 16), (31, 5))])
def test_windows_cover_every_pixel_last_one_at_the_far_edge(H, W, window, stride):
    boxes = _windows(H, W, window, stride)
    cover = torch.zeros(H, W)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (min(window[0], H), min(window[1], W))
        assert 0 <= y1 and y2 <= H and 0 <= x1 and x2 <= W
        cover[y1:y2, x1:x2] += 1
    assert (cover > 0).all()
    assert max(b[1] for b in boxes) == H and max(b[3] for b in boxes) == W


def test_slide_scores_are_finite_everywhere():
    model = tiny_model(p0=1.0)
    pred = predict(model, torch.randn(3, 70, 101), EvalSection(mode="slide", window=[48, 48], stride=[48, 48]))
    assert pred.scores.shape == (5, 70, 101) and torch.isfinite(pred.scores).all()


# ----------------------------------------------------------------------------- degenerate evaluations
class _Labels(torch.utils.data.Dataset):
    """Images with the given labels; predictions come from the patched ``predict`` below."""

    ignore_index = 255
    classes = ("road", "car", "tree")
    num_classes = 3

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": torch.zeros(3, *self.labels[i].shape), "label": self.labels[i], "name": f"im{i}"}


def _fixed_predictions(monkeypatch, pred_map: torch.Tensor):
    def fake(model, image, ecfg, dense=False):
        scores = torch.nn.functional.one_hot(pred_map, 3).permute(2, 0, 1).float()
        return Prediction(scores, 1.0, torch.tensor([0.0, 0.0, 1.0]), None, 1.0)
    monkeypatch.setattr(sys.modules["dtop.engine.evaluate"], "predict", fake)


def test_all_ignore_labels_warn_and_give_null_metrics(monkeypatch, tmp_path):
    _fixed_predictions(monkeypatch, torch.zeros(4, 6, dtype=torch.long))
    data = _Labels([torch.full((4, 6), 255), torch.full((4, 6), 255)])
    with pytest.warns(UserWarning, match=r"no labelled pixel in 2 image.*label_mode.*reduce_zero_label"):
        metrics, rows = evaluate(tiny_model(num_classes=3), data, EvalSection(), torch.device("cpu"))
    assert metrics["miou"] is None and metrics["macc"] is None and metrics["aacc"] is None
    assert set(metrics["per_class_iou"].values()) == {None}
    write_results(tmp_path, metrics, rows, ExperimentConfig())
    written = strict_json((tmp_path / "metrics.json").read_text())
    assert written["miou"] is None and written["per_class_iou"]["road"] is None
    table = class_table(metrics)
    assert "n/a" in table and "nan" not in table.lower()
    summary = summary_table([{"name": "dense", "p0": None, "miou": None, "gflops": 1.0, "reduction_pct": None,
                              "exit_fractions": [0.0, 1.0]}])
    assert "n/a" in summary and "nan" not in summary.lower()


def test_class_absent_from_labels_and_predictions_has_undefined_iou(monkeypatch):
    pred = torch.tensor([[0, 0, 1, 1]])  # tree never predicted
    _fixed_predictions(monkeypatch, pred)
    data = _Labels([torch.tensor([[0, 0, 0, 255]])])  # car predicted but never labelled, tree absent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labelled pixels: no warning
        metrics, _ = evaluate(tiny_model(num_classes=3), data, EvalSection(), torch.device("cpu"))
    assert metrics["per_class_iou"] == {"road": pytest.approx(66.667), "car": 0.0, "tree": None}
    assert metrics["per_class_acc"] == {"road": pytest.approx(66.667), "car": None, "tree": None}
    assert metrics["miou"] == pytest.approx(33.333)  # mean over road and car; tree left out
    assert "n/a" in class_table(metrics)


def test_eval_cli_on_an_all_ignore_validation_set(tmp_path, capsys):
    """Case allignore-val: `dtop eval` warns that no pixel is labelled, metrics.json and summary.json stay JSON."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for sub in ("images/val", "labels/val"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"images/val/img{i}.png")
        Image.fromarray(np.full((48, 64), 255, np.uint8)).save(root / f"labels/val/img{i}.png")
    m = tiny_model(heads=("linear", "linear"), blocks=(1, 3), num_classes=5)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": m.state_dict(), "model_config": m.cfg.to_dict(), "config": {}}, ckpt)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: folder, root: {root}, options: {{num_classes: 5}}, num_workers: 0}}\n"
                   "train: {device: cpu}\n")
    with pytest.warns(UserWarning, match="no labelled pixel"):
        assert main(["eval", str(cfg), "--checkpoint", str(ckpt), "--p0", "0.9", "--out", str(tmp_path / "out")]) == 0
    assert strict_json((tmp_path / "out" / "dense" / "metrics.json").read_text())["miou"] is None
    assert [r["miou"] for r in strict_json((tmp_path / "out" / "summary.json").read_text())] == [None, None]
    assert "nan" not in capsys.readouterr().out.lower()
    # a report of that evaluation is refused in one line, not a TypeError from float(None)
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 2
    assert "mIoU is undefined" in capsys.readouterr().err


# ----------------------------------------------------------------------------- JSON
def test_write_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "m.json"
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "t": torch.tensor([1.0, math.nan]),
           "n": np.float32("nan"), "k": (1, 2), "ok": True}
    write_json(path, obj)
    assert strict_json(path.read_text()) == {"a": None, "b": [None, None, 1.5], "t": [1.0, None], "n": None,
                                             "k": [1, 2], "ok": True}
    assert strict_json(dumps(obj)) == strict_json(path.read_text())
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert strict_json(path.read_text())["b"] == [None, None, 1.5]  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


def test_no_module_but_jsonio_serialises_json():
    """Every JSON writer goes through dtop.jsonio (strict JSON, atomic files)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "jsonio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps")
                    and isinstance(node.value, ast.Name) and node.value.id == "json"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"use dtop.jsonio.write_json / dumps instead of json.dump(s) at {offenders}"


def test_bench_without_flop_saving_prints_n_a(capsys):
    assert main(["bench", "segvit_vit_t16", "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                 "--warmup", "0", "--repeats", "1", "--layouts", "per_image", "--p0", "1"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "nan" not in out.lower()


# ----------------------------------------------------------------------------- figures of what runs
@pytest.mark.parametrize("reduction", [None, "conv", "avgpool", "nearest", "shrunk", "expedite"])
def test_flops_refuses_a_size_that_is_not_whole_patches(reduction, capsys):
    argv = ["flops", "segvit_vit_t16", "--size", "500", "500", "--json"]
    assert main(argv + (["--reduction", reduction] if reduction else [])) == 2
    err = capsys.readouterr().err
    assert "not a positive multiple of the patch size 16" in err and "512 x 512" in err


@pytest.mark.parametrize("reduction", [None, "conv", "shrunk", "expedite"])
def test_flops_of_the_padded_size_is_what_predict_counts(reduction):
    """A 100 x 90 image runs padded to 112 x 96: `dtop flops --size 112 96 --final-head-only` counts that forward."""
    spec = parse_reduction(reduction)
    torch.manual_seed(0)
    model = dtop.create_model("segvit_vit_t16", num_classes=7, reduction=spec).eval()
    p = predict(model, torch.randn(3, 100, 90), EvalSection(mode="whole"), dense=reduction is None)
    assert p.gflops == pytest.approx(preset_gflops("segvit_vit_t16", (112, 96), 7, True, reduction=spec), rel=1e-9)


def test_bench_refuses_a_size_the_model_refuses():
    with pytest.raises(InputError, match="not a positive multiple of the patch size 16.*use e.g. 64 x 64"):
        run_bench(tiny_model(), torch.randn(2, 3, 50, 50), 2, ["per_image"], torch.device("cpu"), warmup=0, repeats=1)


def test_bench_reports_the_batch_that_ran(monkeypatch):
    """Two images but --batch 4: the mixed batch holds 2, and throughput is 2 images per timed call."""
    monkeypatch.setattr(bench_app, "alternate", lambda d, p, *a: Timing([[1.0]] * len(d), [[0.5]] * len(p)))
    r = run_bench(tiny_model(), torch.randn(2, 3, 32, 48), 4, ["per_image"], torch.device("cpu"),
                  exit_fractions=[0.2, 0.6])
    assert r["batch"] == 2 and r["size"] == [32, 48] and len(r["exit_fractions"]) == 2
    mixed = r["layouts"]["per_image"]
    assert mixed["dense_images_per_s_mixed"] == 2.0 and mixed["dtop_images_per_s_mixed"] == 4.0


# ------------------------------------------------------------------------------- held-back inputs of kind 6
def test_image_smaller_than_the_window_is_one_window_equal_to_whole_mode():
    model = tiny_model(p0=0.9)
    image = torch.randn(3, 20, 45)  # smaller than the window on both sides, not whole patches
    whole = predict(model, image, EvalSection(mode="whole"))
    slide = predict(model, image, EvalSection(mode="slide", window=[64, 64], stride=[37, 29]))
    assert _windows(20, 45, [64, 64], [37, 29]) == [(0, 20, 0, 45)]
    torch.testing.assert_close(slide.scores, whole.scores)
    assert slide.gflops == pytest.approx(whole.gflops)
    tall = predict(model, torch.randn(3, 70, 30), EvalSection(mode="slide", window=[48, 48], stride=[37, 29]))
    assert torch.isfinite(tall.scores).all() and tall.scores.shape[-2:] == (70, 30)


def test_some_images_without_a_labelled_pixel_count_nothing_and_do_not_warn(monkeypatch, tmp_path):
    _fixed_predictions(monkeypatch, torch.zeros(2, 3, dtype=torch.long))
    data = _Labels([torch.tensor([[0, 0, 1], [1, 1, 255]]), torch.full((2, 3), 255)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics, rows = evaluate(tiny_model(num_classes=3), data, EvalSection(), torch.device("cpu"))
    assert metrics["aacc"] == pytest.approx(40.0) and metrics["per_class_iou"]["road"] == pytest.approx(40.0)
    assert metrics["per_class_iou"]["tree"] is None and metrics["num_images"] == 2
    assert rows[0]["pixel_acc"] == pytest.approx(0.4) and math.isnan(rows[1]["pixel_acc"])
    write_results(tmp_path, metrics, rows, ExperimentConfig())
    assert strict_json((tmp_path / "metrics.json").read_text())["miou"] == pytest.approx(20.0)


def test_dataset_of_other_classes_or_no_images_is_refused_in_one_line(monkeypatch):
    _fixed_predictions(monkeypatch, torch.zeros(2, 3, dtype=torch.long))
    data = _Labels([torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ConfigError, match=r"model predicts 5 classes but the dataset \(_Labels\) has 3.*data.options"):
        evaluate(tiny_model(num_classes=5), data, EvalSection(), torch.device("cpu"))
    for limit in (0, -1):
        with pytest.raises(ConfigError, match=rf"eval.max_images must be a positive number.*got {limit}"):
            evaluate(tiny_model(num_classes=3), data, EvalSection(max_images=limit), torch.device("cpu"))
    with pytest.raises(ConfigError, match="holds no image"):
        evaluate(tiny_model(num_classes=3), _Labels([]), EvalSection(), torch.device("cpu"))
