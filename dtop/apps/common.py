"""What the applications share: the :class:`App` record and the options several commands take."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import EXIT_MODES
from ..engine.common import keep_freed_memory
from ..engine.evaluate import resolved_budget
from ..errors import ConfigError
from ..models.packed import LINEAR_KERNELS


@dataclass(frozen=True)
class App:
    """A ``dtop`` command: its name, one-line help, the function that adds its arguments to its parser,
    and the function that runs it (returns the exit status, None for 0)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Optional[int]]


def add_set(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def add_allocator(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--allocator", choices=["keep", "system"], default="keep",
                    help="keep: glibc keeps freed memory for the next forward instead of returning it to the OS "
                         "and faulting it in again (faster on Linux CPUs; resident memory stays at its peak); "
                         "system: the C library's defaults (always with bench --count-ops, which times nothing)")


def set_allocator(args: argparse.Namespace) -> bool:
    """``--allocator keep`` (the default of the latency commands): :func:`dtop.engine.common.keep_freed_memory`.
    Returns whether it took effect."""
    return args.allocator == "keep" and keep_freed_memory()


def add_linear(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--linear", choices=LINEAR_KERNELS, default="auto",
                    help="linear layers in fp32 CPU inference: onednn packs the weights once for oneDNN "
                         "(faster, above all on few tokens); aten is torch's default (MKL sgemm); "
                         "auto: onednn on CPU where this torch has it")


def add_exit_options(sp: argparse.ArgumentParser, title: str = "exit rule (default: the threshold rule at p0)") -> None:
    """``--exit-mode``, ``--exit-ratio``, ``--p-min``: the budget exit rule (``docs/method/exit-rule.md``)."""
    g = sp.add_argument_group(title)
    g.add_argument("--exit-mode", choices=EXIT_MODES, default=None,
                   help="threshold: tokens more confident than p0 exit; budget: every image exits a fixed share "
                        "of its tokens at each non-final stage (fixed shapes: export, CUDA graphs)")
    g.add_argument("--exit-ratio", type=float, nargs="+", default=None, metavar="R",
                   help="budget mode: the share of each image's tokens that exits at each non-final stage "
                        "(one value for all stages or one per stage; implies --exit-mode budget)")
    g.add_argument("--p-min", type=float, default=None,
                   help="budget mode: only tokens more confident than this may exit (the budget becomes an upper bound)")


def exit_setting(args: argparse.Namespace, section=None) -> Optional[dict]:
    """The budget rule the options (or, where they say nothing, the config ``section``'s ``exit_mode``,
    ``exit_ratio``, ``p_min``) ask for: ``{"exit_ratio": ..., "p_min": ...}`` for
    :meth:`~dtop.models.DToPSegmentor.set_budget`, or None for the threshold rule. ConfigError for
    contradictory options."""
    mode = getattr(args, "exit_mode", None)
    ratio, p_min = getattr(args, "exit_ratio", None), getattr(args, "p_min", None)
    if mode == "threshold" and (ratio is not None or p_min is not None):
        raise ConfigError("--exit-ratio and --p-min belong to --exit-mode budget, not threshold")
    if mode is None:
        mode = "budget" if ratio is not None else (section.exit_mode if section is not None else "threshold")
    if mode != "budget":
        if p_min is not None:
            raise ConfigError("--p-min needs budget mode: add --exit-ratio R (or --exit-mode budget)")
        return None
    if ratio is None:
        if section is None:
            return {}  # budget mode at the checkpoint's own ratios
        ratio = section.exit_ratio
    if p_min is None:
        p_min = section.p_min if section is not None else 0.0
    return {"exit_ratio": ratio[0] if isinstance(ratio, list) and len(ratio) == 1 else ratio, "p_min": p_min}


def apply_exit_setting(model, setting: Optional[dict], who: str) -> None:
    """Put a DToP ``model`` in the budget mode ``setting`` asks for (None: leave it); ``{}``: the checkpoint's own
    ratios (ConfigError when the checkpoint has none). A warning, naming ``who``, for models without exits."""
    if setting is None:
        return
    if not hasattr(model, "set_budget"):
        print(f"{who}: warning: budget exits have no effect: the model runs the {model.reducer.kind} token "
              f"reduction, not early exit", file=sys.stderr)
        return
    model.set_budget(**resolved_budget(model, setting))



def check_out_folder(path, option: str = "--out") -> None:
    """ConfigError when ``path`` (an output folder) exists as something other than a folder."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a folder: name a folder for the results "
                          f"(it is created when missing)")


def note_no_exit(model, who: str) -> None:
    """A note on stderr when a DToP ``model``'s rule lets no token exit early (a dense-trained checkpoint, p0 1),
    saying how to prune."""
    if hasattr(model, "can_exit") and not model.can_exit():
        print(f"{who}: note: no token can exit early with this checkpoint's rule (p0 {model.cfg.p0}: a dense-trained "
              f"model), so every image costs the dense GFLOPs; prune with --p0 0.9 (or --exit-ratio R)",
              file=sys.stderr)


def add_config_device(sp: argparse.ArgumentParser) -> None:
    """``--device``: for commands whose device is the config's ``train.device`` (a shorthand for ``--set``)."""
    sp.add_argument("--device", default=None,
                    help="auto, cpu, cuda, cuda:N or mps (short for --set train.device=...; default: the config's)")


def config_sets(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, with ``--device`` as ``train.device`` when given."""
    return list(args.set) + ([f"train.device={args.device}"] if getattr(args, "device", None) else [])
