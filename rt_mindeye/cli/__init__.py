"""The ``rt-mindeye`` command line.

Each command group lives in its own module under :mod:`rt_mindeye.cli` exposing ``register(subparsers)``; the
module adds its sub-commands and sets ``func`` on each parser; path arguments use
:func:`~rt_mindeye.process.cli_path` (relative to the working directory). Expected failures raise
:class:`~rt_mindeye.errors.RtMindEyeError` and are printed as one line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rt_mindeye import __version__
from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.process import single_threaded_numerics

# Modules that contribute sub-commands, in help order.
COMMAND_MODULES = (
    "rt_mindeye.cli.demo",
    "rt_mindeye.cli.ingest",
    "rt_mindeye.cli.phantom",
    "rt_mindeye.cli.replay",
    "rt_mindeye.cli.glm",
    "rt_mindeye.cli.model",
    "rt_mindeye.cli.session",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rt-mindeye", description="Real-time fMRI-to-image decoding at the scanner.")
    parser.add_argument("--version", action="version", version=f"rt-mindeye {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    single_threaded_numerics()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except RtMindEyeError as exc:
        print(f"rt-mindeye {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rt-mindeye {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
