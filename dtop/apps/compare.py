"""``dtop compare``: the supplement's comparisons (``docs/method/alternatives.md``) on a user's own model and data.

From one trained dense checkpoint: every method that needs training is fine-tuned with the same
schedule (the config's ``train`` section, "@Finetune"), every method is evaluated on the same images,
and two tables are written:

- Table 1: DToP against symmetric downsampling (stride-2 conv, 2x2 average pooling, 2x2 nearest
  sampling) and SegViT shrunk at a similar budget;
- Table 2: DToP against Expedite-ViT (training-free, applied to the dense checkpoint).

Outputs in ``out_dir``: ``train/<method>/`` (checkpoints; a rerun resumes them), ``eval/<method>/``
(metrics.json, per_image.csv), ``compare.json`` (rows and config), ``table1.md``, ``table2.md``.
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from ..checkpoint import load_checkpoint
from ..config import ExperimentConfig, load_config, save_config
from ..engine.common import experiment_dataset, init_distributed, progress_enabled, resolve_device
from ..engine.evaluate import (budget_variant, evaluate, fingerprint, interrupted_evaluation, resolved_budget,
                               write_results)
from ..engine.shards import PartialResults, barrier, world
from ..engine.train import LAST, train
from ..errors import ConfigError, Interrupted, deferred_interrupts, unknown_name
from ..jsonio import write_json
from ..models import load_model
from ..models.config import REDUCTIONS, ReductionSpec, check_p0, parse_reduction
from .common import (App, add_config_device, add_exit_options, add_set, check_out_folder, config_sets,
                     exit_setting)

TABLE1 = ("conv", "avgpool", "nearest", "shrunk")
TABLE2 = ("expedite",)
METHODS = ("dtop", "dense_ft", *TABLE1, *TABLE2)
TRAINING_FREE = ("expedite",)
LABELS = {"dense": "dense baseline", "dense_ft": "dense, fine-tuned likewise", "conv": "stride-2 convolution",
          "avgpool": "2x2 average pooling", "nearest": "2x2 nearest sampling",
          "shrunk": "SegViT shrunk (query downsampling)", "expedite": "Expedite-ViT (no fine-tuning)", "dtop": "DToP"}


def finetune_config(cfg: ExperimentConfig, dense_checkpoint: str, method: str, out_dir: Path,
                    spec: Optional[ReductionSpec] = None) -> ExperimentConfig:
    """The config that fine-tunes ``method`` from the dense checkpoint with ``cfg.train``'s schedule:
    DToP with pruning on (scheme ``finetune``); an alternative as a model option, trained with every
    stage head's loss like the dense model (scheme ``dense``); ``dense_ft`` the dense model itself (the
    control: what the extra iterations alone give)."""
    c = copy.deepcopy(cfg)
    c.out_dir = str(out_dir)
    c.train.init_checkpoint = dense_checkpoint
    if method == "dtop":
        c.train.scheme = "finetune"
    elif method == "dense_ft":
        c.train.scheme = "dense"
    else:
        c.train.scheme = "dense"
        c.model.overrides = {**c.model.overrides, "reduction": asdict(spec or ReductionSpec(method))}
    return c


def _trained(path: Path, iters: int) -> bool:
    return path.is_file() and int(load_checkpoint(path)["iter"]) >= iters


def finetune_all(cfg: ExperimentConfig, dense_checkpoint: str, out_dir: Path, methods: Sequence[str],
                 specs: dict[str, ReductionSpec], verbose: bool = True) -> dict[str, str]:
    """Fine-tune every method that needs it into ``out_dir/train/<method>`` (a rerun resumes an unfinished
    run and skips a finished one); returns each method's checkpoint (the dense one for training-free ones)."""
    checkpoints: dict[str, str] = {}
    for m in methods:
        if m in TRAINING_FREE:
            checkpoints[m] = dense_checkpoint
            continue
        run_dir = out_dir / "train" / m
        c = finetune_config(cfg, dense_checkpoint, m, run_dir, specs.get(m))
        if not _trained(run_dir / LAST, c.train.iters):
            if verbose:
                print(f"== fine-tuning {m} for {c.train.iters} iterations -> {run_dir}", flush=True)
            try:
                resume = (run_dir / LAST).is_file()
                train(c, resume=resume, overwrite=not resume)  # a log without a checkpoint: start afresh
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under the CLI; a rerun resumes from last.pt
                finished = [k for k in checkpoints if k not in TRAINING_FREE]
                raise Interrupted.wrap(e, f"fine-tuned {', '.join(finished) or 'no method yet'}; fine-tuning {m} "
                                          f"{getattr(e, 'done', '') or 'stopped'} (a rerun resumes it)") from e
        checkpoints[m] = str(run_dir / LAST)
    return checkpoints


