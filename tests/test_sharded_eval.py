"""Evaluation across processes (torchrun, gloo on CPU) and across interruptions: the same files as one
uninterrupted process, no image counted twice."""
from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtop.apps.demo import demo_config
from dtop.engine import run_evaluation, train
from dtop.engine.shards import ImageResult, PartialResults, combine

ev = importlib.import_module("dtop.engine.evaluate")  # the module (dtop.engine.evaluate is also a function's name)
SAME = ("miou", "macc", "aacc", "per_class_iou", "per_class_acc", "gflops", "exit_fractions", "num_images", "p0")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained model and its config with 7 validation images (an odd number)."""
    root = tmp_path_factory.mktemp("sharded")
    cfg = demo_config(str(root / "dense"), fast=True)
    cfg.train.iters, cfg.train.device = 2, "cpu"
    cfg.data.val_options = {"num_images": 7, "seed": 12345}
    train(cfg)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return cfg, path, root / "dense" / "last.pt"


def _same_results(a: Path, b: Path, variants) -> None:
    for v in variants:
        ma, mb = (json.loads((d / v / "metrics.json").read_text()) for d in (a, b))
        assert {k: ma[k] for k in SAME} == {k: mb[k] for k in SAME}, v
        ra, rb = ((d / v / "per_image.csv").read_text() for d in (a, b))
        assert ra == rb, v
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())


def test_torchrun_two_processes_write_what_one_process_writes(run, tmp_path):
    _, cfg_path, ckpt = run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["eval", str(cfg_path), "--checkpoint", str(ckpt), "--exit-ratio", "0.4"]
    single = subprocess.run([sys.executable, "-m", "dtop", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "dtop", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    _same_results(tmp_path / "one", tmp_path / "two", ["dense", "dtop_budget_0.4"])
    rows = list(csv.DictReader(open(tmp_path / "two" / "dtop_budget_0.4" / "per_image.csv")))
    assert len(rows) == 7 and len({r["file"] for r in rows}) == 7
    assert json.loads((tmp_path / "two" / "dtop_budget_0.4" / "metrics.json").read_text())["exit_fractions"][0] > 0
    assert multi.stdout.count("== dtop_budget_0.4") == 1 and multi.stdout.count("| variant |") == 1  # rank 0 reports
    assert not list((tmp_path / "two").glob("*.partial"))


def test_an_interrupted_evaluation_resumes_with_identical_metrics(run, tmp_path, monkeypatch):
    cfg, _, ckpt = run
    run_evaluation(cfg, str(ckpt), [0.5], out_dir=tmp_path / "whole", verbose=False)
    computed = []
    real = ev._image_result

    def stop_after_three(model, dataset, i, *a, **k):
        if len(computed) == 3 + 7:  # the dense variant's 7 images, then 3 of DToP's
            raise KeyboardInterrupt
        computed.append(i)
        return real(model, dataset, i, *a, **k)

    monkeypatch.setattr(ev, "_image_result", stop_after_three)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt) as info:
        run_evaluation(cfg, str(ckpt), [0.5], out_dir=out, verbose=False)
    assert "3 image(s) of dtop_p0_0.5 kept" in str(info.value) and "the same command resumes" in str(info.value)
    assert (out / "dense" / "metrics.json").is_file() and not (out / "dtop_p0_0.5" / "metrics.json").exists()
    with open(out / "dtop_p0_0.5.partial" / "rank0.jsonl", "a") as f:
        f.write('{"index": 5, "row": {"fi')  # a line cut short by a crash
    computed.clear()
    monkeypatch.setattr(ev, "_image_result", lambda *a, **k: (computed.append(a[2]), real(*a, **k))[1])
    run_evaluation(cfg, str(ckpt), [0.5], out_dir=out, verbose=False)
    assert computed == [3, 4, 5, 6]  # dense reused (finished), DToP resumed at its 4th image
    _same_results(tmp_path / "whole", out, ["dense", "dtop_p0_0.5"])
    assert not (out / "dtop_p0_0.5.partial").exists()


def test_partial_results_of_another_evaluation_are_not_reused(tmp_path):
    folder = tmp_path / "v.partial"
    store = PartialResults(folder, {"checkpoint": "a"})
    store.start(resumed=False)
    store.append(ImageResult(0, {"file": "x"}, [1.0], [[0, 4]]))
    store.close()
    assert list(PartialResults(folder, {"checkpoint": "a"}).load()) == [0]
    with open(folder / "rank0.jsonl", "a") as f:
        f.write('{"index": 1, "ro')  # a crash cut this line short
    again = PartialResults(folder, {"checkpoint": "a"})
    assert list(again.load()) == [0] and again.loaded_lines == 1
    again.start(resumed=True)
    again.append(ImageResult(2, {"file": "z"}, [1.0], []))
    again.close()
    assert sorted(PartialResults(folder, {"checkpoint": "a"}).load()) == [0, 2]  # the new line stands on its own
    with pytest.warns(UserWarning, match="starting afresh"):
        assert PartialResults(folder, {"checkpoint": "b"}).load() == {}


def test_combine_adds_up_in_image_order_and_counts_each_image_once():
    import torch

    a = ImageResult.make(1, {"file": "b"}, torch.tensor([0.25, 0.75]), torch.tensor([[2, 0], [1, 3]]))
    b = ImageResult.make(0, {"file": "a"}, torch.tensor([0.5, 0.5]), torch.tensor([[0, 1], [0, 0]]))
    hist, exits, rows = combine([a, b], K=2, S=2)
    assert hist.tolist() == [[2, 1], [1, 3]] and exits.tolist() == [0.75, 1.25]
    assert [r["file"] for r in rows] == ["a", "b"]


def test_finished_variants_are_reused_only_for_the_same_checkpoint(run, tmp_path):
    cfg, _, ckpt = run
    out = tmp_path / "e"
    run_evaluation(cfg, str(ckpt), [0.5], out_dir=out, verbose=False, with_dense=False)
    first = (out / "dtop_p0_0.5" / "metrics.json").stat().st_mtime_ns
    run_evaluation(cfg, str(ckpt), [0.5], out_dir=out, verbose=False, with_dense=False)
    assert (out / "dtop_p0_0.5" / "metrics.json").stat().st_mtime_ns == first
    other = tmp_path / "other.pt"
    shutil.copy(ckpt, other)
    run_evaluation(cfg, str(other), [0.5], out_dir=out, verbose=False, with_dense=False)
    assert (out / "dtop_p0_0.5" / "metrics.json").stat().st_mtime_ns != first
