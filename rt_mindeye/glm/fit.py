"""The stages of the offline GLMsingle-style fit as pure functions (the estimator in ``estimator.py`` chains them).

Every run's design touches only its own trials, so runs are solved separately: for each run and HRF one SVD of the
single-trial design (nuisance projected out) serves every voxel using that HRF, and all ridge fractions, the HRF
choice and both cross-validations are computed from the rotated data ``z = U' Yt`` (see :mod:`kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rt_mindeye.glm import kernels
from rt_mindeye.glm.design import RunEvents, drift_degree, frame_times, orthonormal_basis, polynomial_drift
from rt_mindeye.glm.hrf import HRFSet


# --- data preparation ----------------------------------------------------------------------------------------------

def percent_signal(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, V) data as % signal change about each voxel's mean over the run; voxels with mean <= 0 become 0."""
    data = np.asarray(data, dtype=np.float32)
    mean = data.mean(axis=0, dtype=np.float64)
    scale = np.zeros_like(mean)
    good = mean > 0
    scale[good] = 100.0 / mean[good]
    psc = (data - mean.astype(np.float32)) * scale.astype(np.float32)
    return psc, mean


def nuisance_basis(n_frames: int, tr: float, degree: int | None, motion: np.ndarray | None = None) -> np.ndarray:
    """Orthonormal basis (T, p) of one run's polynomial drift and (demeaned) motion regressors."""
    columns = [polynomial_drift(n_frames, drift_degree(n_frames, tr, degree))]
    if motion is not None and motion.size:
        motion = np.asarray(motion, dtype=np.float64)
        columns.append(motion - motion.mean(axis=0))
    return orthonormal_basis(np.concatenate(columns, axis=1))


