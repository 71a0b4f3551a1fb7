"""The ``rt-mindeye`` command line.

Each command group lives in its own module under :mod:`rt_mindeye.cli` exposing ``register(subparsers)``; the
module adds its sub-commands and sets ``func`` on each parser. Expected failures raise
:class:`~rt_mindeye.errors.RtMindEyeError` and are printed as one line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rt_mindeye import __version__
from rt_mindeye.errors import RtMindEyeError

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


def single_threaded_numerics() -> None:
    """Default OpenMP/BLAS to one thread per process unless the user chose otherwise.

    rt-mindeye's per-volume and per-trial work is small and several of its processes share the machine: measured
    on 2 cores, a tiny-model training step took 0.74 s with one torch thread and 8.9 s with two (OpenMP threads
    spinning against the other processes). Set OMP_NUM_THREADS to use more threads on a larger machine. Must run
    before torch or numpy are imported.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")


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
