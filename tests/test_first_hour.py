"""A new user's first hour (issue 18): predict at a sane size, one-line errors for common mistakes, settings
that mean what they say, paths relative to the config file, training runs that are safe to repeat."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import dtop
from dtop.apps.demo import demo_config
from dtop.cli import main
from dtop.config import load_config, save_config
from dtop.engine import train
from dtop.errors import ConfigError
from dtop.flops import dense_flops
from dtop.models import load_model


def _write(cfg, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny dense checkpoint (demo model, crop 128 x 192, no eval_scale) and its config file."""
    root = tmp_path_factory.mktemp("first_hour")
    cfg = demo_config(str(root / "dense"), fast=True)
    cfg.train.iters, cfg.train.device = 2, "cpu"
    ckpt = train(cfg)
    return cfg, _write(cfg, root / "cfg.yaml"), ckpt


# ----------------------------------------------------------------------------- 1. predict at a sane size
def test_predict_runs_a_large_photo_at_a_size_from_the_training_crop(run, tmp_path):
    _, _, ckpt = run
    big = _png(tmp_path / "in" / "big.png", 1200, 1600)
    assert main(["predict", str(ckpt), str(big), "--out", str(tmp_path / "o"), "--p0", "0.5"]) == 0
    row = json.loads((tmp_path / "o" / "predictions.json").read_text())["images"][0]
    model = load_model(str(ckpt))
    full = dense_flops(model, (1200, 1600), final_head_only=True) / 1e9
    # default scale (4 x 192, 128): the short side at 128 px, 128 x 171 -> padded to whole patches
    assert row["dense_gflops"] == pytest.approx(dense_flops(model, (128, 176), final_head_only=True) / 1e9, abs=1e-4)
    assert row["dense_gflops"] < full / 50
    assert Image.open(tmp_path / "o" / "big_seg.png").size == (1600, 1200)  # back at the image's size
    assert (tmp_path / "o" / "big_legend.png").is_file()


@pytest.mark.parametrize("option, size", [(["--size", "64", "96"], (64, 96)), (["--max-side", "96"], (80, 96))])
def test_predict_size_and_max_side(run, tmp_path, option, size):
    _, _, ckpt = run
    img = _png(tmp_path / "a.png", 300, 360)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), *option]) == 0
    row = json.loads((tmp_path / "o" / "predictions.json").read_text())["images"][0]
    model = load_model(str(ckpt))
    assert row["dense_gflops"] == pytest.approx(dense_flops(model, size, final_head_only=True) / 1e9, abs=1e-4)


def test_predict_names_skipped_subfolders_and_searches_them_with_recursive(run, tmp_path, capsys):
    _, _, ckpt = run
    _png(tmp_path / "imgs" / "a.png", 64, 96)
    _png(tmp_path / "imgs" / "nested" / "a.png", 64, 96, seed=1)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--out", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 subfolder(s) (add --recursive to search them)" in err and "nested" in err
    assert "1 file(s) that are not images" in err and "notes.txt" in err
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--out", str(tmp_path / "o2"), "--recursive"]) == 0
    rows = json.loads((tmp_path / "o2" / "predictions.json").read_text())["images"]
    assert [Path(r["file"]).relative_to(tmp_path / "imgs").as_posix() for r in rows] == ["a.png", "nested/a.png"]
    assert [r["stem"] for r in rows] == ["a", "nested_a"]  # the same name in another folder keeps both


def test_a_dense_checkpoint_says_that_no_token_can_exit(run, tmp_path, capsys):
    _, _, ckpt = run
    img = _png(tmp_path / "a.png", 64, 96)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o")]) == 0
    assert "no token can exit early" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. one clear line
