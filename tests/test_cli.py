"""The dtop command line, run as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtop.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_flops_json(capsys):
    assert main(["flops", "segmenter_vit_b16", "--size", "512", "512", "--num-classes", "150",
                 "--final-head-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["gflops"] - 129.6) / 129.6 < 0.005
    assert main(["flops", "segvit_vit_b16", "--size", "512", "512", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gflops"] - 109.9) / 109.9 < 0.005


def test_unknown_preset_is_a_one_line_error(capsys):
    assert main(["flops", "vit_huge_dtop"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'vit_huge_dtop'" in err and "Traceback" not in err


def test_console_script_demo_prints_paper_table():
    proc = subprocess.run([sys.executable, "-m", "dtop", "paper-table", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 7 and all(abs(r["diff_pct"]) < 0.5 for r in rows)


@pytest.mark.parametrize("argv", [["models"]])
def test_models_lists_presets(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("segmenter_vit_s16", "segmenter_vit_b16", "segmenter_vit_l16", "segvit_vit_b16", "segvit_vit_l16",
                 "segvit_vit_t16", "segmenter_vit_t16"):
        assert name in out


def _folder_dataset(root, corrupt=False, bad_label=False):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(root / "images" / split / f"im{i}.png")
            label = np.full((64, 64), 1, np.uint8)
            if bad_label and i == 1:
                label[:4, :4] = 9
            Image.fromarray(label).save(root / "labels" / split / f"im{i}.png")
    if corrupt:
        (root / "images" / "train" / "im2.png").write_bytes(b"\x89PNG broken")


@pytest.mark.parametrize("problem,match", [
    ("corrupt", "im2.png"),
    ("bad_label", "9"),
    ("missing", "not found|does not exist|missing"),
    ("bad_key", "unknown config key 'train.lr_mult'"),
])
def test_train_errors_are_clear_and_leave_no_checkpoint(tmp_path, capsys, problem, match):
    data = tmp_path / "data"
    if problem != "missing":
        _folder_dataset(data, corrupt=problem == "corrupt", bad_label=problem == "bad_label")
    out = tmp_path / "run"
    sets = [f"data.root={data}", "data.name=folder", "data.options={num_classes: 3}", "data.crop_size=[32,32]",
            "data.num_workers=1", "train.iters=3", "train.batch_size=3", f"out_dir={out}",
            "model.overrides={backbone_kwargs: {depth: 2, embed_dim: 32, num_heads: 2}, "
            "stages: [{block: 0, head: linear}, {block: 1, head: linear}]}"]
    if problem == "bad_key":
        sets.append("train.lr_mult=3")
    argv = ["train", str(REPO / "configs" / "folder_example.yaml")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert __import__("re").search(match, err), err
    assert not (out / "last.pt").exists()
