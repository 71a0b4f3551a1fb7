"""Numba kernels of the offline fit, vectorised over voxels (``prange``), compiled once and cached.

All work in the rotated basis of each run's single-trial design: for run ``r`` and HRF ``h`` the design with the
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


@njit(cache=True, nogil=True)
def column_sum_squares(y, out):
    """``out[v] = sum_t y[t, v]^2`` accumulated in double precision, row by row (one pass over a C-ordered
    ``y (T, V)``, no double-precision copy)."""
    n_t, n_vox = y.shape
    for v in range(n_vox):
        out[v] = 0.0
    for t in range(n_t):
        for v in range(n_vox):
            x = np.float64(y[t, v])
            out[v] += x * x
    return out


@njit(cache=True, nogil=True)
def unwhitened_sum_squares(y, rho, out):
    """``out[v] = sum_t x[t, v]^2`` for ``x`` the AR(1)-unwhitened ``y (T, V)`` (``x_0 = y_0 / sqrt(1 - rho^2)``,
    ``x_t = y_t + rho x_(t-1)``, as ``fit.unprewhiten``), in double precision, without storing ``x``."""
    n_t, n_vox = y.shape
    prev = np.empty(n_vox)
    first = 1.0 / np.sqrt(1.0 - rho * rho)
    for v in range(n_vox):
        x = np.float64(y[0, v]) * first
        prev[v] = x
        out[v] = x * x
    for t in range(1, n_t):
        for v in range(n_vox):
            x = np.float64(y[t, v]) + rho * prev[v]
            prev[v] = x
            out[v] += x * x
    return out


@njit(cache=True, nogil=True)
def row_sum_squares(x, out):
    """``out[v] = sum_t x[v, t]^2`` in double precision (the same order of additions as
    :func:`column_sum_squares` on ``x.T``)."""
    n_vox, n_t = x.shape
    for v in range(n_vox):
        acc = 0.0
        for t in range(n_t):
            e = np.float64(x[v, t])
            acc += e * e
        out[v] = acc
    return out


@njit(cache=True, nogil=True)
def lag1_sums(y, index, energy, lag):
    """For the columns ``index`` of ``y (T, V)``: ``energy[i] = sum_t y[t]^2`` and ``lag[i] = sum_t y[t] y[t-1]``
    in double precision, added in time order (as numpy sums the rows of a gathered copy, which this avoids)."""
    n_t = y.shape[0]
    n = index.shape[0]
    prev = np.empty(n)
    for i in range(n):
        x = np.float64(y[0, index[i]])
        energy[i] = x * x
        lag[i] = 0.0
        prev[i] = x
    for t in range(1, n_t):
        for i in range(n):
            x = np.float64(y[t, index[i]])
            energy[i] += x * x
            lag[i] += x * prev[i]
            prev[i] = x
    return energy, lag


@njit(cache=True, nogil=True)
def prewhiten(x, first, carry, scale, out):
    """AR(1) prewhitening of ``x (T, V)`` float32 along time in one pass: ``out[0] = first * x[0]`` (``first``
    float64, rounded after the product), ``out[t] = (x[t] - carry[t-1] x[t-1]) * scale[t-1]`` in single precision:
    the operations numpy performs for ``fit.prewhiten``."""
    n_t, n_vox = x.shape
    for v in range(n_vox):
        out[0, v] = np.float32(first * np.float64(x[0, v]))
    for t in range(1, n_t):
        c = carry[t - 1]
        sc = scale[t - 1]
        for v in range(n_vox):
            out[t, v] = (x[t, v] - c * x[t - 1, v]) * sc
    return out


@njit(cache=True, nogil=True)
def percent_signal(data, mean, psc):
    """``psc (T, V)`` float32: ``data (T, V)`` as % signal change about each voxel's mean over the run (float64
    ``mean``, accumulated row by row); 0 where the mean is not positive. Arithmetic as numpy's float32
    ``(data - mean32) * (100 / mean)32``."""
    n_t, n_vox = data.shape
    for v in range(n_vox):
        mean[v] = 0.0
    for t in range(n_t):
        for v in range(n_vox):
            mean[v] += np.float64(data[t, v])
    mean32 = np.empty(n_vox, dtype=np.float32)
    scale32 = np.zeros(n_vox, dtype=np.float32)
    for v in range(n_vox):
        mean[v] /= n_t
        mean32[v] = np.float32(mean[v])
        if mean[v] > 0:
            scale32[v] = np.float32(100.0 / mean[v])
    for t in range(n_t):
        for v in range(n_vox):
            psc[t, v] = (np.float32(data[t, v]) - mean32[v]) * scale32[v]
    return psc


@njit(cache=True, nogil=True)
def scale_offset(betas, target, out):
    """GLMsingle's rescaling per voxel: least-squares ``scale, offset`` fitting ``target (N, V)`` from
    ``betas (N, V)`` (two passes in double precision: means, then centred products); a negative or undefined scale
    (no variance) gives (1, 0). ``out (V, 2)``."""
    n, n_vox = betas.shape
    bm = np.zeros(n_vox)
    tm = np.zeros(n_vox)
    for i in range(n):
        for v in range(n_vox):
            bm[v] += np.float64(betas[i, v])
            tm[v] += np.float64(target[i, v])
    for v in range(n_vox):
        bm[v] /= n
        tm[v] /= n
    cov = np.zeros(n_vox)
    var = np.zeros(n_vox)
    for i in range(n):
        for v in range(n_vox):
            db = np.float64(betas[i, v]) - bm[v]
            cov[v] += db * (np.float64(target[i, v]) - tm[v])
            var[v] += db * db
    for v in range(n_vox):
        scale = cov[v] / var[v] if var[v] > 0 else 1.0
        if var[v] > 0 and scale >= 0:
            out[v, 0] = scale
            out[v, 1] = tm[v] - scale * bm[v]
        else:
            out[v, 0] = 1.0
            out[v, 1] = 0.0
    return out


@njit(cache=True, nogil=True, fastmath=True)
def ridge_gains(s, alphas, z, out, sse):
    """``out[k, v] = g(s[k], alphas[v]) * z[k, v]`` with the ridge gains ``g = s / (s^2 + alpha)`` of one run's design
    (singular values ``s (K,)``, descending; 0 for negligible ones): ``W @ out`` are the ridge betas. And each
    voxel's residual sum of squares updated in the rotated basis: ``sse[v] += ||(1 - s g) z||^2 - ||z||^2`` (with
    ``sse`` starting at ``||Yt||^2``). Serial, without the GIL."""
    n_k, n_vox = z.shape
    smax = s[0] if n_k else 0.0
    for k in range(n_k):
        sk = s[k]
        if sk <= SINGULAR_TOL * smax:
            for v in range(n_vox):
                out[k, v] = 0.0  # the residual keeps this component: e = z
            continue
        s2 = sk * sk
        for v in range(n_vox):
            zz = np.float64(z[k, v])
            g = sk / (s2 + alphas[v])
            out[k, v] = g * zz
            e = (1.0 - sk * g) * zz
            sse[v] += e * e - zz * zz
    return out, sse


@njit(cache=True, nogil=True, fastmath=True)
def pair_squared_differences(beta, test, held_out, mates):
    """GLMsingle's ``calcbadness`` sum for one model: per voxel, ``sum_p (beta[mates[p]] - test[held_out[p]])^2``
    over the (held-out trial, repeat in another run) pairs ``p``; ``beta`` and ``test`` are (n_cv, V). Serial,
    without the GIL."""
    n_vox = beta.shape[1]
    out = np.zeros(n_vox)
    for p in range(held_out.shape[0]):
        i = held_out[p]
        m = mates[p]
        for v in range(n_vox):
            d = beta[m, v] - test[i, v]
            out[v] += d * d
    return out


@njit(cache=True, nogil=True)
def pair_sums(test, held_out, mates, out):
    """``out[j] = sum over the pairs p whose repeat mates[p] is j of test[held_out[p]]`` (rows of ``(n_cv, V)``
    arrays; ``out`` zeroed by the caller)."""
    n_vox = test.shape[1]
    for p in range(held_out.shape[0]):
        i = held_out[p]
        m = mates[p]
        for v in range(n_vox):
            out[m, v] += test[i, v]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def gained_badness(s, alphas, z, q, weight, out, badness):
    """``out = g * z`` as :func:`ridge_gains` (the ridge betas being ``W @ out``) and, with ``W`` orthonormal, the
    part of GLMsingle's ``calcbadness`` that every trial's beta shares: ``badness[v] += weight * ||out[:, v]||^2 -
    2 q[:, v] . out[:, v]`` (``weight * ||W x||^2 = weight * ||x||^2``; ``q = W' sums``, see
    :func:`fit.ridge_badness`). Serial, without the GIL."""
    n_k, n_vox = z.shape
    smax = s[0] if n_k else 0.0
    for k in range(n_k):
        sk = s[k]
        if sk <= SINGULAR_TOL * smax:
            for v in range(n_vox):
                out[k, v] = 0.0
            continue
        s2 = sk * sk
        for v in range(n_vox):
            x = sk / (s2 + alphas[v]) * z[k, v]
            out[k, v] = x
            badness[v] += x * (weight * x - 2.0 * q[k, v])
    return out, badness


@njit(cache=True, nogil=True, fastmath=True)
def weighted_squares(beta, weights, out):
    """``out[v] += sum_j weights[j] * beta[j, v]^2``. Serial, without the GIL."""
    n, n_vox = beta.shape
    for j in range(n):
        w = weights[j]
        for v in range(n_vox):
            b = beta[j, v]
            out[v] += w * b * b
    return out
