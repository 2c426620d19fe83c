"""The ``dtop`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import DToPError

COMPARE_METHODS = ("dtop", "dense_ft", "conv", "avgpool", "nearest", "shrunk", "expedite")  # dtop.engine.compare


def parse_reduction(text: Optional[str]):
    """``KIND[,key=value...]`` -> a ReductionSpec, e.g. ``expedite,block=5,cluster_scale=0.75``."""
    if not text:
        return None
    import yaml

    from .errors import ConfigError
    from .models.config import reduction_from_dict

    kind, *pairs = text.split(",")
    d: dict = {"kind": kind.strip()}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--reduction: expected key=value after the kind, got {pair!r}")
        key, value = pair.split("=", 1)
        d[key.strip()] = yaml.safe_load(value)
    return reduction_from_dict(d)


def _set_allocator(args: argparse.Namespace) -> bool:
    """``--allocator keep`` (the default of the latency commands): see :func:`dtop.engine.common.keep_freed_memory`."""
    from .engine.common import keep_freed_memory

    return args.allocator == "keep" and keep_freed_memory()


def _add_allocator(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--allocator", choices=["keep", "system"], default="keep",
                    help="keep: glibc keeps freed memory for the next forward instead of returning it to the OS "
                         "and faulting it in again (faster on Linux CPUs; resident memory stays at its peak); "
                         "system: the C library's defaults")


def _add_linear(sp: argparse.ArgumentParser) -> None:
    from .models.packed import LINEAR_KERNELS

    sp.add_argument("--linear", choices=LINEAR_KERNELS, default="auto",
                    help="linear layers in fp32 CPU inference: onednn packs the weights once for oneDNN "
                         "(faster, above all on few tokens); aten is torch's default (MKL sgemm); "
                         "auto: onednn on CPU where this torch has it")


def _cmd_models(args: argparse.Namespace) -> None:
    from .models import get_config, list_models

    for name in list_models():
        cfg = get_config(name)
        stages = ", ".join(f"{s.head}@{s.block}" for s in cfg.stages)
        print(f"{name:20s} {cfg.backbone:24s} cls={cfg.cls_mode:9s} p0={cfg.p0} stages: {stages}")


def _cmd_flops(args: argparse.Namespace) -> None:
    from .flops import preset_gflops

    spec = parse_reduction(args.reduction)
    g = preset_gflops(args.name, tuple(args.size), args.num_classes, args.final_head_only, aux_head=args.aux_head,
                      reduction=spec)
    result = {"model": args.name, "size": list(args.size), "num_classes": args.num_classes,
              "final_head_only": args.final_head_only, "reduction": args.reduction, "gflops": round(g, 4)}
    if args.json:
        print(json.dumps(result))
    else:
        heads = "final head only" if args.final_head_only else "all stage heads"
        what = f"with {args.reduction}" if args.reduction else "dense"
        print(f"{args.name} at {args.size[0]}x{args.size[1]}, {args.num_classes} classes, {heads}: "
              f"{g:.2f} GFLOPs ({what})")


def paper_table_rows() -> list[dict]:
    from .flops import PAPER_TABLE, preset_gflops

    rows = []
    for name, crop, k, fho, ref in PAPER_TABLE:
        g = preset_gflops(name, (crop, crop), k, fho)
        rows.append({"model": name, "crop": crop, "num_classes": k, "final_head_only": fho,
                     "gflops": round(g, 2), "paper": ref, "diff_pct": round(100 * (g - ref) / ref, 2)})
    return rows


def _cmd_paper_table(args: argparse.Namespace) -> None:
    rows = paper_table_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("Dense GFLOPs of the paper's models (analytic count, fvcore convention), vs DESIGN.md section 4\n")
    print(f"| {'model':18s} | heads counted   | crop | classes | GFLOPs | paper | diff   |")
    print(f"|{'-' * 20}|-----------------|------|---------|--------|-------|--------|")
    for r in rows:
        heads = "final head only" if r["final_head_only"] else "all 3 ATM heads"
        print(f"| {r['model']:18s} | {heads} | {r['crop']:4d} | {r['num_classes']:7d} | {r['gflops']:6.1f} |"
              f" {r['paper']:5.1f} | {r['diff_pct']:+5.2f}% |")


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .engine import train

    cfg = load_config(args.config, args.set)
    path = train(cfg, resume=args.resume)
    print(f"checkpoint: {path}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .config import load_config
    from .engine import run_evaluation, summary_table

    cfg = load_config(args.config, args.set)
    p0s = args.p0 if args.p0 is not None else cfg.eval.p0
    rows = run_evaluation(cfg, args.checkpoint, p0s, with_dense=not args.no_dense, out_dir=args.out,
                          dense_checkpoint=args.dense_checkpoint, reduction=parse_reduction(args.reduction))
    print("\n" + summary_table(rows))
    if args.figures:
        from .engine.evaluate import eval_dir
        from .viz import build_report

        print(f"report: {build_report(eval_dir(args.checkpoint, args.out), device=cfg.train.device)}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.common import progress_enabled
    from .engine.infer import predict_paths

    _set_allocator(args)
    result = predict_paths(args.checkpoint, args.inputs, Path(args.out), p0=args.p0, palette=args.palette,
                           device=args.device, alpha=args.alpha, progress=progress_enabled(), linear=args.linear)
    for r in result["images"]:
        exits = " / ".join(f"{100 * r[f'exit_s{s}']:.0f}%" for s in range(len(result["stages"])))
        print(f"{r['file']}: {r['gflops']:.2f} GFLOPs ({r['reduction_pct']:.1f}% fewer than dense), "
              f"tokens leaving per stage {exits}")
    print(f"{len(result['images'])} image(s) written to {args.out}" +
          (f"; {len(result['errors'])} could not be read" if result["errors"] else ""))
    return 1 if result["errors"] else 0


def _cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .viz import build_report

    path = build_report(Path(args.run_dir), Path(args.out) if args.out else None, p0=args.p0,
                        num_images=args.images, device=args.device, max_width=args.max_width)
    print(f"report: {path}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import load_config
    from .engine.compare import TABLE1, TABLE2, comparison_table, run_compare

    cfg = load_config(args.config, args.set)
    specs = {s.kind: s for s in (parse_reduction(r) for r in args.reduction)}
    result = run_compare(cfg, args.checkpoint, Path(args.out), methods=args.methods, p0s=args.p0, specs=specs)
    print("\nTable 1: symmetric downsampling and SegViT shrunk vs DToP\n" + comparison_table(result["rows"], TABLE1))
    print("\nTable 2: Expedite-ViT vs DToP\n" + comparison_table(result["rows"], TABLE2))
    print(f"\nwritten: {Path(args.out) / 'compare.json'}, table1.md, table2.md")


def _cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import load_images, run_bench
    from .engine.common import resolve_device
    from .errors import ConfigError
    from .models.packed import use_linear_kernel
    from .pruning.execution import default_path

    device = resolve_device(args.device)
    kept = _set_allocator(args)
    torch.manual_seed(0)
    if args.checkpoint:
        from .checkpoint import load_model

        if not args.images:
            raise ConfigError("--checkpoint needs --images DIR (real images to prune)")
        model = load_model(args.checkpoint)
        if args.p0 is not None:
            model.set_p0(args.p0)
        images = load_images(args.images, tuple(args.size), args.batch)
        fractions = None
    else:
        from .models import create_model

        images = torch.randn(args.batch, 3, *args.size)
        n = args.batch
        heads_decide = args.p0 is not None and args.exit_fractions is None  # the untrained heads, at this p0
        model = create_model(args.name, num_classes=args.num_classes, p0=args.p0 if heads_decide else 0.5)
        fractions = None if heads_decide else (
            args.exit_fractions or [0.1 + 0.6 * i / max(1, n - 1) for i in range(n)])
    linear = use_linear_kernel(model, args.linear, device)
    paths = args.paths or [default_path(device)] + [p for p in ("per_image", "packed", "padded") if p != default_path(device)]
    result = run_bench(model, images, args.batch, paths, device, getattr(torch, args.dtype), args.warmup,
                       args.repeats, fractions, bucket=args.bucket)
    result["model"] = args.checkpoint or args.name
    result["allocator"] = "keep" if kept else "system"
    result["linear"] = linear
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} at {args.size[0]}x{args.size[1]}, batch {args.batch}, {result['device']}, "
          f"{result['dtype']}, {result['threads']} threads, allocator {result['allocator']}, linear {result['linear']}")
    print(f"GFLOPs/image: dense {result['gflops_dense']}, DToP {result['gflops_dtop']} "
          f"(ratio {result['flop_ratio']}); exit fractions {result['exit_fractions']}")
    print(f"peak memory (mixed batch): dense {result['peak_mem_dense_mb']} MB")
    print("| path | time ratio b1 | time ratio mixed | realised b1 | realised mixed | peak MB |")
    print("|---|---|---|---|---|---|")
    for p, e in result["paths"].items():
        print(f"| {p} | {e['time_ratio_batch1']} | {e['time_ratio_mixed']} | {e['realised_batch1']} | "
              f"{e['realised_mixed']} | {e['peak_mem_dtop_mb']} |")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, fast=args.fast)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtop", description="Dynamic token pruning for plain-ViT segmentation")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("models", help="list the model presets")
    sp.set_defaults(func=_cmd_models)

    sp = sub.add_parser("flops", help="dense GFLOPs of a preset (fvcore convention, batch 1)")
    sp.add_argument("name", help="preset name (dtop models)")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=[512, 512])
    sp.add_argument("--num-classes", type=int, default=150)
    sp.add_argument("--final-head-only", action="store_true", help="count the final head, not the auxiliary ones")
    sp.add_argument("--aux-head", choices=["atm", "mask", "linear"], default=None,
                    help="auxiliary head type of segmenter_* presets (default atm)")
    sp.add_argument("--reduction", default=None, metavar="KIND[,key=value...]",
                    help="count a token-reduction alternative: conv, avgpool, nearest, shrunk or expedite")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_flops)

    sp = sub.add_parser("paper-table", help="dense GFLOPs of the paper's models next to the paper's figures")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_paper_table)

    sp = sub.add_parser("train", help="train from a YAML config")
    sp.add_argument("config")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sp.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("eval", help="evaluate a checkpoint: dense and DToP at each p0")
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
    sp.add_argument("--figures", action="store_true", help="also write the figures and report.html (dtop report)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(func=_cmd_eval)

    sp = sub.add_parser("predict", help="segment images: colour map, overlay, exit-stage map, GFLOPs per image")
    sp.add_argument("checkpoint")
    sp.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--p0", type=float, default=None, help="exit threshold (default: the checkpoint's)")
    sp.add_argument("--palette", default=None,
                    help="dataset whose colours to use (ade20k, pascal_context59, coco_stuff10k, cityscapes, "
                         "camvid, ...; default: the checkpoint's dataset)")
    sp.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the segmentation")
    sp.add_argument("--device", default="auto")
    _add_allocator(sp)
    _add_linear(sp)
    sp.set_defaults(func=_cmd_predict)

    sp = sub.add_parser("report", help="figures and report.html from a dtop eval or dtop compare output folder")
    sp.add_argument("run_dir")
    sp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    sp.add_argument("--p0", type=float, default=None, help="the DToP variant to picture (default: nearest 0.9)")
    sp.add_argument("--images", type=int, default=4, help="rows of Figure 1")
    sp.add_argument("--max-width", type=int, default=None, metavar="PX",
                    help="scale the figures down to this width with a 256-colour palette (small files)")
    sp.add_argument("--device", default="auto")
    sp.set_defaults(func=_cmd_report)

    sp = sub.add_parser("compare", help="the supplement's tables: DToP vs symmetric downsampling, SegViT shrunk "
                                        "and Expedite-ViT, fine-tuned from one dense checkpoint")
    sp.add_argument("config", help="the experiment config; its train section is the fine-tuning schedule")
    sp.add_argument("--checkpoint", required=True, help="the trained dense checkpoint every method starts from")
    sp.add_argument("--out", required=True, help="output folder (train/, eval/, compare.json, table1.md, table2.md)")
    sp.add_argument("--methods", nargs="+", default=list(COMPARE_METHODS), choices=list(COMPARE_METHODS),
                    help="dense_ft: the dense model fine-tuned with the same schedule (a control for the extra "
                         "iterations); default: all")
    sp.add_argument("--p0", type=float, nargs="+", default=None, help="DToP thresholds (default: eval.p0)")
    sp.add_argument("--reduction", action="append", default=[], metavar="KIND[,key=value...]",
                    help="settings of an alternative, e.g. expedite,cluster_scale=0.5 (repeatable)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sp.set_defaults(func=_cmd_compare)

    sp = sub.add_parser("bench", help="wall-clock dense vs DToP: batch-1 latency, mixed-batch throughput, memory")
    sp.add_argument("name", nargs="?", default="segvit_vit_b16", help="preset (ignored with --checkpoint)")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=[512, 512])
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--num-classes", type=int, default=150)
    sp.add_argument("--checkpoint", help="a trained dtop checkpoint: prune real images at its p0")
    sp.add_argument("--images", help="folder of images for --checkpoint")
    sp.add_argument("--p0", type=float, default=None,
                    help="exit threshold: with --checkpoint, instead of the checkpoint's; without, the "
                         "(untrained) heads decide instead of --exit-fractions (--p0 1: nothing can exit, "
                         "the auxiliary heads are skipped)")
    sp.add_argument("--exit-fractions", type=float, nargs="+", default=None,
                    help="forced per-image fractions of tokens leaving at the first exit stage "
                         "(default: a spread 0.1 ... 0.7 across the batch)")
    sp.add_argument("--paths", nargs="+", choices=["per_image", "padded", "packed"], default=None,
                    help="execution layouts to measure (default: all, the device's default first)")
    sp.add_argument("--bucket", action="store_true", help="padded layout: bucket images by kept length")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--json", action="store_true")
    _add_allocator(sp)
    _add_linear(sp)
    sp.set_defaults(func=_cmd_bench)

    sp = sub.add_parser("demo", help="train a tiny model on synthetic scenes, fine-tune with DToP, evaluate")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--fast", action="store_true", help="a seconds-long version (for tests)")
    sp.set_defaults(func=_cmd_demo)
    return p


def _last_line(message: str) -> str:
    """DataLoader workers re-raise our errors with the worker's traceback prepended; keep our message."""
    if "Traceback" in message:
        tail = message.strip().splitlines()[-1]
        return tail.split(": ", 1)[1] if ": " in tail else tail
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0  # a command returns 1 when it finished but some inputs failed
    except DToPError as e:
        print(f"dtop {args.command}: error: {_last_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
