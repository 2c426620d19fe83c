"""Wall time of a CamVid evaluation on one process and sharded over two (torchrun, gloo), one thread each.

    python benchmarks/sharded_eval.py [--checkpoint runs/camvid_dinov2_500_ftp97/linear/dtop/last.pt]

Runs ``dtop eval CONFIG --checkpoint CKPT --p0 0.9 --no-dense`` with ``OMP_NUM_THREADS=1``, first as one
process, then under ``torchrun --standalone --nproc_per_node 2``, into fresh folders, checks that the two
``metrics.json`` agree (mIoU, per-class IoU, GFLOPs, exit fractions) and the two ``per_image.csv`` are the same
file, and writes the RESULTS.md section "Sharded evaluation".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402

SAME = ("miou", "macc", "aacc", "per_class_iou", "gflops", "exit_fractions", "num_images")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/camvid_dinov2_500_ftp97/linear/dtop/last.pt")
    ap.add_argument("--config", default="configs/camvid_dinov2_s14.yaml")
    ap.add_argument("--data", default="../shared/data/camvid")
    ap.add_argument("--out", default="runs/sharded_eval")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    eval_args = ["eval", args.config, "--checkpoint", args.checkpoint, "--p0", "0.9", "--no-dense",
                 "--set", f"data.root={args.data}"]
    runs = {"1 process": [sys.executable, "-m", "dtop"],
            "2 processes (torchrun)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "2", "-m", "dtop"]}
    shown = {"1 process": ["dtop"], "2 processes (torchrun)": ["torchrun", "--standalone", "--nproc_per_node", "2",
                                                                  "-m", "dtop"]}
    seconds, metrics, csvs = {}, {}, {}
    for i, (name, launcher) in enumerate(runs.items()):
        out = ROOT / args.out / str(i + 1)
        shutil.rmtree(out, ignore_errors=True)
        cmd = launcher + eval_args + ["--out", str(Path(args.out) / str(i + 1))]
        print("+", shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        seconds[name] = time.perf_counter() - t0
        metrics[name] = json.loads((out / "dtop_p0_0.9" / "metrics.json").read_text())
        csvs[name] = (out / "dtop_p0_0.9" / "per_image.csv").read_text()
    a, b = metrics.values()
    same = all(a[k] == b[k] for k in SAME) and len(set(csvs.values())) == 1
    one, two = seconds.values()
    lines = ["| run | command | wall time | mIoU | GFLOPs / image |", "|---|---|---|---|---|"]
    for i, name in enumerate(runs):
        cmd = shlex.join(shown[name] + eval_args + ["--out", f"{args.out}/{i + 1}"])
        lines.append(f"| {name} | `OMP_NUM_THREADS=1 {cmd}` | {seconds[name]:.1f} s | {metrics[name]['miou']:.2f} | "
                     f"{metrics[name]['gflops']:.3f} |")
    body = "\n".join([
        f"CamVid val ({a['num_images']} images), `{args.checkpoint}` at p0 0.9, one thread per process, "
        f"{platform.machine()} CPU with {subprocess.getoutput('nproc')} cores; wall time of the whole command "
        f"(start-up, model loading and process-group set-up included). Written by `python benchmarks/sharded_eval.py`.",
        "", *lines, "",
        f"Speed-up {one / two:.2f}x. The two runs' metrics.json agree and their per_image.csv files are "
        f"{'identical' if same else 'NOT identical'}."])
    replace_section("Sharded evaluation (torchrun, 1 vs 2 processes)", body)
    print(body)
    if not same:
        sys.exit("the sharded evaluation differs from the single-process one")


if __name__ == "__main__":
    main()