def test_common_mistakes_end_in_one_line(run, tmp_path, capsys):
    cfg, cfg_path, ckpt = run
    img = _png(tmp_path / "a.png", 64, 96)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    text_ckpt = tmp_path / "notes.pt"
    text_ckpt.write_text("not weights")
    cases = [
        (["train", str(cfg_path), "--set", "train.iters=abc"], "train.iters must be an integer, got 'abc'"),
        (["train", str(cfg_path), "--set", "train.itres=3"], "did you mean iters"),
        (["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--device", "gpu"], "unknown device 'gpu'"),
        (["predict", str(ckpt), str(img), "--out", str(a_file)], "is an existing file, not a folder"),
        (["eval", str(cfg_path), "--checkpoint", str(ckpt), "--out", str(a_file)], "is an existing file"),
        (["predict", str(img), str(img), "--out", str(tmp_path / "o")], "is a PNG image, not a checkpoint"),
        (["predict", str(text_ckpt), str(img), "--out", str(tmp_path / "o")], "is a text file, not a checkpoint"),
        (["eval", str(cfg_path), "--checkpoint", str(cfg_path)], "a text file (YAML: a config?"),
        (["report", str(tmp_path), "--images", "0"], "--images is the number of rows of Figure 1"),
        (["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--p0", "0"], "in (0, 1]"),
        (["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--p0", "1.5"], "in (0, 1]"),
        (["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--alpha", "2"], "--alpha is the overlay"),
        (["train", str(cfg_path), "--set", "train.p0=0"], "train.p0 is a confidence threshold in (0, 1]"),
        (["eval", str(cfg_path), "--checkpoint", str(ckpt), "--p0", "1.2"], "in (0, 1]"),  # before any variant runs
        (["calibrate", str(cfg_path), "--checkpoint", str(ckpt), "--target-reduction", "0.2", "--out", str(img)],
         "calibrate writes a YAML config"),
        (["export", str(ckpt), "--out", str(tmp_path)], "is a folder; name the file"),
        (["train", str(cfg_path), "--set", f"out_dir={a_file}"], "is an existing file, not a folder"),
        (["report", str(tmp_path / "nowhere")], "no such folder"),
        (["export", str(ckpt), "--out", str(a_file)], "--format onnx writes a .onnx file"),
        (["calibrate", str(cfg_path), "--checkpoint", str(ckpt), "--target-reduction", "0.2", "--out", str(cfg_path)],
         "is not a config dtop calibrate wrote"),
        (["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "gpu"], "unknown device 'gpu'"),
        (["train", str(cfg_path), "--device", "gpu", "--set", f"out_dir={tmp_path / 'new'}"], "unknown device 'gpu'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "", argv  # refused before any work was done or printed
        lines = [x for x in err.splitlines() if x.strip() and ": warning: " not in x]
        assert len(lines) == 1 and "Traceback" not in err and message in lines[0], (argv, err)
    assert Image.open(img).size == (96, 64)  # calibrate left the image alone
    assert a_file.read_text() == "x" and yaml.safe_load(cfg_path.read_text())["data"]["name"] == "synthetic"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_a_gpu(run, tmp_path, capsys):
    _, _, ckpt = run
    img = _png(tmp_path / "a.png", 64, 96)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in _one_line(capsys)


CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_class_count_mismatch_in_eval_names_both_counts(run, tmp_path, capsys):
    _, _, ckpt = run  # 8 classes; CamVid has 11
    config = Path(__file__).resolve().parents[1] / "configs" / "camvid_vit_t16.yaml"
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    note, line = err.strip().splitlines()  # the note that the config's model is not the checkpoint's, the error
    assert "differs from the checkpoint's" in note and "Traceback" not in err
    assert "the model predicts 8 classes but the dataset" in line and "has 11" in line and "data.name" in line


# ----------------------------------------------------------------------------- 3. settings that mean what they say
def test_p0_is_checked_wherever_it_enters():
    for bad in (0, -0.1, 1.5, "0.9", True):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            dtop.create_model("segvit_vit_t16", num_classes=3, p0=bad)
    model = dtop.create_model("segvit_vit_t16", num_classes=3)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        model.set_p0(0.0)
    model.set_p0(1.0)  # 1: no token exits
    with pytest.raises(ConfigError, match=r"eval.p0 is a confidence threshold"):
        load_config(None, ["eval.p0=[0.9, 2]"])


def test_warmup_longer_than_training_warns_in_one_line(capsys):
    with pytest.warns(UserWarning, match="warmup_iters \\(500\\) is larger than train.iters \\(100\\)"):
        load_config(None, ["train.iters=100", "train.warmup_iters=500"])
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dtop", "config", "--set", "train.iters=100", "--set",
                           "train.warmup_iters=500"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    err = done.stderr.strip().splitlines()
    assert err == ["dtop config: warning: train.warmup_iters (500) is larger than train.iters (100): the learning "
                   "rate never reaches train.lr"]


def test_eval_says_when_no_token_exited(run, tmp_path, capsys):
    _, cfg_path, ckpt = run  # dense-trained: its untrained exit heads are not confident at p0 0.99
    assert main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--p0", "0.99", "--no-dense",
                 "--out", str(tmp_path / "e")]) == 0
    assert "dtop_p0_0.99: no token exited before the final stage" in capsys.readouterr().err


def test_eval_uses_the_checkpoints_model_and_says_so(run, tmp_path, capsys):
    cfg, _, ckpt = run
    other = demo_config(str(tmp_path / "x"), fast=True)
    other.model.overrides = {**other.model.overrides, "topk": 2}
    path = _write(other, tmp_path / "other.yaml")
    assert main(["eval", str(path), "--checkpoint", str(ckpt), "--p0", "0.5", "--no-dense",
                 "--out", str(tmp_path / "e")]) == 0
    assert "differs from the checkpoint's" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "e" / "dtop_p0_0.5" / "metrics.json").read_text())
    assert metrics["config"]["model"] == cfg.to_dict()["model"]  # what ran, not what the file said
    assert metrics["model_config"]["topk"] == 5 and metrics["model_config"]["p0"] == 0.5


