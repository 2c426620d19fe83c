"""CamVid accuracy/GFLOPs benchmark: dense training, @Finetune with DToP, evaluation dense vs DToP.

    python benchmarks/camvid.py [--data ../shared/data/camvid] [--out runs/camvid] [--dense-iters 2000]

Runs the ``dtop`` commands below (printed as they run), then writes the "CamVid" section of
benchmarks/RESULTS.md with the commands, the machine and the table from ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402


def run(cmd: list[str]) -> float:
    print("+", shlex.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/camvid", help="relative to the repository root")
    ap.add_argument("--out", default="runs/camvid")
    ap.add_argument("--dense-iters", type=int, default=2000)
    ap.add_argument("--finetune-iters", type=int, default=500)
    ap.add_argument("--p0", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = ap.parse_args()
    dtop = [sys.executable, "-m", "dtop"]
    cfg = "configs/camvid_vit_t16.yaml"
    out = Path(args.out)
    common = ["--set", f"data.root={args.data}"]
    dense_cmd = dtop + ["train", cfg, *common, "--set", f"out_dir={out}/dense", "--set",
                        f"train.iters={args.dense_iters}"]
    ft_cmd = dtop + ["train", cfg, *common, "--set", f"out_dir={out}/dtop", "--set", "train.scheme=finetune",
                     "--set", f"train.init_checkpoint={out}/dense/last.pt", "--set", "train.p0=0.9",
                     "--set", f"train.iters={args.finetune_iters}", "--set", "train.lr=2.0e-4",
                     "--set", "train.warmup_iters=1"]
    eval_cmd = dtop + ["eval", cfg, *common, "--checkpoint", f"{out}/dtop/last.pt", "--p0",
                       *[str(p) for p in args.p0], "--out", f"{out}/eval"]
    times = [run(dense_cmd), run(ft_cmd)]
    # dense baseline = the dense-trained model run without auxiliary heads
    eval_cmd_dense = eval_cmd + ["--dense-checkpoint", f"{out}/dense/last.pt"]
    times.append(run(eval_cmd_dense))
    rows = json.loads((ROOT / out / "eval" / "summary.json").read_text())
    metrics = {r["name"]: json.loads((ROOT / out / "eval" / r["name"] / "metrics.json").read_text()) for r in rows}

    lines = [
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, torch "
        f"{metrics['dense']['versions']['torch']}; {metrics['dense']['num_images']} val images at 240 x 320 "
        f"(whole image), labels at 360 x 480. Dense training {times[0] / 60:.1f} min, fine-tuning "
        f"{times[1] / 60:.1f} min, evaluation {times[2] / 60:.1f} min.",
        "",
        "Commands (run by `python benchmarks/camvid.py`):",
        "",
        "```bash",
        shlex.join(dense_cmd[2:]).replace("-m dtop", "dtop"),
        shlex.join(ft_cmd[2:]),
        shlex.join(eval_cmd_dense[2:]),
        "```",
        "",
        "| variant | p0 | mIoU | GFLOPs / image | reduction | tokens exited at stage 1 / 2 / 3 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        exits = " / ".join(f"{100 * f:.1f}%" for f in r["exit_fractions"])
        red = "" if r["reduction_pct"] is None else f"{r['reduction_pct']:.1f}%"
        lines.append(f"| {r['name']} | {'' if r['p0'] is None else r['p0']} | {r['miou']:.2f} | "
                     f"{r['gflops']:.3f} | {red} | {exits} |")
    classes = list(metrics["dense"]["per_class_iou"])
    lines += ["", "Per-class IoU:", "", "| variant | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join("-" if m["per_class_iou"][c] is None else f"{m['per_class_iou'][c]:.1f}"
                                                   for c in classes) + " |")
    replace_section("CamVid: dense vs DToP (accuracy and GFLOPs)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
