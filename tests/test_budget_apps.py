"""Budget exits through the commands: train (@Scratch and @Finetune), eval, predict, bench, calibrate,
export (ONNX checked with onnxruntime, torch.export)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dtop.apps.demo import demo_config
from dtop.checkpoint import load_checkpoint
from dtop.cli import main
from dtop.engine import train
from dtop.errors import ConfigError
from dtop.models import load_model


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny dense run, then @Finetune under the budget rule; the config file of the latter."""
    root = tmp_path_factory.mktemp("budget")
    dense = demo_config(str(root / "dense"), fast=True)
    dense.train.iters, dense.train.device = 2, "cpu"
    train(dense)
    ft = demo_config(str(root / "ft"), fast=True)
    ft.train.iters, ft.train.device = 2, "cpu"
    ft.train.scheme, ft.train.init_checkpoint = "finetune", str(root / "dense" / "last.pt")
    ft.train.exit_mode, ft.train.exit_ratio = "budget", [0.5, 0.25]
    cfg_path = _write(ft, root / "ft.yaml")
    assert main(["train", str(cfg_path)]) in (0, None)
    return root, cfg_path, root / "ft" / "last.pt"


def test_training_under_the_budget_rule_records_it_in_the_checkpoint(run):
    _, _, ckpt = run
    model_cfg = load_checkpoint(ckpt)["config"]["model"]
    model = load_model(str(ckpt))
    assert model.exit_mode == "budget" and model.exit_ratio == [0.5, 0.25]
    assert model_cfg is not None


def test_scratch_training_under_the_budget_rule(tmp_path):
    cfg = demo_config(str(tmp_path / "scratch"), fast=True)
    cfg.train.iters, cfg.train.device, cfg.train.scheme = 1, "cpu", "scratch"
    cfg.train.exit_mode, cfg.train.exit_ratio = "budget", 0.3
    assert main(["train", str(_write(cfg, tmp_path / "c.yaml"))]) in (0, None)
    assert load_model(str(tmp_path / "scratch" / "last.pt")).exit_ratio == [0.3, 0.3]


def test_eval_in_budget_mode_exits_the_same_share_of_every_image(run, tmp_path):
    _, cfg_path, ckpt = run
    out = tmp_path / "eval"
    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--exit-ratio", "0.5", "0.25",
                 "--out", str(out)]) in (0, None)
    metrics = json.loads((out / "dtop_budget_0.5_0.25" / "metrics.json").read_text())
    assert metrics["exit_mode"] == "budget" and metrics["exit_ratio"] == [0.5, 0.25] and metrics["p0"] is None
    rows = list(csv.DictReader(open(out / "dtop_budget_0.5_0.25" / "per_image.csv")))
    assert {r["exit_s0"] for r in rows} == {"0.5"} and {r["exit_s1"] for r in rows} == {"0.25"}
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary] == ["dense", "dtop_budget_0.5_0.25"]
    assert summary[1]["reduction_pct"] > 0


def test_contradictory_exit_options_are_refused(run, capsys):
    _, cfg_path, ckpt = run
    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--exit-mode", "threshold",
                 "--exit-ratio", "0.5"]) == 2
    assert "--exit-ratio and --p-min belong to --exit-mode budget" in capsys.readouterr().err
    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--exit-ratio", "0.7", "0.5"]) == 2
    assert "sums to 1.2" in capsys.readouterr().err


def test_calibrate_meets_the_target_and_eval_reports_it(run, tmp_path, capsys):
    _, cfg_path, ckpt = run
    for mode in ("threshold", "budget"):
        out = tmp_path / f"cal_{mode}.yaml"
        assert main(["calibrate", str(cfg_path), "--checkpoint", str(ckpt), "--target-reduction", "0.3",
                     "--exit-mode", mode, "--images", "4", "--out", str(out)]) in (0, None)
        record = json.loads(out.with_suffix(".json").read_text())
        assert abs(record["achieved"] / record["target"] - 1) < 0.05, record
        assert record["target"] == pytest.approx(0.7 * record["dense"], rel=1e-6)
        written = yaml.safe_load(out.read_text())["eval"]
        assert written["exit_mode"] == mode and written["target_gflops"] == pytest.approx(record["target"], abs=1e-4)
        capsys.readouterr()
        assert main(["eval", str(out), "--checkpoint", str(ckpt), "--out", str(tmp_path / f"ev_{mode}"),
                     "--no-dense"]) in (0, None)
        printed = capsys.readouterr().out
        assert "target GFLOPs" in printed and f"{record['target']:.3f}" in printed
        summary = json.loads((tmp_path / f"ev_{mode}" / "summary.json").read_text())
        assert summary[0]["target_gflops"] == pytest.approx(record["target"], abs=1e-4)


