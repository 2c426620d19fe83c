"""``dtop eval CONFIG --checkpoint CKPT``: the dense model and DToP at each p0 (or a token-reduction
alternative) on the config's validation split; ``--figures`` adds the report (:mod:`dtop.apps.report`)."""
from __future__ import annotations

import argparse

from ..config import load_config
from ..engine import run_evaluation, summary_table
from ..engine.evaluate import eval_dir
from ..engine.shards import world
from ..models.config import check_p0, parse_reduction
from .common import (App, add_config_device, add_exit_options, add_set, check_out_folder, config_sets,
                     exit_setting)
from .report import build_report


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--p0", type=float, nargs="+", default=None, help="thresholds (default: eval.p0 of the config)")
    sp.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    sp.add_argument("--dense-checkpoint", default=None,
                    help="model for the dense baseline (default: --checkpoint run without auxiliary heads)")
    sp.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    sp.add_argument("--reduction", default=None, metavar="KIND[,key=value...]",
                    help="evaluate the checkpoint with a token-reduction alternative instead of DToP "
                         "(e.g. expedite,block=5,cluster_scale=0.75: training-free)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the blocks and heads (dynamic shapes)")
    sp.add_argument("--figures", action="store_true", help="also write the figures and report.html (dtop report)")
    add_exit_options(sp)
    add_config_device(sp)
    add_set(sp)


def run(args: argparse.Namespace) -> None:
    check_out_folder(args.out)
    for p in args.p0 or []:
        check_p0(p, "--p0")  # before any evaluation runs
    cfg = load_config(args.config, config_sets(args))
    budget = exit_setting(args, cfg.eval) if args.p0 is None else exit_setting(args)
    p0s = args.p0 if args.p0 is not None else cfg.eval.p0
    rows = run_evaluation(cfg, args.checkpoint, [] if budget is not None else p0s, with_dense=not args.no_dense,
                          out_dir=args.out, dense_checkpoint=args.dense_checkpoint,
                          reduction=parse_reduction(args.reduction), compile=args.compile, budget=budget)
    if world()[0] != 0:  # under torchrun, rank 0 reports
        return
    print("\n" + summary_table(rows))
    if args.figures:
        print(f"report: {build_report(eval_dir(args.checkpoint, args.out), device=cfg.train.device)}")


APP = App("eval", "evaluate a checkpoint: dense and DToP at each p0", add_arguments, run)
