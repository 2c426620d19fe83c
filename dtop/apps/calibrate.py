"""``dtop calibrate CONFIG --checkpoint CKPT --target-gflops G``: the exit rule that meets a GFLOPs target on a
sample of training images, written into a config for ``dtop eval`` / ``dtop predict`` (:mod:`dtop.engine.calibrate`)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from ..config import EXIT_MODES, load_config, save_config
from ..engine.calibrate import calibrate, calibrated_config, sample_images
from ..engine.common import experiment_dataset, progress_enabled, resolve_device
from ..errors import ConfigError
from ..jsonio import write_json
from ..models import load_model
from ..viz import percent
from .common import App, add_config_device, add_set, config_sets


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="the experiment config (its data section names the images)")
    sp.add_argument("--checkpoint", required=True)
    goal = sp.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-gflops", type=float, help="mean GFLOPs per image to reach")
    goal.add_argument("--target-reduction", type=float,
                      help="share of the dense model's GFLOPs to save, e.g. 0.3 for 30%% fewer")
    sp.add_argument("--exit-mode", choices=EXIT_MODES, default="threshold",
                    help="threshold: find p0; budget: find the exit ratios")
    sp.add_argument("--profile", type=float, nargs="+", default=None,
                    help="budget mode: share of the exits at each non-final stage (default: the threshold rule's "
                         "at the same target)")
    sp.add_argument("--images", type=int, default=32, help="training images to calibrate on (evenly spaced)")
    sp.add_argument("--split", default=None, help="the split to sample (default: data.train_split)")
    sp.add_argument("--steps", type=int, default=12, help="bisection steps")
    sp.add_argument("--out", default=None,
                    help="the config to write (default: <checkpoint folder>/calibrated_<exit mode>.yaml)")
    sp.add_argument("--overwrite", action="store_true", help="replace an --out file that dtop calibrate did not write")
    add_config_device(sp)
    add_set(sp)


def check_config_out(out: Path, overwrite: bool = False) -> None:
    """ConfigError unless ``out`` can take the config calibrate writes: a ``.yaml``/``.yml`` name that is not a
    folder, and not an existing config that calibrate did not write (``overwrite`` replaces it anyway)."""
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: calibrate writes a YAML config; name a .yaml file")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a .yaml file")
    if out.is_file() and not overwrite:
        try:
            ours = ((yaml.safe_load(out.read_text()) or {}).get("eval") or {}).get("target_gflops") is not None
        except (yaml.YAMLError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"--out {out} exists and is not a config dtop calibrate wrote; name another file or "
                              f"replace it with --overwrite")


def run(args: argparse.Namespace) -> None:
    if args.out:
        check_config_out(Path(args.out), args.overwrite)
    cfg = load_config(args.config, config_sets(args))
    if args.images < 1 or args.steps < 1:
        raise ConfigError(f"--images and --steps must be >= 1, got {args.images} and {args.steps}")
    if args.target_reduction is not None and not 0 < args.target_reduction < 1:
        raise ConfigError(f"--target-reduction is a share of the dense GFLOPs in (0, 1), got {args.target_reduction}")
    device = resolve_device(cfg.train.device)
    model = load_model(args.checkpoint, device).eval()
    dataset = experiment_dataset(cfg, args.split or cfg.data.train_split, train=False)
    images = sample_images(dataset, args.images)
    result = calibrate(model, images, cfg.eval, device, args.target_gflops, args.exit_mode, args.profile, args.steps,
                       progress=progress_enabled(), reduction=args.target_reduction)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"calibrated_{result.exit_mode}.yaml"
    check_config_out(out, args.overwrite)
    save_config(calibrated_config(cfg, result), out)
    write_json(out.with_suffix(".json"), {**result.as_dict(), "checkpoint": args.checkpoint})
    rule = f"p0 {result.p0:g}" if result.exit_mode == "threshold" else \
        "exit ratios " + ", ".join(f"{r:.4g}" for r in result.exit_ratio)
    print(f"{result.exit_mode} rule: {rule}: {result.achieved:.4f} GFLOPs per image on {result.images} "
          f"{args.split or cfg.data.train_split} images (target {result.target:.4f}, "
          f"{percent(100 * (result.achieved / result.target - 1), signed=True)}; dense {result.dense:.4f}, "
          f"{percent(100 * (1 - result.achieved / result.dense))} fewer); exits per stage {result.exit_fractions}")
    print(f"written: {out} (and {out.with_suffix('.json').name}); evaluate it with:\n"
          f"  dtop eval {shlex.quote(str(out))} --checkpoint {shlex.quote(args.checkpoint)}")


APP = App("calibrate", "find the p0 or exit ratios that meet a GFLOPs target; writes a config for eval/predict",
          add_arguments, run)
