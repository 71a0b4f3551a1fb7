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


def pair_squared_differences(beta, test, held_out, mates):
    out = np.zeros(beta.shape[1])
    for start in range(0, held_out.size, 256):
        out += ((beta[mates[start:start + 256]] - test[held_out[start:start + 256]]) ** 2).sum(axis=0)
    return out


def pair_sums(test, held_out, mates, out):
    np.add.at(out, mates, test[held_out])
    return out


def gained_badness(s, alphas, z, q, weight, out, badness):
    out[...] = _gains(s, alphas) * z
    badness += (out * (weight * out - 2.0 * q)).sum(axis=0)
    return out, badness


def weighted_squares(beta, weights, out):
    out += (weights[:, None] * beta * beta).sum(axis=0)
    return out


def ridge_gains(s, alphas, z, out, sse):
    g = _gains(s, alphas)
    z = z.astype(np.float64)
    out[...] = g * z
    e = (1.0 - s[:, None] * g) * z
    sse += (e * e - z * z).sum(axis=0)
    return out, sse


def column_sum_squares(y, out):
    for first in range(0, y.shape[1], 16384):
        part = y[:, first:first + 16384].astype(np.float64)
        out[first:first + 16384] = np.einsum("tv,tv->v", part, part)
    return out


def unwhitened_sum_squares(y, rho, out):
    x = np.empty(y.shape)
    x[0] = y[0] / np.sqrt(1.0 - rho ** 2)
    for t in range(1, y.shape[0]):
        x[t] = y[t] + rho * x[t - 1]
    out[:] = np.einsum("tv,tv->v", x, x)
    return out


def row_sum_squares(x, out):
    return column_sum_squares(x.T, out)


def lag1_sums(y, index, energy, lag):
    pool = y[:, index].astype(np.float64)
    energy[:] = np.einsum("tv,tv->v", pool, pool)
    lag[:] = np.einsum("tv,tv->v", pool[1:], pool[:-1])
    return energy, lag


def prewhiten(x, first, carry, scale, out):
    out[0] = first * x[0].astype(np.float64)
    out[1:] = (x[1:] - carry[:, None] * x[:-1]) * scale[:, None]
    return out


def percent_signal(data, mean, psc):
    mean[:] = data.mean(axis=0, dtype=np.float64)
    scale = np.zeros_like(mean)
    good = mean > 0
    scale[good] = 100.0 / mean[good]
    psc[:] = (data - mean.astype(np.float32)) * scale.astype(np.float32)
    return psc


def scale_offset(betas, target, out):
    for start in range(0, betas.shape[1], 16384):
        b = betas[:, start:start + 16384].astype(np.float64)
        t = target[:, start:start + 16384].astype(np.float64)
        bm, tm = b.mean(axis=0), t.mean(axis=0)
        cov = ((b - bm) * (t - tm)).sum(axis=0)
        var = ((b - bm) ** 2).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(var > 0, cov / var, 1.0)
        offset = tm - scale * bm
        bad = ~(scale >= 0) | (var <= 0)
        scale[bad], offset[bad] = 1.0, 0.0
        out[start:start + 16384, 0] = scale
        out[start:start + 16384, 1] = offset
    return out
