"""``dtop train CONFIG``: train from a YAML config (dense, @Finetune or @Scratch; DDP under torchrun)."""
from __future__ import annotations

import argparse

from ..config import load_config
from ..engine import train
from ..errors import ConfigError
from .common import App, add_config_device, add_set, config_sets


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config")
    add_config_device(sp)
    add_set(sp)
    sp.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    sp.add_argument("--overwrite", action="store_true",
                    help="start afresh in an out_dir that already holds a run (its checkpoint and log are replaced)")


def run(args: argparse.Namespace) -> None:
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in out_dir, --overwrite replaces it: give one")
    path = train(load_config(args.config, config_sets(args)), resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {path}")


APP = App("train", "train from a YAML config", add_arguments, run)
