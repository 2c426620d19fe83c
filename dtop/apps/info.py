"""``dtop models``, ``dtop flops`` and ``dtop paper-table``: the presets and what they cost."""
from __future__ import annotations

import argparse

import torch

from ..flops import PAPER_TABLE, default_size, preset_gflops
from ..jsonio import dumps
from ..models import create_model, get_config, list_models
from ..models.config import parse_reduction
from .common import App


def _no_arguments(sp: argparse.ArgumentParser) -> None:
    pass


def run_models(args: argparse.Namespace) -> None:
    for name in list_models():
        cfg = get_config(name)
        stages = ", ".join(f"{s.head}@{s.block}" for s in cfg.stages)
        print(f"{name:22s} {cfg.backbone:29s} cls={cfg.cls_mode:9s} p0={cfg.p0} stages: {stages}")


def add_flops_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", help="preset name (dtop models)")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                    help="input size, multiples of the patch size (default 512 x 512; 518 x 518 for patch 14)")
    sp.add_argument("--num-classes", type=int, default=150)
    sp.add_argument("--final-head-only", action="store_true", help="count the final head, not the auxiliary ones")
    sp.add_argument("--aux-head", choices=["atm", "mask", "linear"], default=None,
                    help="auxiliary head type of segmenter_* presets (default atm)")
    sp.add_argument("--reduction", default=None, metavar="KIND[,key=value...]",
                    help="count a token-reduction alternative: conv, avgpool, nearest, shrunk or expedite")
    sp.add_argument("--json", action="store_true")


def run_flops(args: argparse.Namespace) -> None:
    spec = parse_reduction(args.reduction)
    if args.size is None:
        with torch.device("meta"):
            args.size = list(default_size(create_model(args.name, num_classes=args.num_classes)))
    g = preset_gflops(args.name, tuple(args.size), args.num_classes, args.final_head_only, aux_head=args.aux_head,
                      reduction=spec)
    result = {"model": args.name, "size": list(args.size), "num_classes": args.num_classes,
              "final_head_only": args.final_head_only, "reduction": args.reduction, "gflops": round(g, 4)}
    if args.json:
        print(dumps(result))
    else:
        heads = "final head only" if args.final_head_only else "all stage heads"
        what = f"with {args.reduction}" if args.reduction else "dense"
        print(f"{args.name} at {args.size[0]}x{args.size[1]}, {args.num_classes} classes, {heads}: "
              f"{g:.2f} GFLOPs ({what})")


def paper_table_rows() -> list[dict]:
    """Our dense GFLOPs of every model in the paper's table, with the paper's figure and the difference."""
    rows = []
    for name, crop, k, fho, ref in PAPER_TABLE:
        g = preset_gflops(name, (crop, crop), k, fho)
        rows.append({"model": name, "crop": crop, "num_classes": k, "final_head_only": fho,
                     "gflops": round(g, 2), "paper": ref, "diff_pct": round(100 * (g - ref) / ref, 2)})
    return rows


def add_json(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true")


def run_paper_table(args: argparse.Namespace) -> None:
    rows = paper_table_rows()
    if args.json:
        print(dumps(rows, indent=1))
        return
    print("Dense GFLOPs of the paper's models (analytic count, fvcore convention), vs docs/method/flops.md\n")
    print(f"| {'model':18s} | heads counted   | crop | classes | GFLOPs | paper | diff   |")
    print(f"|{'-' * 20}|-----------------|------|---------|--------|-------|--------|")
    for r in rows:
        heads = "final head only" if r["final_head_only"] else "all 3 ATM heads"
        print(f"| {r['model']:18s} | {heads} | {r['crop']:4d} | {r['num_classes']:7d} | {r['gflops']:6.1f} |"
              f" {r['paper']:5.1f} | {r['diff_pct']:+5.2f}% |")


MODELS = App("models", "list the model presets", _no_arguments, run_models)
FLOPS = App("flops", "dense GFLOPs of a preset (fvcore convention, batch 1)", add_flops_arguments, run_flops)
PAPER_TABLE_APP = App("paper-table", "dense GFLOPs of the paper's models next to the paper's figures", add_json,
                      run_paper_table)
