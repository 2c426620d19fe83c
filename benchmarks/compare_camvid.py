"""The supplement's comparisons on CamVid: DToP vs symmetric downsampling, SegViT shrunk and Expedite-ViT.

    python benchmarks/compare_camvid.py [--data ../shared/data/camvid] [--dense runs/camvid/dense/last.pt]
                                        [--out runs/camvid/compare] [--iters 500]

Needs the dense CamVid checkpoint of `python benchmarks/camvid.py` (trained here first if absent).
Runs one `dtop compare` (printed), then writes the "CamVid: supplement comparisons" section of
benchmarks/RESULTS.md from its compare.json. A rerun resumes unfinished fine-tuning runs.
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

CONFIG = "configs/camvid_vit_t16.yaml"


def _settings(kind: str, spec: dict) -> str:
    shown = {a: v for a, v in spec.items() if a != "kind" and (kind == "expedite" or a == "block")}
    return f"{kind}: " + ", ".join(f"{a}={v}" for a, v in shown.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    ap.add_argument("--dense", default="runs/camvid/dense/last.pt")
    ap.add_argument("--out", default="runs/camvid/compare")
    ap.add_argument("--iters", type=int, default=500, help="fine-tuning iterations of every trained method")
    ap.add_argument("--p0", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = ap.parse_args()
    dtop = [sys.executable, "-m", "dtop"]
    data = ["--set", f"data.root={args.data}"]
    if not (ROOT / args.dense).is_file():
        dense_dir = str(Path(args.dense).parent)
        cmd = dtop + ["train", CONFIG, *data, "--set", f"out_dir={dense_dir}"]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    # the fine-tuning schedule of benchmarks/camvid.py's @Finetune run, for every method alike
    cmd = dtop + ["compare", CONFIG, "--checkpoint", args.dense, "--out", args.out, *data,
                  "--set", f"train.iters={args.iters}", "--set", "train.lr=2.0e-4", "--set", "train.warmup_iters=1",
                  "--set", "train.p0=0.9", "--p0", *[str(p) for p in args.p0]]
    print("+", shlex.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60
    out = ROOT / args.out
    result = json.loads((out / "compare.json").read_text())
    dense = json.loads((out / "eval" / "dense" / "metrics.json").read_text())
    text = [
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, torch "
        f"{dense['versions']['torch']}; ViT-T/16 with linear heads after blocks 5, 7, 11 (the CamVid config), "
        f"{dense['num_images']} val images at 240 x 320. Every trained method is fine-tuned from the same dense "
        f"checkpoint for {result['iters']} iterations (lr 2e-4), the schedule of the CamVid @Finetune run; "
        f"Expedite-ViT is applied to the dense checkpoint without training. {minutes:.0f} min in all.",
        "",
        "Command (run by `python benchmarks/compare_camvid.py`):",
        "",
        "```bash",
        shlex.join(["dtop", *cmd[3:]]),
        "```",
        "",
        "Settings of the alternatives: " + "; ".join(_settings(k, spec) for k, spec in result["reductions"].items())
        + " (block None: the supplement's place, after layer 9 for the symmetric operators, layer 8 for shrunk, "
        "layer 6 for Expedite).",
        "",
        "Table 1 (symmetric downsampling and SegViT shrunk vs DToP), from `table1.md`:",
        "",
        (out / "table1.md").read_text().strip(),
        "",
        "Table 2 (Expedite-ViT vs DToP), from `table2.md`:",
        "",
        (out / "table2.md").read_text().strip(),
    ]
    replace_section("CamVid: supplement comparisons (DToP vs symmetric downsampling, SegViT shrunk, Expedite-ViT)",
                    "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
