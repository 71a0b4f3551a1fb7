"""Motion gating of trials: the largest framewise displacement over each trial's window.

A trial's window runs from the volume its onset falls in to the volume ``window_s`` later (the stimulus and the rise
and peak of its response, which carry its single-trial beta); volumes after ``last_volume`` (not acquired yet, or not
used by a live estimate) do not count. A trial whose maximum exceeds ``MotionConfig.gate_fd_mm`` is gated: marked,
and left out of calibration fine-tuning.
"""

from __future__ import annotations

import numpy as np


def trial_fd_max(onsets, fd, tr: float, window_s: float, last_volume: int | None = None) -> np.ndarray:
    """(K,) largest FD (mm) over each trial's window; NaN where no volume of the window has an FD.

    ``onsets``: seconds from the start of the run's first volume; ``fd``: FD per volume index of the run (NaN for a
    missing volume); ``tr``: seconds per volume.
    """
    onsets = np.atleast_1d(np.asarray(onsets, dtype=np.float64))
    fd = np.asarray(fd, dtype=np.float64)
    n = fd.size if last_volume is None else min(fd.size, int(last_volume) + 1)
    out = np.full(onsets.size, np.nan)
    for k, onset in enumerate(onsets):
        first = max(0, int(np.floor(onset / tr)))
        stop = min(n, int(np.floor((onset + window_s) / tr)) + 1)
        window = fd[first:stop]
        if window.size and np.isfinite(window).any():
            out[k] = float(np.nanmax(window))
    return out


def gated(fd_max, gate_fd_mm: float) -> np.ndarray:
    """Which trials exceed the gate (a trial with no known FD is not gated)."""
    fd_max = np.asarray(fd_max, dtype=np.float64)
    return np.isfinite(fd_max) & (fd_max > gate_fd_mm)
