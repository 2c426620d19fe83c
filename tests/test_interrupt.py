"""Ctrl-C (SIGINT) and SIGTERM during train, eval, compare and predict: one line on stderr (what was done,
where, the command that resumes), status 130 / 143, no traceback, nothing half-written, and the resume works.

The long jobs run as a user runs them, ``python -m dtop ...`` in a subprocess of its own process group (a
terminal's Ctrl-C reaches the whole group, data workers included); the signal goes once a file shows the job
under way."""
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dtop.apps.demo import demo_config
from dtop.checkpoint import load_checkpoint
from dtop.cli import main
from dtop.engine import train
from dtop.errors import Interrupted, deferred_interrupts, interrupts_raise

engine_train = importlib.import_module("dtop.engine.train")  # dtop.engine.train is also a function

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _tiny_config(out_dir: Path, iters: int = 100_000, num_workers: int = 0):
    cfg = demo_config(str(out_dir), fast=True)
    cfg.train.iters = iters
    cfg.train.log_interval = 1
    cfg.train.ckpt_interval = 1000  # the interrupt writes the checkpoint
    cfg.train.device = "cpu"
    cfg.data.num_workers = num_workers
    return cfg


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _interrupt(tmp_path: Path, argv: list, started, sig: int, group: bool = True, timeout: float = 180):
    """Run ``python -m dtop *argv``, send ``sig`` once ``started()`` is true; returns (status, stderr lines)."""
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dtop", *map(str, argv)], stdout=out, stderr=err,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    try:
        deadline = time.time() + timeout
        while not started():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.time() < deadline, "the job did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        err.close()
    text = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    return status, [line for line in text.splitlines() if line.strip()]


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], list(folder.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train(_tiny_config(tmp_path_factory.mktemp("dense"), iters=1))


# ----------------------------------------------------------------------------- the building blocks
def test_deferred_interrupts_hold_the_signal_until_the_block_ends():
    done = []
    with interrupts_raise():
        with pytest.raises(Interrupted) as info:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                done.append("rest of the block")
            done.append("after the block")
    assert done == ["rest of the block"]
    assert info.value.signum == signal.SIGTERM and info.value.exit_status == 143
    assert Interrupted.wrap(KeyboardInterrupt(), "x").exit_status == 130  # a plain Ctrl-C


# ----------------------------------------------------------------------------- train
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 1), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_training_saves_its_iteration_and_resumes(tmp_path, sig, workers):
    run = tmp_path / "run"
    cfg = _write(_tiny_config(run, num_workers=workers), tmp_path / "cfg.yaml")
    log = run / "train_log.jsonl"
    status, lines = _interrupt(tmp_path, ["train", cfg], lambda: log.is_file() and
                               len(log.read_text().splitlines()) >= 2, sig)
    assert status == STATUS[sig]
    assert len(lines) == 1 and lines[0].startswith(f"dtop train: interrupted by {signal.Signals(sig).name}: "), lines
    m = re.search(r"stopped after iteration (\d+) of 100000; checkpoint of iteration \1: (\S+); resume: (.*)$",
                  lines[0])
    assert m, lines[0]
    done = int(m.group(1))
    assert done >= 2 and Path(m.group(2)) == run / "last.pt"
    ckpt = load_checkpoint(run / "last.pt")  # a whole checkpoint of the last completed iteration
    assert ckpt["iter"] == done and ckpt["scheduler"]["last_epoch"] == done
    _no_temporaries(run)
    assert all(json.loads(line)["iter"] <= done for line in log.read_text().splitlines())
    words = shlex.split(m.group(3))
    assert words == ["dtop", "train", str(cfg), "--resume"]
    # the printed command resumes (run shorter here): it continues from the saved iteration
    assert main(words[1:] + ["--set", f"train.iters={done + 2}"]) == 0
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["iter"] == done + 2 and resumed["scheduler"]["last_epoch"] == done + 2


