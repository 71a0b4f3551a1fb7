"""What every process entry point (the ``rt-mindeye`` command, ``python -m services.*``, the benchmarks) shares:
thread settings for the numerical libraries, and how paths typed on a command line are read.

Below both :mod:`rt_mindeye.cli` and :mod:`rt_mindeye.runtime`, so neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def single_threaded_numerics() -> None:
    """Default OpenMP/BLAS to one thread per process unless the user chose otherwise.

    rt-mindeye's per-volume and per-trial work is small and several of its processes share the machine: measured
    on 2 cores, a tiny-model training step took 0.74 s with one torch thread and 8.9 s with two (OpenMP threads
    spinning against the other processes). Set OMP_NUM_THREADS to use more threads on a larger machine. Must run
    before torch or numpy are imported.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def cli_path(text: str) -> Path:
    """A path typed on a command line, made absolute against the working directory (argparse ``type=``).

    A relative path from the command line means "from where I ran the command". Kept relative, it changes meaning
    once it is written into a generated session YAML (whose relative paths resolve against the YAML's folder) or
    handed to a process started elsewhere.
    """
    return Path(text).expanduser().absolute()
