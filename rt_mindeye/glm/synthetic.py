"""Small synthetic sessions with known single-trial betas and HRFs, for tests and the timing benchmark.

Not the phantom (``rt_mindeye.phantom`` simulates whole scanner sessions with anatomy and motion): this writes voxel
time series directly, fast enough to build a 20k-voxel, 11-run session in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rt_mindeye.glm.design import RunEvents, frame_times
from rt_mindeye.glm.hrf import HRFSet


@dataclass
class SyntheticSession:
    runs: list            # (T, V) float32 raw intensities
    events: list          # RunEvents per run
    tr: float
    true_betas: np.ndarray  # (n_trials, V) % signal change, trials ordered by run then onset
    true_hrf: np.ndarray    # (V,) library index
    responsive: np.ndarray  # (V,) bool
    motion: list          # (T, 6) per run
    noise_maps: np.ndarray  # (n_noise, V) spatial patterns of the structured noise


def make_session(*, seed=0, n_runs=4, n_frames=120, n_vox=240, tr=1.5, n_conditions=16, repeats=3,
                 responsive_fraction=0.6, noise_sd=0.6, structured_sd=0.8, n_noise=3, trial_sd=0.25,
                 drift_sd=1.0, hrf_choices=(2, 6, 10, 14, 18)) -> SyntheticSession:
    """Trials of ``n_conditions`` images, each shown ``repeats`` times in different runs, 3 s stimuli every ~4-6 s.

    Responsive voxels respond with a condition-specific amplitude (plus trial-to-trial variability) through one
    library HRF each; every voxel carries drift, low-rank structured noise (what GLMdenoise removes) and white noise.
    """
    rng = np.random.default_rng(seed)
    hrfs = HRFSet.library()
    true_hrf = rng.choice(np.asarray(hrf_choices), size=n_vox)
    responsive = np.zeros(n_vox, dtype=bool)
    responsive[rng.permutation(n_vox)[: int(round(responsive_fraction * n_vox))]] = True
    cond_amp = rng.normal(1.0, 1.0, size=(n_conditions, n_vox)) * responsive
    order = np.concatenate([rng.permutation(n_conditions) for _ in range(repeats)])
    per_run = int(np.ceil(order.size / n_runs))
    noise_maps = rng.normal(size=(n_noise, n_vox))
    baseline = rng.uniform(800, 1200, size=n_vox)
    runs, events, betas, motions = [], [], [], []
    for r in range(n_runs):
        conds = order[r * per_run:(r + 1) * per_run]
        onsets = 4.0 + np.cumsum(rng.uniform(4.0, 6.0, size=conds.size)) - 4.0
        onsets = onsets[onsets < (n_frames - 12) * tr]
        conds = conds[: onsets.size]
        ev = RunEvents(onsets, np.full(onsets.size, 3.0), tuple(f"img{c:03d}" for c in conds))
        b = (cond_amp[conds] + trial_sd * rng.normal(size=(conds.size, n_vox))) * responsive
        regs = hrfs.regressors(frame_times(n_frames, tr), ev.onsets, ev.durations)  # (H, T, K)
        signal = np.zeros((n_frames, n_vox))
        for h in np.unique(true_hrf):
            idx = np.flatnonzero(true_hrf == h)
            signal[:, idx] = regs[h] @ b[:, idx]
        t = np.linspace(-1, 1, n_frames)[:, None]
        drift = drift_sd * (rng.normal(size=n_vox) * t + 0.5 * rng.normal(size=n_vox) * (t ** 2))
        latent = np.cumsum(rng.normal(size=(n_frames, n_noise)), axis=0) * 0.3 + rng.normal(size=(n_frames, n_noise))
        latent -= latent.mean(axis=0)
        latent /= latent.std(axis=0)
        structured = structured_sd * latent @ noise_maps
        white = noise_sd * rng.standard_normal(size=(n_frames, n_vox), dtype=np.float32)
        psc = signal + drift + structured + white
        runs.append((baseline * (1 + psc / 100.0)).astype(np.float32))
        events.append(ev)
        betas.append(b)
        motions.append(0.05 * np.cumsum(rng.normal(size=(n_frames, 6)), axis=0))
    return SyntheticSession(runs, events, tr, np.concatenate(betas, axis=0), true_hrf, responsive, motions,
                            noise_maps)


def median_correlation(estimated: np.ndarray, truth: np.ndarray, voxels: np.ndarray) -> float:
    e = estimated[:, voxels] - estimated[:, voxels].mean(axis=0)
    t = truth[:, voxels] - truth[:, voxels].mean(axis=0)
    r = (e * t).sum(axis=0) / np.sqrt((e ** 2).sum(axis=0) * (t ** 2).sum(axis=0) + 1e-300)
    return float(np.median(r))
