"""Losses, metrics, configs, training (resume, DDP on gloo) and evaluation outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import images, tiny_model
from dtop.checkpoint import load_checkpoint
from dtop.config import load_config
from dtop.apps.demo import demo_config
from dtop.engine import intersection_union, segmentation_loss, train
from dtop.engine.evaluate import _windows, predict, update_histogram
from dtop.engine.losses import atm_loss, pixel_ce_loss, sigmoid_focal
from dtop.engine.train import lr_factor
from dtop.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- losses
def _labels(B=2, H=64, W=96, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, K, (B, H // 16, W // 16), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    lab[:, :8] = 255
    return lab


@pytest.mark.parametrize("heads", [("atm", "atm", "atm"), ("linear", "linear", "linear"), ("atm", "linear", "mask")])
def test_loss_has_one_term_per_stage_and_decreases(heads):
    model = tiny_model(heads, cls_mode="segmenter" if "mask" in heads else "segvit").train()
    x, y = images(2), _labels()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss, parts = segmentation_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert {k.split(".")[0] for k in parts} == {"s0", "s1", "s2"}
    assert float(loss.detach()) < 0.7 * first


def test_atm_loss_parts_match_definitions():
    K = 3
    logits = torch.randn(1, K, 2, 2)
    presence = torch.randn(1, K, 2)
    label = torch.tensor([[0, 0], [1, 255]]).repeat_interleave(16, 0).repeat_interleave(16, 1)[None]
    from dtop.models.segmentor import StageOutput

    st = StageOutput(canvas=logits, presence=presence, logits=logits, valid=torch.ones(1, 2, 2, dtype=torch.bool))
    parts = atm_loss(st, label)
    # presence: classes 0 and 1 present (target 0, weight 1), class 2 absent (target 1, weight 0.1)
    ce = torch.nn.functional.cross_entropy(presence[0], torch.tensor([0, 0, 1]), reduction="none")
    torch.testing.assert_close(parts["presence"], (ce[0] + ce[1] + 0.1 * ce[2]) / 2.1)
    up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)[0]
    valid = (label[0] != 255).float()
    focal = [(sigmoid_focal(up[c], (label[0] == c).float()) * valid).sum() / valid.sum() for c in (0, 1)]
    torch.testing.assert_close(parts["focal"], 20 * torch.stack(focal).mean())
    # invalid tokens are left out of pixel CE
    st2 = StageOutput(canvas=logits, presence=None, logits=logits, valid=torch.tensor([[[True, False], [False, False]]]))
    ce2 = pixel_ce_loss(st2, label)["ce"]
    expected = torch.nn.functional.cross_entropy(up[:, :16, :16][None], label[:, :16, :16])
    torch.testing.assert_close(ce2, expected)


# ----------------------------------------------------------------------------- metrics
def test_miou_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    K = 6
    hist = torch.zeros(K, K, dtype=torch.long)
    metric = tm.MulticlassJaccardIndex(num_classes=K, average=None, ignore_index=255)
    for _ in range(4):
        label = torch.randint(0, K - 1, (40, 50), generator=g)  # class K-1 never labelled
        label[torch.rand(40, 50, generator=g) < 0.1] = 255
        pred = torch.where(torch.rand(40, 50, generator=g) < 0.6, label.clamp(max=K - 1),
                           torch.randint(0, K, (40, 50), generator=g))
        update_histogram(hist, pred, label)
        metric.update(pred[None], label[None])
    ours = intersection_union(hist)
    ref = metric.compute()
    assert ours["iou"][K - 1] == 0  # predicted but never labelled: IoU 0, counted in the mean (as mmseg)
    torch.testing.assert_close(ours["iou"].float(), ref.float())
    assert abs(ours["miou"] - float(ref.mean())) < 1e-6
    # a class neither labelled nor predicted is NaN and left out of the mean
    hist2 = torch.nn.functional.pad(hist, (0, 1, 0, 1))
    assert torch.isnan(intersection_union(hist2)["iou"][K]) and intersection_union(hist2)["miou"] == ours["miou"]


def test_sliding_windows_cover_and_average():
    boxes = _windows(100, 130, (64, 64), (40, 40))
    cover = torch.zeros(100, 130)
    for y1, y2, x1, x2 in boxes:
        assert y2 - y1 == 64 and x2 - x1 == 64
        cover[y1:y2, x1:x2] += 1
    assert (cover > 0).all()
    model = tiny_model(p0=1.0)
    cfg = load_config(sets=["eval.mode=slide", "eval.window=[48,48]", "eval.stride=[32,32]"])
    img = images(1, 80, 100)[0]
    pred = predict(model, img, cfg.eval, dense=True)
    assert pred.scores.shape == (5, 80, 100)
    # windows overlap: the average equals the mean of the per-window dense outputs at a shared pixel
    with torch.no_grad():
        outs = [model.forward_dense(torch.nn.functional.pad(img[:, y1:y2, x1:x2][None], (0, 0, 0, 0)))[0]
                for y1, y2, x1, x2 in _windows(80, 100, (48, 48), (32, 32))]
    boxes = _windows(80, 100, (48, 48), (32, 32))
    covering = [o[:, 40 - y1, 40 - x1] for o, (y1, y2, x1, x2) in zip(outs, boxes) if y1 <= 40 < y2 and x1 <= 40 < x2]
    torch.testing.assert_close(pred.scores[:, 40, 40], torch.stack(covering).mean(0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- configs
def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.itters'"):
        load_config(sets=["train.itters=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iters: 3\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.lerning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="needs train.init_checkpoint"):
        load_config(sets=["train.scheme=finetune"])
    cfg = load_config(sets=["train.iters=7", "model.overrides.topk=3", "eval.p0=[0.8, 0.9]"])
    assert cfg.train.iters == 7 and cfg.model.overrides == {"topk": 3} and cfg.eval.p0 == [0.8, 0.9]


def test_lr_schedule_warmup_then_poly():
    assert lr_factor(0, 100, 10, 0.9) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 10, 0.9) == pytest.approx(0.5, rel=1e-3)
    assert lr_factor(10, 100, 10, 0.9) == 1.0
    assert lr_factor(55, 100, 10, 0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, 10, 0.9) == 0.0


# ----------------------------------------------------------------------------- training
def _tiny_train_cfg(out_dir, iters=4, **sets):
    cfg = demo_config(str(out_dir), fast=True)
    cfg.train.iters = iters
    cfg.train.ckpt_interval = 2
    for k, v in sets.items():
        setattr(cfg.train, k, v)
    return cfg


def test_resume_continues_to_the_same_iteration_and_weights(tmp_path):
    full = train(_tiny_train_cfg(tmp_path / "full", iters=4))
    part_cfg = _tiny_train_cfg(tmp_path / "part", iters=4)
    part_cfg.train.iters = 2  # "killed" after 2 iterations, with a checkpoint at 2
    train(part_cfg)
    resumed = train(_tiny_train_cfg(tmp_path / "part", iters=4), resume=True)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert a["iter"] == b["iter"] == 4
    assert b["scheduler"]["last_epoch"] == 4
    assert (tmp_path / "part" / "config.yaml").is_file()
    assert not list((tmp_path / "part").glob(".*tmp*"))
    lines = (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["iter"] == 4
    # weights_only loading works, and a pickle needing arbitrary code is refused
    torch.load(resumed, weights_only=True)


def test_resume_without_checkpoint_and_finetune_from_dense(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_tiny_train_cfg(tmp_path / "none"), resume=True)
    dense = train(_tiny_train_cfg(tmp_path / "dense", iters=2))
    ft = _tiny_train_cfg(tmp_path / "ft", iters=2, scheme="finetune", init_checkpoint=str(dense), p0=0.01)
    path = train(ft)
    ck = load_checkpoint(path)
    assert ck["config"]["train"]["scheme"] == "finetune" and ck["model_config"]["p0"] == 0.01


def test_torchrun_two_processes_gloo(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg = _tiny_train_cfg(tmp_path / "ddp", iters=2)
    cfg.data.num_workers = 0
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "dtop", "train", str(cfg_path), "--set", "train.device=cpu"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["iter"] == 2


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtop", "demo", "--fast", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["name"] for r in rows] == ["dense", "dtop_p0_0.8", "dtop_p0_0.9", "dtop_p0_0.95"]
    assert all({"name", "p0", "miou", "gflops"} <= set(r) for r in rows)
    metrics = json.loads((tmp_path / "demo" / "eval" / "dtop_p0_0.9" / "metrics.json").read_text())
    assert {"miou", "macc", "aacc", "per_class_iou", "gflops", "exit_fractions", "config", "versions"} <= set(metrics)
    csv_lines = (tmp_path / "demo" / "eval" / "dtop_p0_0.9" / "per_image.csv").read_text().splitlines()
    assert csv_lines[0].startswith("file,gflops,pixel_acc,exit_s0") and len(csv_lines) == 1 + metrics["num_images"]
    assert "| variant | p0 | mIoU | GFLOPs |" in proc.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_build(path):
    from dtop.models import create_model

    cfg = load_config(path)
    with torch.device("meta"):
        model = create_model(cfg.model.preset, num_classes=7, **cfg.model.overrides)
    assert model.num_stages >= 2



# ----------------------------------------------------------------------------- supplement comparisons
def test_compare_finetunes_evaluates_and_tabulates(tmp_path, capsys):
    import yaml

    from dtop.cli import main as cli

    dense = train(_tiny_train_cfg(tmp_path / "dense", iters=2))
    cfg = _tiny_train_cfg(tmp_path / "unused", iters=2)
    cfg.eval.max_images = 3
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "--checkpoint", str(dense), "--out", str(out), "--p0", "0.01",
            "--methods", "dtop", "dense_ft", "avgpool", "shrunk", "expedite", "--reduction", "avgpool,block=2",
            "--reduction", "expedite,block=1,cluster_scale=0.5"]
    assert cli(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["dense", "dtop_p0_0.01", "dense_ft", "avgpool", "shrunk", "expedite"]
    rows = {r["name"]: r for r in result["rows"]}
    # every alternative saves compute; the trained ones come from their own fine-tuned checkpoints
    assert all(rows[n]["gflops"] < rows["dense"]["gflops"] for n in names[1:] if n != "dense_ft")
    assert rows["dense_ft"]["gflops"] == rows["dense"]["gflops"] and rows["dense_ft"]["trained"]
    assert load_checkpoint(out / "train" / "avgpool" / "last.pt")["model_config"]["reduction"]["block"] == 2
    assert load_checkpoint(out / "train" / "dtop" / "last.pt")["config"]["train"]["scheme"] == "finetune"
    assert rows["expedite"]["checkpoint"] == str(dense) and not rows["expedite"]["trained"]
    assert result["reductions"]["expedite"]["cluster_scale"] == 0.5
    # the GFLOPs in the table are the evaluated ones: the reduced checkpoint's own count
    metrics = json.loads((out / "eval" / "shrunk" / "metrics.json").read_text())
    assert metrics["variant"] == "shrunk" and metrics["gflops"] == rows["shrunk"]["gflops"]
    table1, table2 = (out / "table1.md").read_text(), (out / "table2.md").read_text()
    assert "2x2 average pooling" in table1 and "SegViT shrunk" in table1 and "Expedite" not in table1
    assert "Expedite-ViT" in table2 and "DToP (p0 0.01)" in table2 and "average pooling" not in table2
    assert "dense, fine-tuned likewise" in table1 and "dense, fine-tuned likewise" in table2
    # the report of a comparison shows every method
    assert cli(["report", str(out), "--images", "1"]) == 0
    page = (out / "report" / "report.html").read_text()
    assert all(label in page for label in ("2x2 average pooling", "SegViT shrunk", "Expedite-ViT", "fine-tuned likewise"))
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed
    # a rerun finds the fine-tuned checkpoints and does not train again
    stamp = (out / "train" / "shrunk" / "last.pt").stat().st_mtime_ns
    assert cli(argv) == 0
    assert (out / "train" / "shrunk" / "last.pt").stat().st_mtime_ns == stamp
    # dtop eval --reduction: a training-free alternative on the dense checkpoint
    assert cli(["eval", str(cfg_path), "--checkpoint", str(dense), "--reduction", "nearest,block=2",
                "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [r["name"] for r in summary] == ["dense", "nearest"] and summary[1]["reduction_pct"] > 0
