"""The supplement's comparisons (DESIGN.md sections 5 and 6) on a user's own model and data.

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

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import ExperimentConfig, save_config
from ..errors import ConfigError
from ..models.config import REDUCTIONS, ReductionSpec

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
    from ..checkpoint import load_checkpoint

    return path.is_file() and int(load_checkpoint(path)["iter"]) >= iters


def run_compare(cfg: ExperimentConfig, dense_checkpoint: str, out_dir: Path, methods: Sequence[str] = METHODS,
                p0s: Optional[Sequence[float]] = None, specs: Optional[dict[str, ReductionSpec]] = None,
                verbose: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate and tabulate; returns the ``compare.json`` content."""
    from ..checkpoint import load_model
    from .common import build_dataset, progress_enabled, resolve_device
    from .evaluate import evaluate, write_results
    from .train import LAST, train

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not Path(dense_checkpoint).is_file():
        raise ConfigError(f"dense checkpoint not found: {dense_checkpoint}")
    specs = dict(specs or {})
    for m in methods:
        if m in REDUCTIONS:
            specs.setdefault(m, ReductionSpec(m))
    p0s = list(p0s if p0s is not None else cfg.eval.p0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    # 1. fine-tune what needs it (a rerun resumes an unfinished run and skips a finished one)
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
            train(c, resume=(run_dir / LAST).is_file())
        checkpoints[m] = str(run_dir / LAST)

    # 2. evaluate every method on the same images
    device = resolve_device(cfg.train.device)
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    rows: list[dict[str, Any]] = []

    def run(name: str, model, dense: bool, p0: Optional[float], method: str) -> None:
        metrics, per_image = evaluate(model, dataset, cfg.eval, device, dense=dense, progress=progress_enabled(),
                                      desc=name)
        metrics["checkpoint"] = checkpoints.get(method, dense_checkpoint)
        write_results(out_dir / "eval" / name, metrics, per_image, cfg)
        rows.append({"name": name, "method": method, "label": LABELS[method], "p0": p0,
                     "miou": metrics["miou"], "gflops": metrics["gflops"],
                     "trained": method not in TRAINING_FREE and method != "dense",
                     "checkpoint": checkpoints.get(method, dense_checkpoint)})
        if verbose:
            print(f"{name}: mIoU {metrics['miou']:.2f}, GFLOPs {metrics['gflops']:.3f}", flush=True)

    run("dense", load_model(dense_checkpoint, device), True, None, "dense")
    for m in methods:
        if m == "dense_ft":
            run(m, load_model(checkpoints[m], device), True, None, m)
        elif m == "dtop":
            model = load_model(checkpoints[m], device)
            for p in p0s:
                model.set_p0(float(p))
                run(f"dtop_p0_{p:g}", model, False, float(p), "dtop")
        else:
            run(m, load_model(checkpoints[m], device, reduction=specs[m]), False, None, m)

    base = rows[0]
    for r in rows:
        r["gflops_reduction_pct"] = round(100 * (1 - r["gflops"] / base["gflops"]), 2)
        r["miou_delta"] = round(r["miou"] - base["miou"], 3)
    result = {"dense_checkpoint": dense_checkpoint, "iters": cfg.train.iters, "p0": p0s,
              "reductions": {m: asdict(s) for m, s in specs.items()}, "rows": rows, "config": cfg.to_dict()}
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1))
    for n, kinds in ((1, TABLE1), (2, TABLE2)):
        (out_dir / f"table{n}.md").write_text(comparison_table(rows, kinds) + "\n")
    return result


def comparison_table(rows: list[dict[str, Any]], kinds: Sequence[str]) -> str:
    """Method, GFLOPs, mIoU (Table-1/Table-2 style): the dense rows, the given alternatives, then DToP."""
    picked = [r for r in rows if r["method"] in ("dense", "dense_ft")] + \
        [r for r in rows if r["method"] in kinds] + [r for r in rows if r["method"] == "dtop"]
    out = ["| method | fine-tuned | GFLOPs | GFLOPs saved | mIoU | mIoU vs dense |", "|---|---|---|---|---|---|"]
    for r in picked:
        label = r["label"] + (f" (p0 {r['p0']:g})" if r["p0"] is not None else "")
        tuned = "yes" if r["trained"] else ("no" if r["method"] != "dense" else "")
        out.append(f"| {label} | {tuned} | {r['gflops']:.3f} | {r['gflops_reduction_pct']:.1f}% | {r['miou']:.2f} | "
                   f"{r['miou_delta']:+.2f} |")
    return "\n".join(out)