def project_out(basis: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` minus their projection on the orthonormal ``basis`` (keeps the dtype of ``values``)."""
    if basis.shape[1] == 0:
        return values.copy()
    coef = basis.T.astype(values.dtype) @ values
    return values - basis.astype(values.dtype) @ coef


def brain_voxels(means: np.ndarray, percentile: float, fraction: float) -> np.ndarray:
    """GLMsingle's brain mask: mean intensity above ``fraction`` of its ``percentile``-th percentile."""
    return means > fraction * np.percentile(means, percentile)


def gaussian_mixture_threshold(values: np.ndarray, n_iter: int = 200, conservative: bool = False) -> float:
    """Crossing point of a two-Gaussian mixture fitted to ``values`` (deterministic EM, quantile start), or with
    ``conservative`` the mean of the lower component (fewer weakly responding voxels fall below it).

    Used like GLMsingle's tail threshold to split voxels that do not respond (noise pool) from those that do.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 10 or np.ptp(x) == 0:
        return float(np.median(x)) if x.size else 0.0
    mu = np.quantile(x, [0.25, 0.9])
    sd = np.full(2, x.std() / 2 + 1e-12)
    w = np.array([0.5, 0.5])
    for _ in range(n_iter):
        dens = w / (sd * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) + 1e-300
        resp = dens / dens.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        new_mu = (resp * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (x[:, None] - new_mu) ** 2).sum(axis=0) / nk) + 1e-9 * np.ptp(x)
        w = nk / nk.sum()
        if np.allclose(new_mu, mu, rtol=0, atol=1e-10):
            mu = new_mu
            break
        mu = new_mu
    lo, hi = np.argsort(mu)
    if conservative:
        return float(mu[lo])
    grid = np.linspace(mu[lo], mu[hi], 512)
    p_lo = w[lo] / sd[lo] * np.exp(-0.5 * ((grid - mu[lo]) / sd[lo]) ** 2)
    p_hi = w[hi] / sd[hi] * np.exp(-0.5 * ((grid - mu[hi]) / sd[hi]) ** 2)
    above = np.nonzero(p_hi >= p_lo)[0]
    return float(grid[above[0]] if above.size else grid[-1])


def noise_components(pool_psc: np.ndarray, basis: np.ndarray, n_components: int) -> np.ndarray:
    """GLMdenoise's per-run noise regressors: top temporal principal components (T, n) of the noise pool.

    Drift/motion is projected out and every voxel scaled to unit norm first, so each voxel counts equally; the
    components are orthonormal and orthogonal to ``basis``; each one's sign makes its largest entry positive.
    """
    pool = project_out(basis, np.asarray(pool_psc, dtype=np.float64))
    norms = np.linalg.norm(pool, axis=0)
    pool = pool[:, norms > 0] / norms[norms > 0]
    n = min(n_components, pool.shape[0] - basis.shape[1], pool.shape[1])
    if n <= 0:
        return np.zeros((pool.shape[0], 0))
    evals, evecs = np.linalg.eigh(pool @ pool.T)
    comps = evecs[:, ::-1][:, :n]
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(n)])
    return comps * signs


def subsample_pool(pool_mask: np.ndarray, max_voxels: int) -> np.ndarray:
    """Indices of noise-pool voxels, evenly subsampled (deterministically) down to ``max_voxels``."""
    idx = np.flatnonzero(pool_mask)
    if idx.size > max_voxels:
        idx = idx[np.linspace(0, idx.size - 1, max_voxels).round().astype(np.int64)]
    return idx


def spatial_noise_loadings(pool_psc_runs: Sequence[np.ndarray], bases: Sequence[np.ndarray], n_components: int,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frozen spatial loadings (P, n) and voxel scales (P,) of the session's noise components, for real-time use.

    A live noise-regressor value is ``loadings.T @ (pool_psc / scale)``: the same pattern the calibration's
    per-run components express, applied to each new volume. Computed with a seeded randomized SVD.
    """
    projected = [project_out(b, np.asarray(p, dtype=np.float64)) for p, b in zip(pool_psc_runs, bases)]
    stacked = np.concatenate(projected, axis=0)
    scale = np.sqrt((stacked ** 2).mean(axis=0))
    scale[scale == 0] = 1.0
    stacked /= scale
    n = min(n_components, min(stacked.shape))
    if n <= 0:
        return np.zeros((stacked.shape[1], 0)), scale
    rng = np.random.default_rng(seed)
    sketch = stacked.T @ (stacked @ rng.standard_normal((stacked.shape[1], n + 10)))
    for _ in range(3):
        sketch, _ = np.linalg.qr(sketch)
        sketch = stacked.T @ (stacked @ sketch)
    q, _ = np.linalg.qr(sketch)
    _, _, vt = np.linalg.svd(stacked @ q, full_matrices=False)
    loadings = q @ vt.T[:, :n]
    signs = np.sign(loadings[np.argmax(np.abs(loadings), axis=0), np.arange(n)])
    return loadings * signs, scale


# --- designs in the rotated basis ----------------------------------------------------------------------------------

@dataclass
class Rotated:
    """Per-run SVDs of the projected single-trial designs and the voxels' rotated data (see :mod:`kernels`)."""

    W: np.ndarray        # (R, H, K, K) right singular vectors, W[r, h, trial, component]
    s: np.ndarray        # (R, H, K) singular values, descending
    Z: np.ndarray        # (R, K, V) U' Yt for each voxel under its own HRF
    yss: np.ndarray      # (R, V) ||Yt||^2
    n_trials: np.ndarray  # (R,)

    @property
    def run_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_trials)]).astype(np.int64)


def rotate(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray], nuisance: Sequence[np.ndarray],
           hrf_index: np.ndarray, n_hrfs: int) -> Rotated:
    """SVD each run's projected design under each HRF some voxel uses; rotate those voxels' projected data.

    ``data[r]`` (T, V) float32, ``regressors[r]`` (H, T, K), ``nuisance[r]`` (T, p) orthonormal.
    """
    n_runs = len(data)
    n_vox = data[0].shape[1]
    n_trials = np.array([reg.shape[2] for reg in regressors], dtype=np.int64)
    k_max = int(n_trials.max()) if n_runs else 0
    W = np.zeros((n_runs, n_hrfs, k_max, k_max))
    s = np.zeros((n_runs, n_hrfs, k_max))
    Z = np.zeros((n_runs, k_max, n_vox), dtype=np.float32)
    yss = np.zeros((n_runs, n_vox))
    groups = [(h, np.flatnonzero(hrf_index == h)) for h in range(n_hrfs)]
    groups = [(h, idx) for h, idx in groups if idx.size]
    for r in range(n_runs):
        yt = project_out(nuisance[r], data[r])
        yss[r] = np.einsum("tv,tv->v", yt, yt, dtype=np.float64)
        kr = int(n_trials[r])
        if kr == 0:
            continue
        for h, idx in groups:
            xt = project_out(nuisance[r], regressors[r][h])
            u, sv, vt = np.linalg.svd(xt, full_matrices=False)
            W[r, h, :kr, :kr] = vt.T
            s[r, h, :kr] = sv
            Z[r, :kr, idx] = (u.T.astype(np.float32) @ yt[:, idx]).T
    return Rotated(W, s, Z, yss, n_trials)


def explained_fraction(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray],
                       nuisance: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel and HRF, R^2 of each run's OLS fit summed over runs: (H, V). One SVD per run and HRF."""
    n_hrfs = regressors[0].shape[0]
    n_vox = data[0].shape[1]
    fitted = np.zeros((n_hrfs, n_vox))
    total = np.zeros(n_vox)
    for r, y in enumerate(data):
        yt = project_out(nuisance[r], y)
        total += np.einsum("tv,tv->v", yt, yt, dtype=np.float64)
        if regressors[r].shape[2] == 0:
            continue
        for h in range(n_hrfs):
            xt = project_out(nuisance[r], regressors[r][h])
            u, sv, _ = np.linalg.svd(xt, full_matrices=False)
            u = u[:, sv > kernels.SINGULAR_TOL * max(sv[0], 1e-300)]
            z = u.T.astype(np.float32) @ yt
            fitted[h] += np.einsum("kv,kv->v", z, z, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 0, fitted / total, 0.0)
    return r2


# --- cross-validation ----------------------------------------------------------------------------------------------

@dataclass
class CrossValidation:
    """Trials with a repeat of their condition in another run, and those repeats (CSR, in CV-trial indices)."""

    cv_run: np.ndarray
    cv_pos: np.ndarray
    mates_ptr: np.ndarray
    mates_idx: np.ndarray
    run_cv_ptr: np.ndarray

    @property
    def n_trials(self) -> int:
        return int(self.cv_run.size)


def cross_validation_sets(events: Sequence[RunEvents]) -> CrossValidation:
    entries = [(r, k, t) for r, ev in enumerate(events) for k, t in enumerate(ev.trial_types)]
    runs_of = {}
    for r, _, t in entries:
        runs_of.setdefault(t, set()).add(r)
    cv = [(r, k, t) for r, k, t in entries if len(runs_of[t]) > 1]
    index = {(r, k): i for i, (r, k, _) in enumerate(cv)}
    by_type = {}
    for r, k, t in cv:
        by_type.setdefault(t, []).append((r, k))
    ptr, idx = [0], []
    for r, k, t in cv:
        idx.extend(index[m] for m in by_type[t] if m[0] != r)
        ptr.append(len(idx))
    run_ptr = np.searchsorted(np.array([c[0] for c in cv], dtype=np.int64), np.arange(len(events) + 1))
    return CrossValidation(np.array([c[0] for c in cv], dtype=np.int64), np.array([c[1] for c in cv], dtype=np.int64),
                           np.array(ptr, dtype=np.int64), np.array(idx, dtype=np.int64), run_ptr.astype(np.int64))


def cv_row_sums(rot: Rotated, cv: CrossValidation) -> tuple[np.ndarray, np.ndarray]:
    """Per run and HRF: the sum of all rows of ``W`` and of the rows of trials without a repeat elsewhere."""
    w_sum = rot.W.sum(axis=2)
    w_rest = w_sum.copy()
    for i in range(cv.n_trials):
        w_rest[cv.cv_run[i]] -= rot.W[cv.cv_run[i], :, cv.cv_pos[i], :]
    return w_sum, w_rest


def cv_sse(rot: Rotated, hrf_index: np.ndarray, alphas: np.ndarray, cv: CrossValidation,
           predict_unrepeated: bool = False) -> np.ndarray:
    """Held-out residual sum of squares (F, V) for ridge parameters ``alphas (R, F, V)``.

    ``predict_unrepeated``: predict trials without a repeat by the other runs' mean beta (else by zero, so only
    repeated images inform the choice: on the phantom this picked better fractions for trial-to-trial accuracy).
    """
    w_sum, w_rest = cv_row_sums(rot, cv)
    if not predict_unrepeated:
        w_rest = np.zeros_like(w_rest)
    return kernels.ridge_cv_sse(hrf_index.astype(np.int64), rot.W, rot.s, rot.Z, np.ascontiguousarray(alphas),
                                rot.yss, rot.n_trials, cv.cv_run, cv.cv_pos, cv.mates_ptr, cv.mates_idx,
                                cv.run_cv_ptr, w_sum, w_rest)


def choose_pc_count(scores: np.ndarray, stop: float) -> int:
    """Smallest PC count whose improvement over none reaches ``stop`` of the best improvement (GLMdenoise)."""
    gain = scores - scores[0]
    best = gain.max()
    if not np.isfinite(best) or best <= 0:
        return 0
    return int(np.flatnonzero(gain >= stop * best)[0])


# --- fractional ridge ----------------------------------------------------------------------------------------------

def fraction_alphas(rot: Rotated, hrf_index: np.ndarray, fractions: Sequence[float], n_grid: int) -> np.ndarray:
    """Ridge parameter per (run, fraction, voxel) that shrinks the run's OLS beta norm to each fraction."""
    fractions = np.asarray(fractions, dtype=np.float64)
    n_runs, n_hrfs = rot.s.shape[:2]
    n_vox = rot.Z.shape[2]
    alphas = np.zeros((n_runs, fractions.size, n_vox))
    for r in range(n_runs):
        kr = int(rot.n_trials[r])
        if kr == 0:
            continue
        z2 = rot.Z[r, :kr].astype(np.float64) ** 2
        # Each HRF's design has its own singular values, hence its own alpha grid; one kernel call per run.
        ratio = np.ones((n_grid, n_vox))
        grids = np.zeros((n_hrfs, n_grid))
        grids[:, 1:] = np.arange(1, n_grid)  # placeholder increasing grid for unused HRFs
        for h in range(n_hrfs):
            idx = np.flatnonzero(hrf_index == h)
            sv = rot.s[r, h, :kr]
            if idx.size == 0 or sv[0] <= 0:
                continue
            ok = sv > kernels.SINGULAR_TOL * sv[0]
            sv = sv[ok]
            grid = np.concatenate([[0.0], np.logspace(np.log10(sv[-1] ** 2) - 3, np.log10(sv[0] ** 2) + 4,
                                                      n_grid - 1)])
            grids[h] = grid
            gain2 = (sv[None, :] / (sv[None, :] ** 2 + grid[:, None])) ** 2
            norms2 = gain2 @ z2[ok][:, idx]
            with np.errstate(invalid="ignore", divide="ignore"):
                part = np.sqrt(norms2 / norms2[:1])
            part[:, norms2[0] == 0] = 1.0
            ratio[:, idx] = part
        alphas[r] = kernels.fraction_alphas(ratio, grids, fractions, hrf_index.astype(np.int64))
    return alphas


def betas_and_sse(rot: Rotated, hrf_index: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-trial betas (n_all_trials, V) float32 and residual SS per voxel for ``alphas (R, V)``."""
    return kernels.ridge_betas(hrf_index.astype(np.int64), rot.W, rot.s, rot.Z, np.ascontiguousarray(alphas),
                               rot.yss, rot.n_trials, rot.run_offsets)


# --- designs -------------------------------------------------------------------------------------------------------

def run_regressors(hrfs: HRFSet, events: RunEvents, n_frames: int, tr: float, slice_time_ref: float) -> np.ndarray:
    """(H, T, K) single-trial regressors of one run."""
    return hrfs.regressors(frame_times(n_frames, tr, slice_time_ref), events.onsets, events.durations)


def onoff_regressors(regressors: np.ndarray) -> np.ndarray:
    """The on-off model: all trials as one condition, (H, T, 1)."""
    return regressors.sum(axis=2, keepdims=True)
