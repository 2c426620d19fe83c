"""The ``dtop`` command line: one subcommand per application (:mod:`dtop.apps`)."""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from ._version import __version__
from .apps import bench, calibrate, compare, config_show, demo, evaluate, export, info, predict, report, train, weights
from .apps.common import App
from .errors import DToPError, Interrupted, deferred_interrupts, interrupts_raise

APPS: list[App] = [info.MODELS, info.FLOPS, info.PAPER_TABLE_APP, train.APP, evaluate.APP, predict.APP, report.APP,
                   compare.APP, bench.APP, calibrate.APP, export.APP, demo.APP, weights.APP, config_show.APP]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtop", description="Dynamic token pruning for plain-ViT segmentation")
    p.add_argument("--version", action="version", version=f"dtop {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for app in APPS:
        sp = sub.add_parser(app.name, help=app.help, description=app.help)
        app.add_arguments(sp)
        sp.set_defaults(run=app.run)
    return p


def _last_line(message: str) -> str:
    """DataLoader workers re-raise our errors with the worker's traceback prepended; keep our message."""
    if "Traceback" in message:
        tail = message.strip().splitlines()[-1]
        return tail.split(": ", 1)[1] if ": " in tail else tail
    return message


def interrupted_line(command: str, argv: Sequence[str], exc: BaseException) -> str:
    """The one line an interrupted command prints: the signal, what was done and where (the job's
    :class:`~dtop.errors.Interrupted` says), and the command line that resumes (or reruns) it."""
    exc = exc if isinstance(exc, Interrupted) else Interrupted.wrap(exc, "")
    words = ["dtop", *argv, *(a for a in exc.resume if a not in argv)]
    how = "resume" if exc.resume else "rerun"
    return (f"dtop {command}: interrupted by {exc.signal_name}: {exc.done or 'stopped before it finished'}; "
            f"{how}: {shlex.join(words)}")


def _close_progress_bars() -> None:
    """Close the progress bars an interruption left open, so that its line starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextmanager
def one_line_warnings(prefix: str) -> Iterator[None]:
    """Warnings printed as ``<prefix>: warning: <message>`` lines (not Python's file:line and source line)
    while a command runs (``warnings.formatwarning``, so tests that record warnings still see them)."""
    original = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"{prefix}: warning: {message}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; dtop's own errors end in one line on stderr and exit status 2 (others keep their
    traceback). A command returns 1 when it finished but some inputs failed. Ctrl-C (SIGINT) or SIGTERM
    ends it with one line (:func:`interrupted_line`) and status 128 + the signal (130, 143)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with interrupts_raise(), one_line_warnings(f"dtop {args.command}"):
        try:
            return args.run(args) or 0
        except DToPError as e:
            print(f"dtop {args.command}: error: {_last_line(str(e))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            status = getattr(e, "exit_status", 130)
            try:
                with deferred_interrupts():  # a second Ctrl-C does not cut the line short
                    _close_progress_bars()
                    print(interrupted_line(args.command, argv, e), file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                pass
            return status


if __name__ == "__main__":
    sys.exit(main())
