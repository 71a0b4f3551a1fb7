"""The published real-time MindEye GLM (Iyer et al.), reimplemented as the baseline the bench compares against.

Per trial, once ``delay_s`` seconds have passed since its onset: an LSS model of the run so far (nilearn-style,
refitted from scratch) with the current trial, one regressor for all earlier trials, the canonical Glover HRF, a
cosine drift basis with a 0.01 Hz cut-off plus constant, and the motion parameters; no HRF fitting, no noise
regressors, no ridge. nilearn's AR(1) prewhitening is not reproduced (OLS): it changes betas little for a single
regressor of interest and the baseline's point is its design. Cost per trial grows with the run so far.
"""

from __future__ import annotations

import math

import numpy as np

from rt_mindeye.glm.design import RunEvents, frame_times
from rt_mindeye.glm.hrf import HRFSet


def cosine_drift(n_frames: int, tr: float, high_pass: float = 0.01) -> np.ndarray:
    """nilearn's discrete cosine drift basis for ``high_pass`` Hz over ``n_frames`` volumes, plus a constant."""
    order = max(int(math.floor(2 * n_frames * high_pass * tr)), 1)
    t = np.arange(n_frames)
    cols = [math.sqrt(2.0 / n_frames) * np.cos(np.pi / n_frames * (t + 0.5) * k) for k in range(1, order)]
    cols.append(np.ones(n_frames))
    return np.stack(cols, axis=1)


def mindeye_lss_betas(data: np.ndarray, events: RunEvents, tr: float, *, delay_s: float = 7.5,
                      motion: np.ndarray | None = None, high_pass: float = 0.01,
                      stim_duration: float | None = None, hrf: str = "glover") -> tuple[np.ndarray, np.ndarray]:
    """Betas (K, V) of every trial of a run fitted as real-time MindEye does, and the volume count each used.

    ``data`` (T, V) is the run in % signal change; trial ``j`` is fitted on volumes ``0..n`` where ``n`` is the
    last volume acquired by ``onset + delay_s``.
    """
    data = np.asarray(data, dtype=np.float64)
    n_total = data.shape[0]
    times = frame_times(n_total, tr)
    durations = events.durations if stim_duration is None else np.full(len(events), float(stim_duration))
    regs = HRFSet.canonical(hrf).regressors(times, events.onsets, durations)[0]  # (T, K)
    betas = np.zeros((len(events), data.shape[1]))
    used = np.zeros(len(events), dtype=np.int64)
    for j, onset in enumerate(events.onsets):
        n = int(min(n_total, np.searchsorted(times, onset + delay_s, side="right")))
        cols = [regs[:n, j], regs[:n, :j].sum(axis=1)]
        design = np.column_stack(cols + [cosine_drift(n, tr, high_pass)] +
                                 ([motion[:n]] if motion is not None else []))
        coef, *_ = np.linalg.lstsq(design, data[:n], rcond=None)
        betas[j] = coef[0]
        used[j] = int(np.sum(times[:n] >= onset))
    return betas, used
