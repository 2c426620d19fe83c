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


def reading(rows: list[dict]) -> list[str]:
    """One line per method: where DToP wins and where it does not, at a similar budget."""
    dtop = [r for r in rows if r["method"] == "dtop"]
    lines = []
    for r in rows:
        if r["method"] in ("dense", "dtop") or not dtop:
            continue
        d = min(dtop, key=lambda x: abs(x["gflops"] - r["gflops"]))
        verdict = "DToP wins" if d["miou"] > r["miou"] else "DToP does not win"
        lines.append(f"- {r['label']}: {r['miou']:.2f} mIoU at {r['gflops']:.3f} GFLOPs vs DToP p0 {d['p0']:g} "
                     f"{d['miou']:.2f} at {d['gflops']:.3f}: {verdict} ({d['miou'] - r['miou']:+.2f}).")
    return lines


def _settings(kind: str, spec: dict) -> str:
    shown = {a: v for a, v in spec.items() if a != "kind" and (kind == "expedite" or a == "block")}
    return f"{kind}: " + ", ".join(f"{a}={v}" for a, v in shown.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/camvid", help="relative to the repository root")
    ap.add_argument("--dense", default="runs/camvid/dense/last.pt")
    ap.add_argument("--out", default="runs/camvid/compare")
    ap.add_argument("--iters", type=int, default=500, help="fine-tuning iterations of every trained method")
    ap.add_argument("--p0", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--section-only", action="store_true",
                    help="rewrite the RESULTS.md section from an existing compare.json without running anything")
    args = ap.parse_args()
    dtop = [sys.executable, "-m", "dtop"]
    data = ["--set", f"data.root={args.data}"]
    if not (ROOT / args.dense).is_file() and not args.section_only:
        dense_dir = str(Path(args.dense).parent)
        cmd = dtop + ["train", CONFIG, *data, "--set", f"out_dir={dense_dir}"]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    # the fine-tuning schedule of benchmarks/camvid.py's @Finetune run, for every method alike
    cmd = dtop + ["compare", CONFIG, "--checkpoint", args.dense, "--out", args.out, *data,
                  "--set", f"train.iters={args.iters}", "--set", "train.lr=2.0e-4", "--set", "train.warmup_iters=1",
                  "--set", "train.p0=0.9", "--p0", *[str(p) for p in args.p0]]
    out = ROOT / args.out
    timing = out / "compare_minutes.txt"
    if not args.section_only:
        print("+", shlex.join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        timing.write_text(f"{(time.time() - t0) / 60:.0f}")
    minutes = timing.read_text() if timing.is_file() else "?"
    result = json.loads((out / "compare.json").read_text())
    dense = json.loads((out / "eval" / "dense" / "metrics.json").read_text())
    text = [
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, torch "
        f"{dense['versions']['torch']}; ViT-T/16 with linear heads after blocks 5, 7, 11 (the CamVid config), "
        f"{dense['num_images']} val images at 240 x 320. Every trained method is fine-tuned from the same dense "
        f"checkpoint for {result['iters']} iterations (lr 2e-4), the schedule of the CamVid @Finetune run; "
        f"Expedite-ViT is applied to the dense checkpoint without training. The last run took {minutes} min "
        f"(a rerun skips finished fine-tuning runs).",
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
        "",
        "Reading (each alternative against the DToP threshold nearest to it in GFLOPs):",
        "",
        *reading(result["rows"]),
    ]
    replace_section("CamVid: supplement comparisons (DToP vs symmetric downsampling, SegViT shrunk, Expedite-ViT)",
                    "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