def test_interrupt_before_the_first_iteration_writes_no_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted_step(self, batches, it):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(engine_train._Run, "step", interrupted_step)
    cfg = _write(_tiny_config(tmp_path / "run"), tmp_path / "cfg.yaml")
    assert main(["train", str(cfg)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"dtop train: interrupted by SIGINT: stopped before the first of 100000 iterations finished; "
                   f"no checkpoint written; rerun: dtop train {cfg}")
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- eval
def test_interrupted_evaluation_keeps_whole_variants(tmp_path, checkpoint):
    cfg = _tiny_config(tmp_path / "unused")
    cfg.data.val_options = {"num_images": 24, "seed": 1}
    cfg_path = _write(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "eval"
    p0s = [f"{p:.2f}" for p in np.linspace(0.5, 0.99, 12)]
    status, lines = _interrupt(tmp_path, ["eval", cfg_path, "--checkpoint", checkpoint, "--out", out, "--p0", *p0s],
                               lambda: (out / "dense" / "metrics.json").is_file(), signal.SIGTERM, group=False)
    assert status == 143 and len(lines) == 1, lines
    m = re.match(r"dtop eval: interrupted by SIGTERM: evaluated (\d+) of 13 variants \(([^)]*)\), metrics in "
                 r"(\S+)/<variant>/metrics.json; (\S+) not finished, summary.json not written"
                 r"(; \d+ image\(s\) of \4 kept in \S+\.partial: the same command resumes)?; rerun: dtop eval ",
                 lines[0])
    assert m, lines[0]
    finished = m.group(2).split(", ")
    assert len(finished) == int(m.group(1)) and finished[0] == "dense" and Path(m.group(3)) == out
    written = sorted(p.parent.name for p in out.glob("*/metrics.json"))
    assert written == sorted(finished) and m.group(4) not in written
    for name in finished:  # each finished variant whole: its metrics and one CSV row per image
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["num_images"] == 24
        assert len((out / name / "per_image.csv").read_text().splitlines()) == 25
    assert not (out / "summary.json").exists()
    _no_temporaries(out)


# ----------------------------------------------------------------------------- predict
def test_interrupted_prediction_lists_the_images_it_wrote(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(images / f"im{i:02d}.png")
    out = tmp_path / "pred"
    status, lines = _interrupt(tmp_path, ["predict", checkpoint, images, "--out", out],
                               lambda: any(out.glob("*_exits.png")), signal.SIGINT)
    assert "no token can exit early" in lines[0]  # the dense-trained checkpoint's note, then the interruption
    lines = lines[1:]
    assert status == 130 and len(lines) == 1, lines
    m = re.match(rf"dtop predict: interrupted by SIGINT: (\d+) of 30 images written to {re.escape(str(out))}, "
                 r"listed in its predictions.json \(partial, \"interrupted\": true\); rerun: dtop predict ", lines[0])
    assert m, lines[0]
    result = json.loads((out / "predictions.json").read_text())
    assert result["interrupted"] is True and len(result["images"]) == int(m.group(1)) >= 1
    stems = {r["stem"] for r in result["images"]}
    for kind in ("seg", "overlay", "exits"):  # every listed image has its three PNGs, no other image has any
        files = sorted(out.glob(f"*_{kind}.png"))
        assert {p.name[: -len(f"_{kind}.png")] for p in files} == stems
        for p in files:
            with Image.open(p) as im:
                im.load()
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + len(stems)
    _no_temporaries(out)


# ----------------------------------------------------------------------------- compare
def test_interrupted_compare_resumes_the_fine_tuning(tmp_path, checkpoint, capsys, monkeypatch):
    log = engine_train._log

    def log_then_sigterm(log_file, record, *args):
        log(log_file, record, *args)
        if record["iter"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

    cfg = _tiny_config(tmp_path / "unused", iters=3)
    cfg.eval.max_images = 2
    cfg_path = _write(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "--checkpoint", str(checkpoint), "--out", str(out), "--p0", "0.9",
            "--methods", "dtop"]
    monkeypatch.setattr(engine_train, "_log", log_then_sigterm)
    assert main(argv) == 143
    err = capsys.readouterr().err.strip()
    last = out / "train" / "dtop" / "last.pt"
    assert err == (f"dtop compare: interrupted by SIGTERM: fine-tuned no method yet; fine-tuning dtop stopped after "
                   f"iteration 1 of 3; checkpoint of iteration 1: {last} (a rerun resumes it); rerun: "
                   f"{shlex.join(['dtop', *argv])}")
    assert load_checkpoint(last)["iter"] == 1 and not (out / "compare.json").exists()
    monkeypatch.setattr(engine_train, "_log", log)
    assert main(argv) == 0  # the rerun resumes the fine-tuning and finishes
    assert load_checkpoint(last)["iter"] == 3
    assert [json.loads(line)["iter"] for line in (out / "train" / "dtop" / "train_log.jsonl").open()] == [1, 2, 3]
    assert [r["name"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["dense", "dtop_p0_0.9"]
