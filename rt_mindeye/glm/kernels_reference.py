"""Plain numpy versions of :mod:`rt_mindeye.glm.kernels` (same signatures and results).

They loop over runs, HRFs and fractions and vectorise over voxels with numpy only. The tests use them as an oracle
for the numba kernels, and ``bench/glm.py`` times the whole fit with them as the plain numpy/scipy baseline.
"""

from __future__ import annotations

import numpy as np

from rt_mindeye.glm.kernels import SINGULAR_TOL


def fraction_alphas(ratio, alpha_grid, fractions, grid_index):
    n_alpha, n_vox = ratio.shape
    out = np.zeros((len(fractions), n_vox))
    cols = np.arange(n_vox)
    alpha_grid = alpha_grid[grid_index].T  # (A, V): each voxel's own grid
    for f, target in enumerate(fractions):
        if target >= 1.0:
            continue
        below = ratio[1:] <= target
        found = below.any(axis=0)
        a = np.where(found, np.argmax(below, axis=0) + 1, n_alpha - 1)
        r0, r1 = ratio[a - 1, cols], ratio[a, cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(r0 > r1, (r0 - target) / (r0 - r1), 1.0)
        la = np.log(np.maximum(alpha_grid[a - 1, cols], 1e-300))
        lb = np.log(alpha_grid[a, cols])
        value = np.where(a == 1, w * alpha_grid[1, cols], np.exp(la + w * (lb - la)))
        out[f] = np.where(found, value, alpha_grid[n_alpha - 1, cols])
    return out


def _gains(s_row, alphas):
    """(K, nv) gains s / (s^2 + alpha), zero for negligible singular values."""
    smax = s_row[0]
    g = s_row[:, None] / (s_row[:, None] ** 2 + alphas[None, :])
    g[s_row <= SINGULAR_TOL * smax] = 0.0
    return g


def ridge_cv_sse(hrf_index, W, s, Z, alphas, yss, n_trials, cv_run, cv_pos, mates_ptr, mates_idx, run_cv_ptr,
                 w_sum, w_rest):
    n_runs, n_frac, n_vox = alphas.shape
    n_cv = cv_run.size
    mates = np.zeros((n_cv, n_cv))
    for i in range(n_cv):
        m = mates_idx[mates_ptr[i]:mates_ptr[i + 1]]
        mates[i, m] = 1.0 / m.size
    groups = [(h, np.flatnonzero(hrf_index == h)) for h in np.unique(hrf_index)]
    out = np.zeros((n_frac, n_vox))
    for f in range(n_frac):
        beta = np.zeros((n_cv, n_vox))
        run_sum = np.zeros((n_runs, n_vox))
        for r in range(n_runs):
            kr = n_trials[r]
            rows = np.arange(run_cv_ptr[r], run_cv_ptr[r + 1])
            for h, idx in groups:
                zg = _gains(s[r, h, :kr], alphas[r, f, idx]) * Z[r, :kr][:, idx]
                beta[np.ix_(rows, idx)] = W[r, h][cv_pos[rows], :kr] @ zg
                run_sum[r, idx] = w_sum[r, h, :kr] @ zg
        pred = mates @ beta
        total = yss.sum(axis=0).copy()
        for r in range(n_runs):
            kr = n_trials[r]
            others = n_trials.sum() - kr
            typical = (run_sum.sum(axis=0) - run_sum[r]) / others if others > 0 else np.zeros(n_vox)
            rows = np.arange(run_cv_ptr[r], run_cv_ptr[r + 1])
            for h, idx in groups:
                u = W[r, h][cv_pos[rows], :kr].T @ pred[np.ix_(rows, idx)] + np.outer(w_rest[r, h, :kr], typical[idx])
                su = s[r, h, :kr, None] * u
                total[idx] += (su * su - 2.0 * su * Z[r, :kr][:, idx]).sum(axis=0)
        out[f] = total
    return out


def ridge_betas(hrf_index, W, s, Z, alphas, yss, n_trials, run_offsets):
    n_runs, n_vox = alphas.shape
    betas = np.zeros((run_offsets[n_runs], n_vox), dtype=np.float32)
    sse = yss.sum(axis=0).copy()
    groups = [(h, np.flatnonzero(hrf_index == h)) for h in np.unique(hrf_index)]
    for r in range(n_runs):
        kr = n_trials[r]
        for h, idx in groups:
            g = _gains(s[r, h, :kr], alphas[r, idx])
            z = Z[r, :kr][:, idx]
            e = (1.0 - s[r, h, :kr, None] * g) * z
            sse[idx] += (e * e - z * z).sum(axis=0)
            betas[run_offsets[r]:run_offsets[r] + kr, idx] = W[r, h][:kr, :kr] @ (g * z)
    return betas, sse
