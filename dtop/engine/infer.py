"""``dtop predict``: segment image files with a checkpoint; per image a colour segmentation, an overlay,
an exit-stage map, and the image's GFLOPs against the dense model's.

Every output goes to ``out_dir``: ``<stem>_seg.png``, ``<stem>_overlay.png``, ``<stem>_exits.png``,
and ``predictions.json`` / ``predictions.csv`` (one row per image; unreadable files are listed as
errors and the others still run).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import InputError


def image_files(inputs: Sequence[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named or found (not recursively) in the folders named, in order; missing paths as errors."""
    readable = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in readable)
            if not found:
                errors.append({"file": str(p), "error": "no image files in this folder"})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"file": str(p), "error": "no such file or folder"})
    return files, errors


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from any file Pillow reads; InputError naming the file otherwise."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def stage_names(model) -> list[str]:
    return [f"stage {s + 1} (block {b})" for s, b in enumerate(model.stage_blocks)]


def palette_for(model, name: Optional[str]) -> tuple[list, list[str]]:
    """The named dataset's palette and classes, or distinct colours when the dataset has none."""
    from ..data.meta import dataset_meta, default_palette
    from ..errors import ConfigError

    K = model.num_classes
    if name:
        try:
            meta = dataset_meta(name)
        except ConfigError:
            meta = None
        if meta is not None and len(meta.palette) >= K:
            return list(meta.palette[:K]), list(meta.classes[:K])
    return default_palette(K), [str(k) for k in range(K)]


def predict_paths(checkpoint: str, inputs: Sequence[str], out_dir: Path, p0: Optional[float] = None,
                  palette: Optional[str] = None, device: str = "auto", alpha: float = 0.5,
                  progress: bool = False, linear: str = "auto") -> dict[str, Any]:
    """Run the checkpoint on every image; returns the ``predictions.json`` content.
    ``linear``: the linear kernel for fp32 CPU inference (:func:`dtop.models.packed.use_linear_kernel`)."""
    from ..checkpoint import load_checkpoint, load_model
    from ..config import config_from_dict
    from ..data import EvalTransform
    from ..models.packed import use_linear_kernel
    from ..viz.colors import colorize, overlay
    from ..viz.figures import exit_map_figure
    from .common import resolve_device
    from .evaluate import predict

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt.get("config") or {})
    dev = resolve_device(device)
    model = load_model(checkpoint, dev).eval()
    use_linear_kernel(model, linear, dev)
    if p0 is not None:
        model.set_p0(p0)
    colours, classes = palette_for(model, palette or cfg.data.name)
    transform = EvalTransform(scale=tuple(cfg.data.eval_scale) if cfg.data.eval_scale else None,
                              mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    files, errors = image_files(inputs)
    for e in errors:
        print(f"dtop predict: error: {e['file']}: {e['error']} (going on with the others)", file=sys.stderr)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = stage_names(model)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for path in tqdm(files, desc="predict", disable=not progress):
        try:
            rgb = read_rgb(path)
        except InputError as e:
            errors.append({"file": str(path), "error": str(e)})
            print(f"dtop predict: error: {e} (going on with the others)", file=sys.stderr)
            continue
        x, _ = transform(rgb)
        pred = predict(model, x.to(dev), cfg.eval)
        H, W = rgb.shape[:2]
        label, exits = pred.label_map((H, W)).numpy(), pred.exit_stages((H, W)).numpy()
        stem = path.stem
        while stem in used:
            stem += "_"
        used.add(stem)
        colour = colorize(label, colours, None)
        Image.fromarray(colour).save(out_dir / f"{stem}_seg.png")
        Image.fromarray(overlay(rgb, colour, alpha)).save(out_dir / f"{stem}_overlay.png")
        reduction = 100 * (1 - pred.gflops / pred.dense_gflops)
        exit_map_figure(exits, names, out_dir / f"{stem}_exits.png", image=rgb,
                        title=f"{path.name}: {pred.gflops:.2f} GFLOPs, {reduction:.1f}% fewer than dense")
        present = np.bincount(label.ravel(), minlength=len(classes)) / label.size
        rows.append({"file": str(path), "stem": stem, "height": H, "width": W, "gflops": round(pred.gflops, 4),
                     "dense_gflops": round(pred.dense_gflops, 4), "reduction_pct": round(reduction, 2),
                     **{f"exit_s{s}": round(float(f), 4) for s, f in enumerate(pred.exit_fractions)},
                     "top_classes": ", ".join(f"{classes[c]} {100 * present[c]:.0f}%"
                                              for c in np.argsort(-present)[:3] if present[c] > 0)})
    result = {"checkpoint": str(checkpoint), "p0": model.p0, "stages": names, "images": rows, "errors": errors,
              "config": cfg.to_dict()}
    (out_dir / "predictions.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
    return result

