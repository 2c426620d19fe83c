"""Threshold vs budget exits on CamVid, calibration, speed (eager, compiled, ONNX) of the budget model.

    python benchmarks/budget_camvid.py [--checkpoint runs/camvid_dinov2_500_ftp97/linear/dtop/last.pt]
                                       [--config configs/camvid_dinov2_s14.yaml] [--match-p0 0.9]

On the pretrained DINOv2-S/14 CamVid model (``python benchmarks/camvid.py --backbone dinov2 --dense-iters 500
--finetune-p0 0.97 ...`` makes it; the ViT-T one from ``benchmarks/camvid.py`` works too):

1. ``dtop eval`` at the threshold p0 ``--match-p0``: its mean GFLOPs are the target;
2. ``dtop calibrate --exit-mode budget`` (and ``threshold``) for that target on training images, then
   ``dtop eval`` of each calibrated config on val: mIoU, achieved GFLOPs against the target, the spread of
   GFLOPs per image;
3. ``dtop bench`` of the budget model against dense on real val images at batch 8 on this CPU, eager and
   compiled, beside the threshold model;
4. ONNX: ``dtop export`` of the budget and the dense model at batch 8, timed alternately with onnxruntime.

Runs the ``dtop`` commands (printed) and writes the RESULTS.md section "Budget exits on CamVid". A rerun
skips the steps that finished (a ``.done`` file beside each).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid import DTOP, run, shown  # noqa: E402
from results import replace_section  # noqa: E402


def summary(eval_dir: Path) -> dict:
    return {r["name"]: r for r in json.loads((ROOT / eval_dir / "summary.json").read_text())}


def spread(eval_dir: Path, name: str) -> str:
    """Per-image GFLOPs: mean, standard deviation, min-max, from ``per_image.csv``."""
    g = [float(r["gflops"]) for r in csv.DictReader(open(ROOT / eval_dir / name / "per_image.csv"))]
    return f"{statistics.fmean(g):.3f} ± {statistics.pstdev(g):.3f} ({min(g):.3f}-{max(g):.3f})"


def bench(cmd: list[str], out: Path) -> dict:
    """Run a ``dtop bench ... --json`` command once (kept in ``out``)."""
    if not (ROOT / out).is_file():
        print("+", shown(cmd), flush=True)
        text = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
        (ROOT / out).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / out).write_text(text.strip().splitlines()[-1])
    return json.loads((ROOT / out).read_text())


def onnx_times(dense: Path, budget: Path, size: tuple[int, int], batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of the two ONNX files on one random batch, run alternately (onnxruntime, CPU)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    sessions = [ort.InferenceSession(str(ROOT / p), opts, providers=["CPUExecutionProvider"]) for p in (dense, budget)]
    x = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
    for s in sessions:
        s.run(None, {"images": x})
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {"images": x})
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/camvid_dinov2_500_ftp97/linear/dtop/last.pt")
    ap.add_argument("--config", default="configs/camvid_dinov2_s14.yaml")
    ap.add_argument("--data", default="../shared/data/camvid")
    ap.add_argument("--match-p0", type=float, default=0.9)
    ap.add_argument("--images", type=int, default=64, help="training images for calibration")
    ap.add_argument("--size", nargs=2, type=int, default=[238, 322], help="bench/export size (whole patches)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/budget_camvid")
    args = ap.parse_args()
    out, ckpt, cfg = Path(args.out), args.checkpoint, args.config
    data = ["--set", f"data.root={args.data}"]
    size = [str(s) for s in args.size]
    # 1. the threshold rule at --match-p0: the target
    thr = DTOP + ["eval", cfg, "--checkpoint", ckpt, "--p0", f"{args.match_p0:g}", "--out", str(out / "threshold"), *data]
    run(thr, ROOT / out / "threshold.done")
    base = summary(out / "threshold")
    thr_name = f"dtop_p0_{args.match_p0:g}"
    target = base[thr_name]["gflops"]
    # 2. calibrate both rules for that target, evaluate each
    cal = {}
    for mode in ("budget", "threshold"):
        cfg_out = out / f"calibrated_{mode}.yaml"
        cal_cmd = DTOP + ["calibrate", cfg, "--checkpoint", ckpt, "--target-gflops", f"{target:.4f}",
                          "--exit-mode", mode, "--images", str(args.images), "--out", str(cfg_out), *data]
        run(cal_cmd, ROOT / out / f"calibrate_{mode}.done")
        ev = DTOP + ["eval", str(cfg_out), "--checkpoint", ckpt, "--no-dense", "--out", str(out / f"eval_{mode}")]
        run(ev, ROOT / out / f"eval_{mode}.done")
        cal[mode] = (cal_cmd, ev, json.loads((ROOT / cfg_out.with_suffix(".json")).read_text()),
                     next(iter(summary(out / f"eval_{mode}").values())))
    ratios = cal["budget"][2]["exit_ratio"]
    # 3. speed on this CPU: budget vs dense, eager and compiled, beside the threshold rule
    val = f"{args.data}/val"
    common = ["bench", "--checkpoint", ckpt, "--images", val, "--size", *size, "--batch", str(args.batch),
              "--warmup", "1", "--repeats", str(args.repeats), "--json"]
    speeds = {}
    for name, extra in (("budget", ["--exit-ratio", *map(str, ratios), "--layouts", "padded"]),
                        ("budget, compiled", ["--exit-ratio", *map(str, ratios), "--layouts", "padded", "--compile"]),
                        ("threshold", ["--p0", f"{args.match_p0:g}", "--layouts", "per_image"]),
                        ("threshold, compiled", ["--p0", f"{args.match_p0:g}", "--layouts", "per_image", "--compile"])):
        cmd = DTOP + common + extra
        speeds[name] = (cmd, bench(cmd, out / f"bench_{name.replace(', ', '_')}.json"))
    # 4. ONNX: budget and dense at the bench size and batch, timed alternately
    exports = {}
    check = sorted(p for p in (ROOT / val).iterdir() if p.suffix.lower() in (".png", ".jpg"))[0]
    for name, extra in (("dense", ["--dense"]), ("budget", ["--exit-ratio", *map(str, ratios)])):
        path = out / f"{name}.onnx"
        cmd = DTOP + ["export", ckpt, "--size", *size, "--batch", str(args.batch), "--out", str(path),
                      "--check", f"{val}/{check.name}", *extra]
        log = ROOT / out / f"export_{name}.txt"
        if not log.is_file() or not path.is_file():
            print("+", shown(cmd), flush=True)
            text = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
            log.write_text(text)
        checked = [line for line in log.read_text().splitlines() if line.startswith("onnxruntime vs PyTorch")]
        exports[name] = (cmd, path, checked[-1] if checked else "not checked")
    t_dense, t_budget = onnx_times(exports["dense"][1], exports["budget"][1], tuple(args.size), args.batch,
                                   args.repeats * 2)
    flop_ratio = speeds["budget"][1]["flop_ratio"]

    dense_row = base["dense"]
    lines = ["| rule | setting | mIoU | GFLOPs / image (mean ± sd, min-max) | vs dense | target GFLOPs | "
             "achieved on val vs target |", "|---|---|---|---|---|---|---|",
             f"| dense | | {dense_row['miou']:.2f} | {spread(out / 'threshold', 'dense')} | | | |",
             f"| threshold | p0 {args.match_p0:g} | {base[thr_name]['miou']:.2f} | {spread(out / 'threshold', thr_name)} "
             f"| {100 * (1 - target / dense_row['gflops']):.1f}% fewer | | |"]
    for mode in ("threshold", "budget"):
        _, _, rec, row = cal[mode]
        setting = f"p0 {rec['p0']:g}" if mode == "threshold" else "exit ratios " + ", ".join(f"{r:.3f}" for r in ratios)
        lines.append(f"| {mode} (calibrated) | {setting} | {row['miou']:.2f} | {spread(out / f'eval_{mode}', row['name'])} | "
                     f"{100 * (1 - row['gflops'] / dense_row['gflops']):.1f}% fewer | {rec['target']:.3f} | "
                     f"{100 * (row['gflops'] / rec['target'] - 1):+.1f}% |")
    budget_miou = cal["budget"][3]["miou"]
    speed_lines = ["| rule | layout | FLOP ratio | time ratio batch 8 | realised batch 8 | realised batch 1 |",
                   "|---|---|---|---|---|---|"]
    for name, (_, r) in speeds.items():
        lay = r["layout"]
        speed_lines.append(f"| {name} | {lay} | {r['flop_ratio']:.3f} | {r['time_ratio_mixed']:.3f} | "
                           f"{r['realised_mixed']:.2f} | {r['realised_batch1']:.2f} |")
    body = "\n".join([
        f"Model: `{ckpt}` (DINOv2-S/14, linear stage heads, DToP @Finetune at p0 0.97); CamVid val, 101 images. "
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores. Written by "
        f"`python benchmarks/budget_camvid.py`, which ran:", "",
        f"- `{shown(thr)}`",
        *[f"- `{shown(c)}`\n- `{shown(e)}`" for c, e, _, _ in cal.values()],
        *[f"- `{shown(c)}`" for c, _ in speeds.values()],
        *[f"- `{shown(c)}`" for c, _, _ in exports.values()], "",
        f"The target is the threshold rule's GFLOPs at p0 {args.match_p0:g} ({target:.3f}); `dtop calibrate` "
        f"searched on {args.images} training images. The budget rule is the same checkpoint run with fixed "
        f"exit counts (no retraining).", "", *lines, "",
        f"Budget vs threshold at matched GFLOPs: mIoU {budget_miou - base[thr_name]['miou']:+.2f} "
        f"(target: within 0.5). Per-image GFLOPs: the budget rule gives every image the same cost "
        f"(the spread left comes from image sizes), the threshold rule one per image.", "",
        f"Speed on this CPU, real val images, {args.size[0]}x{args.size[1]}, batch {args.batch} (`dtop bench`, dense "
        f"and DToP alternately in one process; compiled rows against the compiled dense model):", "",
        *speed_lines, "",
        f"ONNX (onnxruntime {_ort_version()}, CPU, batch {args.batch}, {args.size[0]}x{args.size[1]}, median of "
        f"{args.repeats * 2} alternate calls): dense {1000 * t_dense:.1f} ms, budget {1000 * t_budget:.1f} ms; time "
        f"ratio {t_budget / t_dense:.3f} against the FLOP ratio {flop_ratio:.3f} "
        f"(difference {t_budget / t_dense - flop_ratio:+.3f}; target within 0.05). Each export checked on the val "
        f"image {check.name} (batch of {args.batch} copies): dense: {exports['dense'][2]}; budget: "
        f"{exports['budget'][2]}."])
    replace_section("Budget exits on CamVid (threshold vs budget, calibration, eager/compiled/ONNX speed)", body)
    print(body)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
