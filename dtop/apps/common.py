"""What the applications share: the :class:`App` record and the options several commands take."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional

from ..engine.common import keep_freed_memory
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
                         "system: the C library's defaults")


def set_allocator(args: argparse.Namespace) -> bool:
    """``--allocator keep`` (the default of the latency commands): :func:`dtop.engine.common.keep_freed_memory`.
    Returns whether it took effect."""
    return args.allocator == "keep" and keep_freed_memory()


def add_linear(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--linear", choices=LINEAR_KERNELS, default="auto",
                    help="linear layers in fp32 CPU inference: onednn packs the weights once for oneDNN "
                         "(faster, above all on few tokens); aten is torch's default (MKL sgemm); "
                         "auto: onednn on CPU where this torch has it")
