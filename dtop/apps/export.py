"""``dtop export CKPT --format onnx``: the model with static shapes for serving (:mod:`dtop.engine.export`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..config import config_from_dict
from ..data import read_image
from ..data.transforms import normalize, resize_image
from ..engine.common import normalisation
from ..engine.export import FORMATS, export_onnx, max_difference, save_program
from ..errors import ConfigError
from ..flops import check_size
from ..models import DToPSegmentor, load_model
from .common import App, add_exit_options, apply_exit_setting, exit_setting


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("checkpoint")
    sp.add_argument("--format", choices=FORMATS, default="onnx",
                    help="onnx: an ONNX file (onnxruntime, TensorRT, ...); torch: a torch.export program (.pt2)")
    sp.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                    help="the input size the graph is fixed to, whole patches (default: the training crop, "
                         "rounded up to whole patches)")
    sp.add_argument("--batch", type=int, default=1, help="images per call, fixed in the graph")
    sp.add_argument("--dense", action="store_true", help="export the plain model (every block, final head only)")
    sp.add_argument("--out", default=None, help="output file (default: beside the checkpoint, model.onnx / model.pt2)")
    sp.add_argument("--check", default=None, metavar="IMAGE",
                    help="an image to compare PyTorch's output with the export's on (default: random input)")
    sp.add_argument("--no-check", action="store_true", help="skip running the ONNX file with onnxruntime")
    add_exit_options(sp, "exit rule (default: the checkpoint's; only budget exits export)")


def export_size(model, cfg, size) -> tuple[int, int]:
    """``size``, else the training crop rounded up to whole patches; InputError when not whole patches."""
    if size is None:
        crop = cfg.data.crop_size or [512, 512]
        p = model.backbone.patch_size
        size = [-(-int(s) // p) * p for s in crop]
    size = (int(size[0]), int(size[1]))
    check_size(model, size)
    return size


def run(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    state = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(state.get("config") or {})
    classes = (state.get("dataset") or {}).get("classes")
    del state
    model = load_model(args.checkpoint, torch.device("cpu")).eval()
    if args.exit_mode == "threshold" and isinstance(model, DToPSegmentor):
        model.set_p0(model.cfg.p0)  # the checkpoint's threshold rule: refused below, naming budget mode
    apply_exit_setting(model, exit_setting(args), "dtop export")
    size = export_size(model, cfg, args.size)
    dense = args.dense or not isinstance(model, DToPSegmentor) or not model.can_exit()
    ext = "onnx" if args.format == "onnx" else "pt2"
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"model{'_dense' if dense else ''}.{ext}"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the file to write (e.g. {out / ('model.' + ext)})")
    if out.suffix.lower() != f".{ext}":
        raise ConfigError(f"--out {out}: --format {args.format} writes a .{ext} file; name one (an existing .{ext} "
                          f"file is replaced)")
    if not args.dense and dense and isinstance(model, DToPSegmentor):
        print("dtop export: note: no token can exit with this checkpoint's rule (p0 1: a dense-trained model), so the "
              "plain model is exported; export DToP with --exit-ratio R [R ...]", file=sys.stderr)
    mean, std = normalisation(cfg)
    if args.format == "torch":
        save_program(model, out, size, args.batch, dense)
        print(f"written: {out} (torch.export program, input {args.batch}x3x{size[0]}x{size[1]})")
        return
    meta = {"classes": list(classes) if classes else None, "num_classes": model.num_classes,
            "mean": list(mean), "std": list(std), "input_size": list(size), "batch": args.batch,
            "exit_rule": None if dense else {"exit_mode": model.exit_mode, "exit_ratio": model.exit_ratio},
            "checkpoint": Path(args.checkpoint).name}
    export_onnx(model, out, size, args.batch, dense, metadata=meta)
    print(f"written: {out} (ONNX, input 'images' {args.batch}x3x{size[0]}x{size[1]} normalised with mean {list(mean)} "
          f"std {list(std)}; outputs {'scores' if dense else 'scores, exit_stage'})")
    if args.no_check:
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("not checked: onnxruntime is not installed (pip install onnxruntime to compare the export with PyTorch)")
        return
    if args.check:
        image = normalize(resize_image(read_image(args.check), size), mean, std)
        images = image[None].expand(args.batch, -1, -1, -1).contiguous()
    else:
        images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    diff = max_difference(model, out, images, dense)
    print("onnxruntime vs PyTorch: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()))


APP = App("export", "export a checkpoint with static shapes: ONNX or torch.export (budget exits or dense)",
          add_arguments, run)
