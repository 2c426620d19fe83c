"""``dtop config``: every key of an experiment config with its value and a line of help.

``dtop config`` lists the defaults; ``dtop config CONFIG`` (or ``--show CONFIG``) the values a YAML file
resolves to, after any ``--set`` overrides, each changed one with its default beside it. Every line reads
``section.key = value  # help``; the value is written as ``--set section.key=value`` reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator, Optional

import yaml

from ..config import ExperimentConfig, load_config
from ..errors import ConfigError
from ..jsonio import dumps
from .common import App, add_set

SECTIONS = ("model", "data", "train", "eval")  # the dataclass sections of ExperimentConfig; then out_dir

# One line of help per key (tests/test_discoverability.py checks that every field of every section has one).
HELP: dict[str, str] = {
    "model.preset": "model preset (dtop models): backbone, stage heads and their blocks",
    "model.pretrained": "backbone weights: false, true (timm hub), a .pth/.safetensors file, or dtop weights' name",
    "model.overrides": "SegmentorConfig fields replacing the preset's (stages, p0, backbone_kwargs, ...)",
    "data.name": "dataset: ade20k, pascal_context59, coco_stuff10k, cityscapes, camvid, folder, synthetic",
    "data.root": "the dataset's folder (layouts: docs/datasets.md)",
    "data.options": "the dataset's own options (folder: images, labels, label_mode, palette, classes, ...)",
    "data.val_options": "options for the validation split only, over data.options",
    "data.train_split": "training split name (or, for folder, a split file)",
    "data.val_split": "validation split name (or, for folder, a split file)",
    "data.crop_size": "training crop [H, W]",
    "data.scale": "training resize target [long, short] before the random ratio; null: the original size",
    "data.ratio_range": "random resize ratio [low, high]",
    "data.cat_max_ratio": "re-draw a crop where one class covers this share of its pixels or more",
    "data.photometric": "photometric distortion (brightness, contrast, saturation, hue) in training",
    "data.mean": "input mean (0..1, RGB); null: the backbone's own (timm's pretrained config)",
    "data.std": "input std (0..1, RGB); null: the backbone's own (timm's pretrained config)",
    "data.eval_scale": "evaluation resize [long, short], aspect kept; null: the original size",
    "data.num_workers": "DataLoader worker processes",
    "data.ignore_index": "label id meaning 'ignore' in labels, loss and metrics (above the last class id)",
    "train.scheme": "dense (all heads, p0 = 1), finetune (from init_checkpoint, with pruning) or scratch",
    "train.init_checkpoint": "the trained dense checkpoint finetune starts from (also published weights)",
    "train.p0": "exit threshold during training (one value, or one per non-final stage)",
    "train.exit_mode": "threshold (tokens above p0 exit) or budget (a fixed share exits: exit_ratio)",
    "train.exit_ratio": "budget mode: share of each image's tokens exiting per non-final stage",
    "train.p_min": "budget mode: only tokens more confident than this may exit",
    "train.iters": "training iterations (optimizer steps)",
    "train.batch_size": "images per step and process",
    "train.grad_accum": "batches accumulated per optimizer step",
    "train.lr": "AdamW learning rate of the backbone",
    "train.weight_decay": "AdamW weight decay (none on norms and biases)",
    "train.head_lr_mult": "heads train at lr x this",
    "train.warmup_iters": "linear warm-up iterations before the poly decay",
    "train.poly_power": "power of the poly learning-rate decay",
    "train.grad_clip": "gradient-norm clip; null: none",
    "train.amp": "autocast on CUDA",
    "train.amp_dtype": "autocast dtype: bfloat16 or float16 (with a gradient scaler)",
    "train.seed": "random seed",
    "train.log_interval": "iterations between log lines",
    "train.ckpt_interval": "iterations between checkpoints (last.pt)",
    "train.device": "auto (CUDA when there is one), cpu, cuda, cuda:N",
    "eval.mode": "whole (pad to the patch size) or slide (window/stride, overlaps averaged)",
    "eval.window": "slide mode: window [H, W]",
    "eval.stride": "slide mode: stride [H, W], at most the window",
    "eval.p0": "exit thresholds to evaluate, one variant each",
    "eval.exit_mode": "threshold (p0) or budget (exit_ratio, p_min)",
    "eval.exit_ratio": "budget mode: share of each image's tokens exiting per non-final stage",
    "eval.p_min": "budget mode: only tokens more confident than this may exit",
    "eval.target_gflops": "the GFLOPs dtop calibrate aimed at, reported beside the achieved ones",
    "eval.max_images": "evaluate the first N images only; null: all",
    "out_dir": "folder of checkpoints, config.yaml and results",
}


def format_value(value: Any) -> str:
    """``value`` as ``--set key=value`` reads it (YAML): strings bare unless YAML would read them as something
    else, everything else in JSON (a subset of YAML): ``null``, ``true``, ``[128, 192]``, ``{}``."""
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value and value.strip() == value and "#" not in value
        except yaml.YAMLError:
            plain = False
        return value if plain and value else dumps(value)
    return dumps(value)


def config_keys(cfg: ExperimentConfig) -> Iterator[tuple[str, Any]]:
    """(``section.key``, value) of every field of every section, in the dataclasses' order, then ``out_dir``
    and any other top-level key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                yield f"{f.name}.{g.name}", getattr(value, g.name)
        else:
            yield f.name, value


def config_lines(cfg: ExperimentConfig, defaults: Optional[ExperimentConfig] = None) -> list[str]:
    """``key = value  # help`` for every key of ``cfg``; keys whose value differs from ``defaults`` say the
    default in their comment. A blank line between sections."""
    default = dict(config_keys(defaults)) if defaults is not None else {}
    rows, section = [], None
    for key, value in config_keys(cfg):
        help_ = HELP.get(key, "")
        if key in default and default[key] != value:
            help_ = f"{help_} (default {format_value(default[key])})".strip()
        rows.append((key, f"{key} = {format_value(value)}", help_))
    width = min(48, max(len(text) for _, text, _ in rows))
    lines = []
    for key, text, help_ in rows:
        top = key.split(".")[0]
        if section is not None and top != section:
            lines.append("")
        section = top
        lines.append(f"{text:{width}s}  # {help_}" if help_ else text)
    return lines


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", nargs="?", default=None, help="a YAML config (default: none, the defaults)")
    sp.add_argument("--show", metavar="CONFIG", default=None, help="the same as the positional CONFIG")
    add_set(sp)
    sp.add_argument("--json", action="store_true", help="the resolved config as one JSON object")


def run(args: argparse.Namespace) -> None:
    if args.config and args.show and args.config != args.show:
        raise ConfigError(f"two configs given ({args.config} and --show {args.show}): give one")
    path = args.config or args.show
    cfg = load_config(path, args.set)
    if args.json:
        print(dumps(cfg.to_dict()))
        return
    sets = "".join(f" --set {s}" for s in args.set)
    print(f"# dtop config: {path or 'the defaults'}{sets}; override any key with --set section.key=value")
    print("\n".join(config_lines(cfg, ExperimentConfig() if path or args.set else None)))


APP = App("config", "list every config key with its value (a config file's, or the defaults) and its help",
          add_arguments, run)
