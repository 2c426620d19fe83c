"""The ``dtop`` command line: one subcommand per application (:mod:`dtop.apps`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .apps import bench, compare, demo, evaluate, info, predict, report, train, weights
from .apps.common import App
from .errors import DToPError

APPS: list[App] = [info.MODELS, info.FLOPS, info.PAPER_TABLE_APP, train.APP, evaluate.APP, predict.APP, report.APP,
                   compare.APP, bench.APP, demo.APP, weights.APP]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtop", description="Dynamic token pruning for plain-ViT segmentation")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; dtop's own errors end in one line on stderr and exit status 2 (others keep their
    traceback). A command returns 1 when it finished but some inputs failed."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except DToPError as e:
        print(f"dtop {args.command}: error: {_last_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
