"""Numba kernels of the offline fit, vectorised over voxels (``prange``), compiled once and cached.

All three work in the rotated basis of each run's single-trial design: for run ``r`` and HRF ``h`` the design with the
nuisance regressors projected out is ``Xt = U diag(s) W'``; ``z = U' Yt`` holds the only part of a voxel's data that
any single-trial beta depends on, so a ridge (or OLS, alpha = 0) fit is ``beta = W (g * z)`` with
``g = s / (s**2 + alpha)``, and residual sums of squares follow from ``yss = ||Yt||**2`` without rebuilding any
predicted time series (which is where GLMsingle spends much of its time).

Shapes: ``W (R, H, K, K)``, ``s (R, H, K)``, ``Z (R, K, V)``; runs with fewer than ``K`` trials are zero-padded.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Singular values below this fraction of a design's largest are treated as zero (pseudo-inverse).
SINGULAR_TOL = 1e-8


@njit(cache=True, parallel=True)
def fraction_alphas(ratio, alpha_grid, fractions, grid_index):
    """Ridge parameter per (fraction, voxel) reaching each fraction of the OLS beta norm.

    ``ratio (A, V)``: ||beta(alpha_a)|| / ||beta_OLS|| on voxel ``v``'s grid ``alpha_grid[grid_index[v]] (A,)``
    (increasing, starting at 0, so ``ratio[0] == 1``). The norm falls monotonically with alpha; between grid points
    alpha is interpolated linearly in log space (linearly from alpha = 0 for the first interval), as fracridge does.
    """
    n_alpha, n_vox = ratio.shape
    n_frac = fractions.shape[0]
    out = np.zeros((n_frac, n_vox))
    for v in prange(n_vox):
        grid = alpha_grid[grid_index[v]]
        for f in range(n_frac):
            target = fractions[f]
            if target >= 1.0:
                out[f, v] = 0.0
                continue
            a = 1
            while a < n_alpha and ratio[a, v] > target:
                a += 1
            if a >= n_alpha:
                out[f, v] = grid[n_alpha - 1]
                continue
            r0 = ratio[a - 1, v]
            r1 = ratio[a, v]
            w = (r0 - target) / (r0 - r1) if r0 > r1 else 1.0
            if a == 1:
                out[f, v] = w * grid[1]
            else:
                la = np.log(grid[a - 1])
                lb = np.log(grid[a])
                out[f, v] = np.exp(la + w * (lb - la))
    return out


@njit(cache=True, inline="always")
def _gain(s, alpha, smax):
    if s <= SINGULAR_TOL * smax:
        return 0.0
    return s / (s * s + alpha)


@njit(cache=True, parallel=True, fastmath=True)
def ridge_cv_sse(hrf_index, W, s, Z, alphas, yss, n_trials, cv_run, cv_pos, mates_ptr, mates_idx, run_cv_ptr,
                 w_sum, w_rest):
    """Held-out residual sum of squares per (fraction, voxel), leaving one run out at a time.

    Each trial of the held-out run is predicted from the other runs' betas (fitted within their own runs with the
    same ridge fraction): a trial whose condition is shown in another run by the mean betas of those repeats
    (``mates``), any other trial by the mean beta of all trials of the other runs (the voxel's typical response).
    The prediction is scored against the held-out run's data. Repeated trials are listed in the ``cv_*`` arrays,
    sorted by run (run ``r`` owns ``run_cv_ptr[r]:run_cv_ptr[r + 1]``); ``w_sum[r, h] = W[r, h].sum(0)`` turns
    ``g * z`` into the sum of a run's betas and ``w_rest[r, h]`` sums the rows of the unrepeated trials.
    ``alphas (R, F, V)``.
    """
    n_runs, n_frac, n_vox = alphas.shape
    k_max = Z.shape[1]
    n_cv = cv_run.shape[0]
    out = np.zeros((n_frac, n_vox))
    for v in prange(n_vox):
        h = hrf_index[v]
        beta = np.zeros(n_cv)
        zg = np.zeros(k_max)
        u = np.zeros(k_max)
        run_sum = np.zeros(n_runs)
        for f in range(n_frac):
            all_sum = 0.0
            all_count = 0
            for r in range(n_runs):
                kr = n_trials[r]
                smax = s[r, h, 0]
                alpha = alphas[r, f, v]
                acc_sum = 0.0
                for k in range(kr):
                    zg[k] = _gain(s[r, h, k], alpha, smax) * Z[r, k, v]
                    acc_sum += w_sum[r, h, k] * zg[k]
                run_sum[r] = acc_sum
                all_sum += acc_sum
                all_count += kr
                for i in range(run_cv_ptr[r], run_cv_ptr[r + 1]):
                    p = cv_pos[i]
                    acc = 0.0
                    for k in range(kr):
                        acc += W[r, h, p, k] * zg[k]
                    beta[i] = acc
            total = 0.0
            for r in range(n_runs):
                kr = n_trials[r]
                others = all_count - kr
                typical = (all_sum - run_sum[r]) / others if others > 0 else 0.0
                for k in range(kr):
                    u[k] = typical * w_rest[r, h, k]
                for i in range(run_cv_ptr[r], run_cv_ptr[r + 1]):
                    m0 = mates_ptr[i]
                    m1 = mates_ptr[i + 1]
                    pred = 0.0
                    for m in range(m0, m1):
                        pred += beta[mates_idx[m]]
                    pred /= m1 - m0
                    p = cv_pos[i]
                    for k in range(kr):
                        u[k] += W[r, h, p, k] * pred
                sse = yss[r, v]
                for k in range(kr):
                    su = s[r, h, k] * u[k]
                    sse += su * su - 2.0 * su * Z[r, k, v]
                total += sse
            out[f, v] = total
    return out


@njit(cache=True, parallel=True, fastmath=True)
def ridge_betas(hrf_index, W, s, Z, alphas, yss, n_trials, run_offsets):
    """Single-trial betas ``(n_all_trials, V)`` with one ridge parameter per (run, voxel) and the residual sum of
    squares per voxel summed over runs."""
    n_runs, n_vox = alphas.shape
    k_max = Z.shape[1]
    betas = np.zeros((run_offsets[n_runs], n_vox), dtype=np.float32)
    sse = np.zeros(n_vox)
    for v in prange(n_vox):
        h = hrf_index[v]
        zg = np.zeros(k_max)
        total = 0.0
        for r in range(n_runs):
            kr = n_trials[r]
            smax = s[r, h, 0]
            alpha = alphas[r, v]
            res = yss[r, v]
            for k in range(kr):
                g = _gain(s[r, h, k], alpha, smax)
                z = Z[r, k, v]
                zg[k] = g * z
                # ||Yt - Xt b||^2 = ||Yt||^2 - ||z||^2 + ||(1 - s g) z||^2 in the rotated basis.
                e = (1.0 - s[r, h, k] * g) * z
                res += e * e - z * z
            total += res
            base = run_offsets[r]
            for p in range(kr):
                acc = 0.0
                for k in range(kr):
                    acc += W[r, h, p, k] * zg[k]
                betas[base + p, v] = acc
        sse[v] = total
    return betas, sse