def test_calibrate_refuses_a_target_above_dense(run, capsys):
    _, cfg_path, ckpt = run
    assert main(["calibrate", str(cfg_path), "--checkpoint", str(ckpt), "--target-gflops", "1e6",
                 "--images", "2"]) == 2
    assert "must lie between 0 and the dense model" in capsys.readouterr().err


def test_predict_and_bench_take_the_budget_rule(run, tmp_path, capsys):
    _, _, ckpt = run
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 192, 3), dtype=np.uint8)).save(img)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "pred"), "--exit-ratio", "0.4"]) == 0
    result = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert result["exit_mode"] == "budget" and result["exit_ratio"] == [0.4, 0.4]
    assert result["images"][0]["exit_s0"] == pytest.approx(0.4, abs=0.02)
    capsys.readouterr()
    assert main(["bench", "--checkpoint", str(ckpt), "--images", str(tmp_path), "--batch", "1", "--warmup", "0",
                 "--repeats", "1", "--layouts", "padded", "--json"]) in (0, None)
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bench["exit_fractions"][0] == pytest.approx(0.75, abs=0.02)  # the checkpoint's own 0.5 + 0.25


def test_onnx_export_of_the_budget_model_equals_pytorch(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dtop.engine.export import export_onnx, max_difference

    _, _, ckpt = run
    model = load_model(str(ckpt)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", (128, 192), batch=2, metadata={"classes": None})
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(1))
    diff = max_difference(model, path, images)
    assert diff["max_abs_diff"] < 1e-4 and diff["exit_stage_mismatch"] == 0, diff
    dense = export_onnx(model, tmp_path / "d.onnx", (128, 192), dense=True)
    assert max_difference(model, dense, images[:1], dense=True)["max_abs_diff"] < 1e-4
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta == {"classes": None}
    # the command, on a real image, with its default output beside the checkpoint
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(img)
    assert main(["export", str(ckpt), "--check", str(img), "--out", str(tmp_path / "c.onnx")]) in (0, None)
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch: max_abs_diff" in printed and "exit_stage_mismatch 0" in printed
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "c.onnx")).metadata_props}
    assert meta["exit_rule"] == {"exit_mode": "budget", "exit_ratio": [0.5, 0.25]}
    assert meta["input_size"] == [128, 192] and len(meta["mean"]) == 3


def test_threshold_exits_are_refused_naming_budget_mode(run, tmp_path, capsys):
    from dtop.engine.export import export_program

    _, _, ckpt = run
    model = load_model(str(ckpt))
    model.set_p0(0.9)
    with pytest.raises(ConfigError, match="--exit-mode budget"):
        export_program(model, (128, 192))
    assert main(["export", str(ckpt), "--exit-mode", "threshold", "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err
    assert "export DToP in budget mode: --exit-mode budget" in err and "Traceback" not in err
    assert not (tmp_path / "t.onnx").exists()
    model.set_budget([0.5, 0.25], p_min=0.3)
    with pytest.raises(ConfigError, match="p_min 0.3"):
        export_program(model, (128, 192))


def test_torch_export_format_writes_a_program_that_loads(run, tmp_path):
    _, _, ckpt = run
    out = tmp_path / "m.pt2"
    assert main(["export", str(ckpt), "--format", "torch", "--out", str(out), "--size", "64", "96"]) in (0, None)
    program = torch.export.load(str(out))
    model = load_model(str(ckpt)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
    scores, exit_stage = program.module()(x)
    torch.testing.assert_close(scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(exit_stage, ref.exit_stage)