def evaluate_all(cfg: ExperimentConfig, dense_checkpoint: str, checkpoints: dict[str, str], out_dir: Path,
                 methods: Sequence[str], p0s: Sequence[float], specs: dict[str, ReductionSpec],
                 verbose: bool = True, budget: Optional[dict] = None) -> list[dict[str, Any]]:
    """Evaluate the dense model and every method on the same validation images into ``out_dir/eval/<name>``;
    returns the table rows, dense first. ``budget``: DToP under the budget rule instead of at each p0."""
    dist_info = init_distributed(cfg.train.device)  # under torchrun every rank evaluates a share of the images
    device = resolve_device(cfg.train.device, dist_info)
    dataset = experiment_dataset(cfg, cfg.data.val_split, train=False)
    rows: list[dict[str, Any]] = []

    def run(name: str, model, dense: bool, p0: Optional[float], method: str) -> None:
        ckpt = checkpoints.get(method, dense_checkpoint)
        partial = out_dir / "eval" / f"{name}.partial"  # a rerun after an interruption resumes from here
        metrics, per_image = evaluate(model, dataset, cfg.eval, device, dense=dense,
                                      progress=progress_enabled(dist_info), desc=name, partial=partial,
                                      fingerprint=fingerprint(cfg, ckpt, name, model))
        metrics["checkpoint"] = ckpt
        metrics["checkpoint_relative"] = os.path.relpath(os.path.abspath(ckpt), os.path.abspath(out_dir / "eval" / name))
        if dist_info.is_main:
            write_results(out_dir / "eval" / name, metrics, per_image, cfg)
            PartialResults(partial, {}).remove()
        barrier()
        if metrics["miou"] is None:
            raise ConfigError(f"{name}: no labelled pixel in the {cfg.data.val_split} split, so mIoU is undefined "
                              f"and nothing can be compared; check data.root, the label folder, label_mode, "
                              f"reduce_zero_label and data.ignore_index")
        rows.append({"name": name, "method": method, "label": LABELS[method], "p0": p0,
                     "miou": metrics["miou"], "gflops": metrics["gflops"],
                     "trained": method not in TRAINING_FREE and method != "dense",
                     "checkpoint": checkpoints.get(method, dense_checkpoint)})
        if verbose and dist_info.is_main:
            print(f"{name}: mIoU {metrics['miou']:.2f}, GFLOPs {metrics['gflops']:.3f}", flush=True)

    try:
        run("dense", load_model(dense_checkpoint, device), True, None, "dense")
        for m in methods:
            if m == "dense_ft":
                run(m, load_model(checkpoints[m], device), True, None, m)
            elif m == "dtop":
                model = load_model(checkpoints[m], device)
                if budget is not None:
                    setting = resolved_budget(model, budget)
                    model.set_budget(**setting)
                    run(budget_variant(setting), model, False, None, "dtop")
                    rows[-1]["exit_ratio"] = model.exit_ratio
                for p in p0s if budget is None else []:
                    model.set_p0(float(p))
                    run(f"dtop_p0_{p:g}", model, False, float(p), "dtop")
            else:
                run(m, load_model(checkpoints[m], device, reduction=specs[m]), False, None, m)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under the CLI; the fine-tuned checkpoints stay
        names = ["dense"] + [n for m in methods for n in ([f"dtop_p0_{p:g}" for p in p0s] if m == "dtop" else [m])]
        raise interrupted_evaluation(e, [r["name"] for r in rows], names, out_dir / "eval",
                                     after="compare.json not written; a rerun keeps the fine-tuning") from e
    return rows


