"""``dtop predict``: segment image files with a checkpoint; per image a colour segmentation, an overlay,
an exit-stage map, and the image's GFLOPs against the dense model's.

Every output goes to ``out_dir``: ``<stem>_seg.png``, ``<stem>_overlay.png``, ``<stem>_exits.png``,
and ``predictions.json`` / ``predictions.csv`` (one row per image; unreadable files are listed as
errors and the others still run).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..config import ExperimentConfig, config_from_dict
from ..data import EvalTransform, image_files, read_image
from ..data.transforms import normalize, resize_image
from ..data.meta import named_display_meta, trained_display_meta
from ..engine.common import normalisation, progress_enabled, resolve_device
from ..engine.evaluate import predict
from ..errors import ConfigError, InputError, Interrupted, deferred_interrupts
from ..jsonio import write_json
from ..models import DToPSegmentor, load_model
from ..models.packed import use_linear_kernel
from ..viz import class_legend, colorize, exit_map_figure, overlay, present_classes
from .common import (App, add_allocator, add_exit_options, add_linear, apply_exit_setting, check_out_folder, exit_setting,
                     note_no_exit, set_allocator)


def stage_names(model) -> list[str]:
    """``stage s (block b)`` for each stage head, 1-based stages as figures show them."""
    return [f"stage {s + 1} (block {b})" for s, b in enumerate(model.stage_blocks)]


def _warn(message: str) -> None:
    print(f"dtop predict: error: {message} (going on with the others)", file=sys.stderr)


class PredictTransform:
    """How ``predict`` sizes an image for the model, then normalises it: ``size`` (H, W) exactly, or the longer
    side brought down to ``max_side`` (keeping the aspect ratio, never enlarging), or ``scale`` (mmsegmentation's
    keep-ratio rescale, the config's ``data.eval_scale``). The results come back at the image's own size.
    ``__call__(image uint8 (H, W, 3)) -> (FloatTensor (3, h, w), None)``."""

    def __init__(self, size: Optional[Sequence[int]], max_side: Optional[int], scale: Optional[Sequence[int]],
                 mean, std) -> None:
        self.size, self.max_side, self.mean, self.std = size, max_side, mean, std
        self.scaled = EvalTransform(scale=tuple(scale) if scale else None, mean=mean, std=std)

    def __call__(self, rgb: np.ndarray) -> tuple[torch.Tensor, None]:
        H, W = rgb.shape[:2]
        if self.size is not None:
            return normalize(resize_image(rgb, tuple(self.size)), self.mean, self.std), None
        if self.max_side is not None:
            f = min(1.0, self.max_side / max(H, W))
            return normalize(resize_image(rgb, (max(1, round(H * f)), max(1, round(W * f)))), self.mean, self.std), None
        return self.scaled(rgb)


def default_scale(cfg: ExperimentConfig) -> Optional[list[int]]:
    """``data.eval_scale``, else one taken from the training crop as mmsegmentation's test scales are (ADE20K:
    crop 512, scale (2048, 512)): the shorter side at the crop's shorter side, the longer at most 4x the crop's
    longer side. None without either (full resolution)."""
    if cfg.data.eval_scale:
        return list(cfg.data.eval_scale)
    crop = cfg.data.crop_size
    return [4 * max(crop), min(crop)] if crop else None


def _warn_skipped(skipped: list[Path]) -> None:
    """One warning line naming the subfolders and non-image files the folders held and predict left out."""
    if not skipped:
        return
    dirs = [str(p) for p in skipped if p.is_dir()]
    other = [str(p) for p in skipped if not p.is_dir()]

    def some(items: list[str]) -> str:
        return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

    parts = ([f"{len(dirs)} subfolder(s) (add --recursive to search them): {some(dirs)}"] if dirs else []) + \
        ([f"{len(other)} file(s) that are not images: {some(other)}"] if other else [])
    print("dtop predict: warning: skipped " + "; ".join(parts), file=sys.stderr)


def check_sizing(size, max_side, alpha: float) -> None:
    """ConfigError for a ``--size`` that is not two positive integers, a ``--max-side`` below 1, both at once,
    or an ``--alpha`` outside [0, 1]."""
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ConfigError(f"--size takes two positive integers H W, got {size}")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"--max-side must be a positive number of pixels, got {max_side}")
    if size is not None and max_side is not None:
        raise ConfigError("--size fixes both sides, --max-side the longer one: give one")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--alpha is the overlay's opacity in [0, 1], got {alpha}")


def predict_image(model, cfg: ExperimentConfig, transform, rgb: np.ndarray, device) -> dict[str, Any]:
    """One image (H, W, 3) uint8 -> its label map and exit-stage map at (H, W) and its GFLOPs."""
    x, _ = transform(rgb)
    pred = predict(model, x.to(device), cfg.eval)
    H, W = rgb.shape[:2]
    return {"label": pred.label_map((H, W)).numpy(), "exits": pred.exit_stages((H, W)).numpy(),
            "gflops": pred.gflops, "dense_gflops": pred.dense_gflops, "exit_fractions": pred.exit_fractions}


def write_image(path: Path, stem: str, rgb: np.ndarray, p: dict[str, Any], out_dir: Path, colours, classes,
                names: list[str], alpha: float) -> dict[str, Any]:
    """The four PNGs of one image (segmentation, overlay, exit map, the legend of the classes it shows);
    returns its row of ``predictions.json``."""
    colour = colorize(p["label"], colours, None)
    Image.fromarray(colour).save(out_dir / f"{stem}_seg.png")
    Image.fromarray(overlay(rgb, colour, alpha)).save(out_dir / f"{stem}_overlay.png")
    class_legend(classes, colours, out_dir / f"{stem}_legend.png",
                 include=present_classes(p["label"], num_classes=len(classes)))
    reduction = 100 * (1 - p["gflops"] / p["dense_gflops"])
    exit_map_figure(p["exits"], names, out_dir / f"{stem}_exits.png", image=rgb,
                    title=f"{path.name}: {p['gflops']:.2f} GFLOPs, {vs_dense(reduction)}")
    H, W = rgb.shape[:2]
    present = np.bincount(p["label"].ravel(), minlength=len(classes)) / p["label"].size
    return {"file": str(path), "stem": stem, "height": H, "width": W, "gflops": round(p["gflops"], 4),
            "dense_gflops": round(p["dense_gflops"], 4), "reduction_pct": round(reduction, 2),
            **{f"exit_s{s}": round(float(f), 4) for s, f in enumerate(p["exit_fractions"])},
            "top_classes": ", ".join(f"{classes[c]} {100 * present[c]:.0f}%"
                                     for c in np.argsort(-present)[:3] if present[c] > 0)}


def display_colours(palette: Optional[str], num_classes: int, cfg: ExperimentConfig,
                    recorded: Optional[dict[str, Any]]) -> tuple[list, list[str]]:
    """Colours and class names of the model's outputs: ``palette`` (``--palette``, a dataset name; ConfigError
    when unknown or with fewer classes than the model, a warning when it has more); else the classes and colours
    recorded at training (or, in older checkpoints, the config's folder palette, else its dataset's table)."""
    if not palette:
        return trained_display_meta(cfg.to_dict()["data"], num_classes, recorded)
    colours, classes, note = named_display_meta(palette, num_classes)
    if note:
        print(f"dtop predict: warning: {note}", file=sys.stderr)
    return colours, classes


def vs_dense(reduction_pct: float) -> str:
    """``"31.2% fewer than dense"``, or ``"4.0% more than dense"`` when the auxiliary heads cost more than the
    exits save (an untrained model, a tiny image)."""
    word = "fewer" if reduction_pct >= 0 else "more"
    return f"{abs(reduction_pct):.1f}% {word} than dense"


def _predict_model(checkpoint: str, dev, p0: Optional[float], budget: Optional[dict], linear: str, compile: bool):
    """The checkpoint's model on ``dev`` with the exit rule asked for (``p0``, ``budget``), its linear kernel,
    compiled if asked; a warning for a ``p0`` a token-reduction model cannot use, a note when nothing can exit."""
    model = load_model(checkpoint, dev).eval()
    use_linear_kernel(model, "aten" if compile else linear, dev)
    if compile:
        model.compile()
    if p0 is not None and isinstance(model, DToPSegmentor):
        model.set_p0(p0)
    elif p0 is not None:
        print(f"dtop predict: warning: --p0 has no effect: {checkpoint} runs the {model.reducer.kind} token "
              f"reduction, not early exit", file=sys.stderr)
    apply_exit_setting(model, budget, "dtop predict")
    note_no_exit(model, "dtop predict")
    return model


def predict_paths(checkpoint: str, inputs: Sequence[str], out_dir: Path, p0: Optional[float] = None,
                  palette: Optional[str] = None, device: str = "auto", alpha: float = 0.5,
                  progress: bool = False, linear: str = "auto", compile: bool = False,
                  budget: Optional[dict] = None, size: Optional[Sequence[int]] = None,
                  max_side: Optional[int] = None, recursive: bool = False) -> dict[str, Any]:
    """Run the checkpoint on every image; returns the ``predictions.json`` content. Ctrl-C (or SIGTERM under
    the CLI): :class:`~dtop.errors.Interrupted`, the images done listed in a partial ``predictions.json``.
    ``linear``: the linear kernel for fp32 CPU inference (:func:`dtop.models.packed.use_linear_kernel`);
    ``compile``: torch.compile the blocks and heads (:meth:`~dtop.models.Segmentor.compile`; torch's linear);
    ``budget``: the budget exit rule (:func:`dtop.apps.common.exit_setting`), instead of the checkpoint's rule;
    ``size`` (H, W) / ``max_side``: how the model sees each image (:class:`PredictTransform`; default the
    config's ``data.eval_scale``, else :func:`default_scale`); ``recursive``: search folders' subfolders.
    ConfigError for bad sizes or an ``alpha`` outside [0, 1]."""
    check_sizing(size, max_side, alpha)
    check_out_folder(out_dir)
    state = load_checkpoint(checkpoint)
    cfg, recorded = config_from_dict(state.get("config") or {}), state.get("dataset")
    del state  # the weights are loaded again by load_model
    dev = resolve_device(device)
    model = _predict_model(checkpoint, dev, p0, budget, linear, compile)
    dtop_model = isinstance(model, DToPSegmentor)
    colours, classes = display_colours(palette, model.num_classes, cfg, recorded)
    mean, std = normalisation(cfg)
    transform = PredictTransform(size, max_side, default_scale(cfg), mean, std)
    skipped: list[Path] = []
    files, errors = image_files(inputs, recursive=recursive, skipped=skipped)
    for e in errors:
        _warn(f"{e['file']}: {e['error']}")
    _warn_skipped(skipped)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, rows, used = stage_names(model), [], set()
    result = {"checkpoint": str(checkpoint), "p0": model.p0 if dtop_model and model.exit_mode == "threshold" else None,
              **({"exit_mode": model.exit_mode, "exit_ratio": model.exit_ratio, "p_min": model.p_min}
                 if dtop_model and model.exit_mode == "budget" else {}),
              "stages": names, "images": rows, "errors": errors, "config": cfg.to_dict()}
    try:
        for path in tqdm(files, desc="predict", disable=not progress):
            try:
                rgb = read_image(path)
            except InputError as e:
                errors.append({"file": str(path), "error": str(e)})
                _warn(str(e))
                continue
            stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"  # same name, other folder
            while stem in used:
                stem += "_"
            used.add(stem)
            p = predict_image(model, cfg, transform, rgb, dev)
            with deferred_interrupts():  # an image's PNGs and its row, or none of them
                rows.append(write_image(path, stem, rgb, p, out_dir, colours, classes, names, alpha))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under the CLI
        raise _interrupted(e, out_dir, result, len(files)) from e
    with deferred_interrupts():  # predictions.json and .csv together
        _write_tables(out_dir, result)
    return result


def _interrupted(exc: BaseException, out_dir: Path, result: dict[str, Any], total: int) -> Interrupted:
    """The interruption ``exc`` with what was done: the images finished so far keep their PNGs and are
    listed in ``predictions.json``/``.csv``, written with ``"interrupted": true`` (none finished: nothing)."""
    done = len(result["images"])
    if not done:
        return Interrupted.wrap(exc, f"stopped at the first of {total} images; nothing written")
    try:
        with deferred_interrupts():  # a second signal waits for the tables
            _write_tables(out_dir, {**result, "interrupted": True})
    except KeyboardInterrupt:
        pass
    return Interrupted.wrap(exc, f"{done} of {total} images written to {out_dir}, listed in its predictions.json "
                                 f"(partial, \"interrupted\": true)")


def _write_tables(out_dir: Path, result: dict[str, Any]) -> None:
    write_json(out_dir / "predictions.json", result)
    rows = result["images"]
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("checkpoint")
    sp.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--p0", type=float, default=None, help="exit threshold (default: the checkpoint's)")
    sp.add_argument("--palette", default=None,
                    help="dataset whose colours to use (ade20k, pascal_context59, coco_stuff10k, cityscapes, "
                         "camvid, ...; default: the checkpoint's dataset)")
    sp.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the segmentation, in [0, 1]")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                    help="resize every image to H x W for the model (results come back at the image's size)")
    sp.add_argument("--max-side", type=int, default=None,
                    help="bring the longer side down to this many pixels for the model (keeps the aspect ratio; "
                         "default: the config's eval_scale, else one from the training crop)")
    sp.add_argument("--recursive", action="store_true", help="also search the subfolders of the folders given")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--compile", action="store_true", help="torch.compile the blocks and heads (dynamic shapes)")
    add_exit_options(sp)
    add_allocator(sp)
    add_linear(sp)


def run(args: argparse.Namespace) -> int:
    set_allocator(args)
    if args.p0 is not None and (args.exit_mode == "budget" or args.exit_ratio is not None):
        raise ConfigError("--p0 sets the threshold rule; --exit-ratio / --exit-mode budget the budget rule: give one")
    result = predict_paths(args.checkpoint, args.inputs, Path(args.out), p0=args.p0, palette=args.palette,
                           device=args.device, alpha=args.alpha, progress=progress_enabled(), linear=args.linear,
                           compile=args.compile, budget=exit_setting(args), size=args.size,
                           max_side=args.max_side, recursive=args.recursive)
    for r in result["images"]:
        exits = " / ".join(f"{100 * r[f'exit_s{s}']:.0f}%" for s in range(len(result["stages"])))
        print(f"{r['file']}: {r['gflops']:.2f} GFLOPs ({vs_dense(r['reduction_pct'])}), "
              f"tokens leaving per stage {exits}")
    print(f"{len(result['images'])} image(s) written to {args.out}" +
          (f"; {len(result['errors'])} could not be read" if result["errors"] else ""))
    return 1 if result["errors"] else 0  # finished, but some inputs failed


APP = App("predict", "segment images: colour map, overlay, exit-stage map, GFLOPs per image", add_arguments, run)