# ----------------------------------------------------------------------------- 4. paths
def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.yaml").write_text("data:\n  root: ../data/mine\ntrain:\n  init_checkpoint: w/dense.pt\n")
    monkeypatch.chdir(tmp_path / "cfgs")  # anywhere else: the result is the same
    for cwd in (tmp_path / "cfgs", Path("/")):
        monkeypatch.chdir(cwd)
        cfg = load_config(tmp_path / "cfgs" / "c.yaml")
        assert cfg.data.root == str(tmp_path / "data" / "mine")
        assert cfg.train.init_checkpoint == str(tmp_path / "cfgs" / "w" / "dense.pt")
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "cfgs" / "c.yaml", ["data.root=here"]).data.root == str(tmp_path / "here")
    assert load_config(None, ["data.root=/abs/path"]).data.root == "/abs/path"
    # a saved config holds its paths relative to itself, so it works from any folder too
    save_config(cfg, tmp_path / "runs" / "x" / "config.yaml") if (tmp_path / "runs" / "x").mkdir(parents=True) is None else None
    text = (tmp_path / "runs" / "x" / "config.yaml").read_text()
    assert "root: ../../data/mine" in text
    monkeypatch.chdir("/")
    assert load_config(tmp_path / "runs" / "x" / "config.yaml").data.root == str(tmp_path / "data" / "mine")


def test_report_finds_the_checkpoint_from_another_folder(run, tmp_path, monkeypatch):
    cfg, cfg_path, ckpt = run
    monkeypatch.chdir(ckpt.parent)
    assert main(["eval", str(cfg_path), "--checkpoint", "last.pt", "--p0", "0.5", "--out", str(tmp_path / "e")]) == 0
    monkeypatch.chdir(tmp_path)  # "last.pt" means nothing here: the report uses the path relative to the results
    assert main(["report", str(tmp_path / "e"), "--images", "1"]) == 0
    assert (tmp_path / "e" / "report" / "report.html").is_file()


# ----------------------------------------------------------------------------- 5. training runs safe to repeat
def test_training_into_a_used_out_dir_refuses_and_resume_logs_each_iteration_once(tmp_path, capsys):
    cfg = demo_config(str(tmp_path / "r"), fast=True)
    cfg.train.iters, cfg.train.device, cfg.train.log_interval, cfg.train.warmup_iters = 2, "cpu", 1, 1
    path = _write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    line = _one_line(capsys)
    assert "already holds a run (a checkpoint of iteration 2)" in line and "--resume" in line and "--overwrite" in line
    # a longer run stopped after logging iteration 3 but before its checkpoint: the resume redoes iteration 3
    log = tmp_path / "r" / "train_log.jsonl"
    log.write_text(log.read_text() + '{"iter": 3, "loss": 1.0}\n')
    assert main(["train", str(path), "--resume", "--set", "train.iters=4"]) == 0
    assert "resuming from iteration 2 of 4" in capsys.readouterr().out
    assert [json.loads(x)["iter"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match=r"--resume with changed train settings \(lr 0.0008 -> 0.5\)"):
        assert main(["train", str(path), "--resume", "--set", "train.iters=5", "--set", "train.lr=0.5"]) == 0
    assert main(["train", str(path), "--overwrite"]) == 0
    assert [json.loads(x)["iter"] for x in log.read_text().splitlines()] == [1, 2]