def run_compare(cfg: ExperimentConfig, dense_checkpoint: str, out_dir: Path, methods: Sequence[str] = METHODS,
                p0s: Optional[Sequence[float]] = None, specs: Optional[dict[str, ReductionSpec]] = None,
                verbose: bool = True, budget: Optional[dict] = None) -> dict[str, Any]:
    """Fine-tune, evaluate and tabulate; returns the ``compare.json`` content. ConfigError for an unknown
    method or a missing dense checkpoint."""
    for m in methods:
        if m not in METHODS:
            raise unknown_name("method", m, METHODS)
    if not Path(dense_checkpoint).is_file():
        raise ConfigError(f"dense checkpoint not found: {dense_checkpoint}")
    specs = dict(specs or {})
    for m in methods:
        if m in REDUCTIONS:
            specs.setdefault(m, ReductionSpec(m))
    p0s = list(p0s if p0s is not None else cfg.eval.p0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if world()[0] == 0:
        save_config(cfg, out_dir / "config.yaml")
    checkpoints = finetune_all(cfg, dense_checkpoint, out_dir, methods, specs, verbose)
    rows = evaluate_all(cfg, dense_checkpoint, checkpoints, out_dir, methods, p0s, specs, verbose, budget)
    base = rows[0]
    for r in rows:
        r["gflops_reduction_pct"] = round(100 * (1 - r["gflops"] / base["gflops"]), 2)
        r["miou_delta"] = round(r["miou"] - base["miou"], 3)
    result = {"dense_checkpoint": dense_checkpoint, "iters": cfg.train.iters, "p0": p0s,
              "reductions": {m: asdict(s) for m, s in specs.items()}, "rows": rows, "config": cfg.to_dict()}
    if world()[0] != 0:  # under torchrun, rank 0 writes
        return result
    with deferred_interrupts():  # compare.json and its tables are written together
        write_json(out_dir / "compare.json", result)
        for n, kinds in ((1, TABLE1), (2, TABLE2)):
            (out_dir / f"table{n}.md").write_text(comparison_table(rows, kinds) + "\n")
    return result


def comparison_table(rows: list[dict[str, Any]], kinds: Sequence[str]) -> str:
    """Method, GFLOPs, mIoU (Table-1/Table-2 style): the dense rows, the given alternatives, then DToP."""
    picked = [r for r in rows if r["method"] in ("dense", "dense_ft")] + \
        [r for r in rows if r["method"] in kinds] + [r for r in rows if r["method"] == "dtop"]
    out = ["| method | fine-tuned | GFLOPs | GFLOPs saved | mIoU | mIoU vs dense |", "|---|---|---|---|---|---|"]
    for r in picked:
        label = r["label"] + (f" (p0 {r['p0']:g})" if r["p0"] is not None else "") + \
            (f" (budget {', '.join(f'{v:g}' for v in r['exit_ratio'])})" if r.get("exit_ratio") else "")
        tuned = "yes" if r["trained"] else ("no" if r["method"] != "dense" else "")
        out.append(f"| {label} | {tuned} | {r['gflops']:.3f} | {r['gflops_reduction_pct']:.1f}% | {r['miou']:.2f} | "
                   f"{r['miou_delta']:+.2f} |")
    return "\n".join(out)


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="the experiment config; its train section is the fine-tuning schedule")
    sp.add_argument("--checkpoint", required=True, help="the trained dense checkpoint every method starts from")
    sp.add_argument("--out", required=True, help="output folder (train/, eval/, compare.json, table1.md, table2.md)")
    sp.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="dense_ft: the dense model fine-tuned with the same schedule (a control for the extra "
                         "iterations); default: all")
    sp.add_argument("--p0", type=float, nargs="+", default=None, help="DToP thresholds (default: eval.p0)")
    sp.add_argument("--reduction", action="append", default=[], metavar="KIND[,key=value...]",
                    help="settings of an alternative, e.g. expedite,cluster_scale=0.5 (repeatable)")
    add_exit_options(sp)
    add_config_device(sp)
    add_set(sp)


def run(args: argparse.Namespace) -> None:
    check_out_folder(args.out)
    for p in args.p0 or []:
        check_p0(p, "--p0")  # before any fine-tuning or evaluation runs
    cfg = load_config(args.config, config_sets(args))
    specs = {s.kind: s for s in (parse_reduction(r) for r in args.reduction)}
    budget = exit_setting(args, cfg.eval) if args.p0 is None else exit_setting(args)
    if budget is not None and args.exit_ratio is not None:  # fine-tune DToP under the rule it is evaluated with
        cfg.train.exit_mode, cfg.train.exit_ratio, cfg.train.p_min = "budget", budget["exit_ratio"], budget["p_min"]
    result = run_compare(cfg, args.checkpoint, Path(args.out), methods=args.methods, p0s=args.p0, specs=specs,
                         budget=budget)
    if world()[0] != 0:  # under torchrun, rank 0 reports
        return
    print("\nTable 1: symmetric downsampling and SegViT shrunk vs DToP\n" + comparison_table(result["rows"], TABLE1))
    print("\nTable 2: Expedite-ViT vs DToP\n" + comparison_table(result["rows"], TABLE2))
    print(f"\nwritten: {Path(args.out) / 'compare.json'}, table1.md, table2.md")


APP = App("compare", "the supplement's tables: DToP vs symmetric downsampling, SegViT shrunk and Expedite-ViT, "
                     "fine-tuned from one dense checkpoint", add_arguments, run)
