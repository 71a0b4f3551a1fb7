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
from rt_mindeye.glm.workers import (  # noqa: F401  (part of this module's interface)
    n_workers, parallel_map, retain_freed_memory, without_hugepages)


def voxel_chunks(n_vox: int, chunk: int) -> list[slice]:
    """Column slices of at most ``chunk`` voxels, at least two per worker thread when there are enough voxels (the
    chunks of a product run on :func:`parallel_map`'s threads, each with one BLAS thread: on a busy machine BLAS's own
    threads wait on each other, 2.4 s instead of 1.0 s for the HRF-library stage at 20,000 voxels x 11 runs)."""
    n_chunks = max(-(-n_vox // chunk), min(2 * n_workers(), -(-n_vox // 1024)))
    size = -(-n_vox // max(n_chunks, 1))
    return [slice(first, min(first + size, n_vox)) for first in range(0, n_vox, max(size, 1))]


# --- data preparation ----------------------------------------------------------------------------------------------

def percent_signal(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, V) data as % signal change about each voxel's mean over the run; voxels with mean <= 0 become 0."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    mean = np.empty(data.shape[1])
    psc = kernels.percent_signal(data, mean, np.empty_like(data))
    return psc, mean


def percent_of_mean(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``values`` (T, V) as % signal change about a given per-voxel ``mean`` (V,) (e.g. the calibration's), float64;
    0 where the mean is not positive."""
    scale = np.where(mean > 0, 100.0 / np.where(mean > 0, mean, 1.0), 0.0)
    return np.asarray(values, dtype=np.float64) * scale - 100.0 * (scale > 0)


#: Single-precision (T, V) arrays at least this large are prewhitened by :func:`kernels.prewhiten` (the offline fit's
#: runs; the real-time stage's small arrays keep numpy's path).
PREWHITEN_KERNEL_SIZE = 1 << 20


def prewhiten(values: np.ndarray, rho: float, frames: np.ndarray | None = None, axis: int = 0) -> np.ndarray:
    """AR(1) prewhitening along the time ``axis``: each sample minus ``rho`` times the previous one, the first
    scaled by ``sqrt(1 - rho^2)`` (generalised least squares for AR(1) noise of unit innovation variance).

    ``frames``: the acquired volumes' indices when some are missing; across a gap of ``k`` volumes the sample is
    ``(x_t - rho^k x_(t-k)) * sqrt((1 - rho^2) / (1 - rho^(2k)))``, the exact innovation of the AR(1) process."""
    x = np.moveaxis(np.asarray(values), axis, 0)
    out = np.empty_like(x)
    if x.shape[0] == 0 or rho == 0:
        out[...] = x
        return np.moveaxis(out, 0, axis)
    gaps = np.ones(x.shape[0] - 1) if frames is None else np.diff(np.asarray(frames, dtype=np.float64))
    carry = rho ** gaps
    scale = np.sqrt((1.0 - rho ** 2) / (1.0 - carry ** 2))
    shape = (-1,) + (1,) * (x.ndim - 1)
    if x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous and x.size >= PREWHITEN_KERNEL_SIZE:
        # Whole runs: one pass (the same single-precision operations as below, without their temporaries).
        kernels.prewhiten(x, float(np.sqrt(1.0 - rho ** 2)), carry.astype(np.float32), scale.astype(np.float32), out)
        return np.moveaxis(out, 0, axis)
    out[0] = np.sqrt(1.0 - rho ** 2) * x[0]
    out[1:] = (x[1:] - carry.reshape(shape).astype(x.dtype) * x[:-1]) * scale.reshape(shape).astype(x.dtype)
    return np.moveaxis(out, 0, axis)


def unprewhiten(values: np.ndarray, rho: float, axis: int = 0) -> np.ndarray:
    """The inverse of :func:`prewhiten` (consecutive volumes): ``x_0 = y_0 / sqrt(1 - rho^2)``,
    ``x_t = y_t + rho x_(t-1)``."""
    y = np.moveaxis(np.asarray(values), axis, 0)
    out = np.empty_like(y)
    if y.shape[0] == 0 or rho == 0:
        out[...] = y
        return np.moveaxis(out, 0, axis)
    out[0] = y[0] / np.sqrt(1.0 - rho ** 2)
    for t in range(1, y.shape[0]):
        out[t] = y[t] + rho * out[t - 1]
    return np.moveaxis(out, 0, axis)


def noise_autocorrelation(runs: Sequence[np.ndarray], index: np.ndarray, limit: float = 0.9) -> float:
    """The noise's lag-1 autocorrelation: the median over runs of the median over the ``index`` voxels (the noise
    pool) of each voxel's lag-1 autocorrelation in ``runs`` (T, V), data already orthogonal to the drift basis.
    Clipped to [0, ``limit``]; 0 without pool voxels."""
    if index.size == 0:
        return 0.0
    index = np.ascontiguousarray(index, dtype=np.int64)

    def one_run(y: np.ndarray) -> float | None:  # runs on parallel threads
        if y.shape[0] < 3:
            return None
        energy, lag = kernels.lag1_sums(np.ascontiguousarray(y), index, np.empty(index.size), np.empty(index.size))
        ok = energy > 0
        return float(np.median(lag[ok] / energy[ok])) if ok.any() else None

    per_run = [rho for rho in parallel_map(one_run, runs) if rho is not None]
    return float(np.clip(np.median(per_run), 0.0, limit)) if per_run else 0.0


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


def project_runs(runs: Sequence[np.ndarray], bases: Sequence[np.ndarray], chunk: int = 65536) -> list[np.ndarray]:
    """Each run's data minus its projection on its orthonormal nuisance ``bases`` (T, p), in place (float32).

    Done once per fit: every later stage then works on data already orthogonal to the drift (and motion), so a
    design's left singular vectors (orthogonal to the nuisance too) give the same ``U' y`` without projecting the
    data again, and adding noise components only removes their own part (they are orthogonal to the basis)."""
    def project(item) -> np.ndarray:  # runs on parallel threads
        y, basis = item
        y = np.asarray(y, dtype=np.float32)
        if basis.shape[1]:
            b = basis.astype(np.float32)
            for first in range(0, y.shape[1], chunk):
                part = y[:, first:first + chunk]
                part -= b @ (b.T @ part)
        return y

    return parallel_map(project, list(zip(runs, bases)))


def sum_squares(y: np.ndarray) -> np.ndarray:
    """Per column sum of squares of a (T, V) array, accumulated in float64."""
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        y = y.astype(np.float64)
    if y.flags.f_contiguous and not y.flags.c_contiguous:  # e.g. y[:, index]: no copy, sum along its rows
        return kernels.row_sum_squares(y.T, np.empty(y.shape[1]))
    return kernels.column_sum_squares(np.ascontiguousarray(y), np.empty(y.shape[1]))


def brain_voxels(means: np.ndarray, percentile: float, fraction: float) -> np.ndarray:
    """GLMsingle's brain mask: mean intensity above ``fraction`` of its ``percentile``-th percentile."""
    return means > fraction * np.percentile(means, percentile)


def gaussian_mixture_threshold(values: np.ndarray, n_iter: int = 500, conservative: bool = False) -> float:
    """GLMsingle's ``findtailthreshold``: where the posterior of the upper of two Gaussians fitted to ``values``
    (deterministic EM from a quantile start) falls to 50 %, searched from the right over the values' robust range
    on 500 points. With ``conservative``, the mean of the lower component instead.

    Voxels below it form GLMsingle's noise pool; voxels above it (``pcvoxels``) score the noise-PC count.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 10 or np.ptp(x) == 0:
        return float(np.median(x)) if x.size else 0.0
    mu = np.quantile(x, [0.25, 0.9])
    sd = np.full(2, x.std() / 2 + 1e-12)
    w = np.array([0.5, 0.5])
    floor = 1e-6 * np.ptp(x)
    for _ in range(n_iter):
        log_dens = np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2
        # Row maxima and sums of the two columns written out: numpy's reductions along a length-2 axis cost most of
        # this loop (the same single comparison / addition per row).
        log_dens -= np.maximum(log_dens[:, 0], log_dens[:, 1])[:, None]
        resp = np.exp(log_dens)
        resp /= (resp[:, 0] + resp[:, 1])[:, None]
        nk = resp.sum(axis=0) + 1e-12
        new_mu = (resp * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (x[:, None] - new_mu) ** 2).sum(axis=0) / nk) + floor
        w = nk / nk.sum()
        converged = np.allclose(new_mu, mu, rtol=0, atol=1e-10 * max(1.0, np.abs(mu).max()))
        mu = new_mu
        if converged:
            break
    lo, hi = np.argsort(mu)
    if conservative:
        return float(mu[lo])
    low, high = np.percentile(x, [0.5, 99.5])
    grid = np.linspace(min(low, mu.min()), max(high, mu.max()), 500)
    log_lo = np.log(w[lo]) - np.log(sd[lo]) - 0.5 * ((grid - mu[lo]) / sd[lo]) ** 2
    log_hi = np.log(w[hi]) - np.log(sd[hi]) - 0.5 * ((grid - mu[hi]) / sd[hi]) ** 2
    upper = log_hi > log_lo  # posterior of the upper component above 50 %
    below = np.flatnonzero(~upper)
    return float(grid[below[-1]] if below.size else grid[0])


def tail_threshold(values: np.ndarray) -> float:
    """The crossing point of :func:`gaussian_mixture_threshold` (GLMsingle's noise-pool / pcvoxels threshold)."""
    return gaussian_mixture_threshold(values)


def noise_components(pool_psc: np.ndarray, basis: np.ndarray, n_components: int,
                     projected: bool = False) -> np.ndarray:
    """GLMdenoise's per-run noise regressors: top temporal principal components (T, n) of the noise pool.

    Drift/motion is projected out (unless ``projected``: the pool is already orthogonal to ``basis``) and every voxel
    scaled to unit norm first, so each voxel counts equally; the components are orthonormal and orthogonal to
    ``basis``; each one's sign makes its largest entry positive.
    """
    pool = np.asarray(pool_psc) if projected else project_out(basis, np.asarray(pool_psc, dtype=np.float64))
    norms = np.sqrt(sum_squares(pool))
    good = norms > 0
    n = min(n_components, pool.shape[0] - basis.shape[1], int(good.sum()))
    if n <= 0:
        return np.zeros((pool.shape[0], 0))
    gram = np.zeros((pool.shape[0], pool.shape[0]))
    index = np.flatnonzero(good)
    for first in range(0, index.size, 16384):
        part = index[first:first + 16384]
        if part[-1] - part[0] + 1 == part.size:  # a range of columns (every voxel usable): cast without gathering
            scaled = pool[:, part[0]:part[-1] + 1].astype(np.float64)
        else:
            scaled = np.take(pool, part, axis=1).astype(np.float64)
        scaled /= norms[part]
        gram += scaled @ scaled.T
    evals, evecs = np.linalg.eigh(gram)
    comps = evecs[:, ::-1][:, :n]
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(n)])
    return comps * signs


def run_rows(runs: Sequence[np.ndarray]) -> list[slice]:
    """Each run's rows in the runs' (T, V) arrays stacked one above the other."""
    ends = np.cumsum([y.shape[0] for y in runs])
    return [slice(int(end - y.shape[0]), int(end)) for y, end in zip(runs, ends)]


def gather_runs(runs: Sequence[np.ndarray], index: np.ndarray, rows: Sequence[slice]) -> tuple[np.ndarray, list]:
    """The columns ``index`` of every run (T, V) float32 gathered once into one (sum T, P) array, runs one above the
    other at ``rows`` (:func:`run_rows`): an empty array and the gathering (a callable of the run) to run on
    :func:`parallel_map`'s threads, each returning its run's rows (a C-ordered view). The stages that share a pool
    (noise components, spatial loadings, live components) read these rows instead of gathering and stacking it
    again."""
    out = np.empty((rows[-1].stop if rows else 0, index.size), dtype=np.float32)

    def gather(r: int) -> np.ndarray:
        # mode="clip" (the indices are valid): np.take buffers ``out`` in its default mode.
        return np.take(np.asarray(runs[r], dtype=np.float32), index, axis=1, out=out[rows[r]], mode="clip")

    return out, gather


def subsample_pool(pool_mask: np.ndarray, max_voxels: int) -> np.ndarray:
    """Indices of noise-pool voxels, evenly subsampled (deterministically) down to ``max_voxels``."""
    idx = np.flatnonzero(pool_mask)
    if idx.size > max_voxels:
        idx = idx[np.linspace(0, idx.size - 1, max_voxels).round().astype(np.int64)]
    return idx


def _row_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with blocks of ``a``'s rows on :func:`parallel_map`'s threads (each element as one BLAS call
    computes it)."""
    blocks = voxel_chunks(a.shape[0], 256)
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))

    def block(rows: slice) -> None:
        np.matmul(a[rows], b, out=out[rows])

    parallel_map(block, blocks)
    return out


def _gram_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ (a @ b)`` for a wide ``a`` (T, P), both products split over :func:`parallel_map`'s threads (rows of
    ``a``, then its columns)."""
    middle = _row_product(a, b)
    out = np.empty((a.shape[1], b.shape[1]), dtype=np.result_type(a, middle))

    def block(cols: slice) -> None:
        np.matmul(a[:, cols].T, middle, out=out[cols])

    parallel_map(block, voxel_chunks(a.shape[1], 4096))
    return out


def spatial_noise_loadings(pool_psc_runs: Sequence[np.ndarray], bases: Sequence[np.ndarray], n_components: int,
                           seed: int = 0, projected: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Frozen spatial loadings (P, n) and voxel scales (P,) of the session's noise components, for real-time use.

    A live noise-regressor value is ``loadings.T @ (pool_psc / scale)``: the same pattern the calibration's
    per-run components express, applied to each new volume. Computed with a seeded randomized SVD (products in
    single precision: the subspace is what counts). With ``projected`` the runs are already orthogonal to ``bases``.
    """
    runs = [np.asarray(p, dtype=np.float32) if projected else project_out(b, np.asarray(p, dtype=np.float32))
            for p, b in zip(pool_psc_runs, bases)]
    stacked = np.concatenate(runs, axis=0)
    del runs
    return stacked_noise_loadings(stacked, n_components, seed, overwrite=True)


def stacked_noise_loadings(stacked: np.ndarray, n_components: int, seed: int = 0,
                           overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spatial_noise_loadings` of the runs' pool data one above the other, ``stacked (sum T, P)`` float32
    (e.g. from :func:`gather_runs`, already orthogonal to the runs' bases); scaled in place with ``overwrite``, else
    left as it is."""
    scale = np.sqrt(sum_squares(stacked) / max(stacked.shape[0], 1))
    scale[scale == 0] = 1.0
    if overwrite:
        stacked /= scale.astype(np.float32)
    else:
        stacked = stacked / scale.astype(np.float32)
    n = min(n_components, min(stacked.shape))
    if n <= 0:
        return np.zeros((stacked.shape[1], 0)), scale
    rng = np.random.default_rng(seed)
    sketch = _gram_product(stacked, rng.standard_normal((stacked.shape[1], n + 10)).astype(np.float32))
    for _ in range(3):
        sketch, _ = np.linalg.qr(sketch)
        sketch = _gram_product(stacked, sketch)
    q, _ = np.linalg.qr(sketch.astype(np.float64))
    _, _, vt = np.linalg.svd(_row_product(stacked, q.astype(np.float32)).astype(np.float64), full_matrices=False)
    loadings = q @ vt.T[:, :n]
    signs = np.sign(loadings[np.argmax(np.abs(loadings), axis=0), np.arange(n)])
    return loadings * signs, scale


# --- designs in the rotated basis ----------------------------------------------------------------------------------

@dataclass
class Rotated:
    """Per-run SVDs of the projected single-trial designs and the voxels' rotated data (see :mod:`kernels`)."""

    W: np.ndarray        # (R, H, K, K) right singular vectors, W[r, h, trial, component]
    s: np.ndarray        # (R, H, K) singular values, descending
    _Z: np.ndarray | None  # Z (see below), or None: gathered from Z_by_hrf when first asked for
    yss: np.ndarray      # (R, V) ||Yt||^2
    n_trials: np.ndarray  # (R,)
    # Z with its voxels in HRF order (``hrf_groups``'s ``order``), as :func:`rotate` computes it; None if not kept.
    Z_by_hrf: np.ndarray | None = None
    hrf_order: np.ndarray | None = None

    @property
    def Z(self) -> np.ndarray:
        """(R, K, V) ``U' Yt`` for each voxel under its own HRF, in voxel order (the offline fit's stages read
        :attr:`Z_by_hrf` instead: this is gathered on first use)."""
        if self._Z is None:
            self._Z = np.take(self.Z_by_hrf, inverse_permutation(self.hrf_order), axis=2)
        return self._Z

    @property
    def run_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_trials)]).astype(np.int64)

    def z_in_order(self, order: np.ndarray) -> np.ndarray:
        """Z (R, K, V) with its voxels in ``order``: the kept copy when it is :func:`rotate`'s HRF order (the
        stages that work HRF by HRF gather none), else one gather. Not to be written to."""
        if self.Z_by_hrf is not None and np.array_equal(self.hrf_order, order):
            return self.Z_by_hrf
        return np.take(self.Z, order, axis=2)


def _projected_designs(regressors: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
    """(H, T, K) designs with the orthonormal ``nuisance`` (T, p) projected out (float64)."""
    x = np.asarray(regressors, dtype=np.float64)
    if nuisance.shape[1] == 0:
        return x.copy()
    return x - np.matmul(nuisance, np.matmul(nuisance.T, x))


#: Cholesky pivots below this fraction of the largest send a design to the SVD (rank-deficient or ill-conditioned).
CHOLESKY_PIVOT_TOL = 1e-4


def _healthy_pivots(chol: np.ndarray) -> np.ndarray:
    """Whether Cholesky factors ``(..., K, K)`` have healthy pivots: the smallest above :data:`CHOLESKY_PIVOT_TOL`
    of the largest (never for K = 0)."""
    pivots = np.abs(np.diagonal(chol, axis1=-2, axis2=-1))
    if pivots.shape[-1] == 0:
        return np.zeros(pivots.shape[:-1], dtype=bool)
    return pivots.min(axis=-1) > CHOLESKY_PIVOT_TOL * pivots.max(axis=-1)


def _healthy_cholesky(gram: np.ndarray) -> np.ndarray | None:
    """The Cholesky factor of one Gram matrix ``(K, K)`` when its pivots are healthy, else None (also when it is not
    positive definite): the test that sends a design to the SVD or the pseudo-inverse."""
    try:
        chol = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return None
    return chol if _healthy_pivots(chol) else None


def design_ranges(xt: np.ndarray) -> list[np.ndarray]:
    """Orthonormal bases (T, k_h) of the column spaces of the designs ``xt (H, T, K)``.

    Well-conditioned designs (all of them in practice) by Cholesky QR (``Q = X L^-T`` with ``X'X = L L'``: the same
    span as the SVD's left singular vectors at a tenth of the cost); a design with a Cholesky pivot below
    :data:`CHOLESKY_PIVOT_TOL` of the largest (e.g. a trial without any volume) by the SVD, dropping singular values
    below :data:`kernels.SINGULAR_TOL` of the largest as the pseudo-inverse does."""
    n_h = xt.shape[0]
    gram = np.matmul(xt.transpose(0, 2, 1), xt)
    good = np.zeros(n_h, dtype=bool)
    chol = np.zeros_like(gram)
    for h in range(n_h):
        factor = _healthy_cholesky(gram[h])
        if factor is not None:
            chol[h] = factor
            good[h] = True
    out: list[np.ndarray] = [None] * n_h  # type: ignore[list-item]
    if good.any():
        q = np.linalg.solve(chol[good], xt[good].transpose(0, 2, 1)).transpose(0, 2, 1)
        for i, h in enumerate(np.flatnonzero(good)):
            out[h] = q[i]
    for h in np.flatnonzero(~good):
        u, sv, _ = np.linalg.svd(xt[h], full_matrices=False)
        out[h] = u[:, sv > kernels.SINGULAR_TOL * max(sv[0] if sv.size else 0.0, 1e-300)]
    return out


def design_svds(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.linalg.svd(xt, full_matrices=False)`` of the designs ``xt (H, T, K)``, T >= K: for designs with healthy
    Cholesky pivots (:data:`CHOLESKY_PIVOT_TOL`, condition number below 10^4) from the eigendecomposition of
    ``X'X = W diag(s^2) W'`` (``U = X W / s``; a third of the SVD's cost, singular values to ~1e-13 relative at the
    designs' condition numbers), the others (and designs with fewer volumes than trials) by the SVD itself."""
    n_h, n_t, n_k = xt.shape
    if n_t < n_k or n_h == 0:
        return np.linalg.svd(xt, full_matrices=False)
    gram = np.matmul(xt.transpose(0, 2, 1), xt)
    healthy = _healthy_grams(gram)
    u = np.empty((n_h, n_t, n_k))
    sv = np.empty((n_h, n_k))
    vt = np.empty((n_h, n_k, n_k))
    if healthy.any():
        evals, evecs = np.linalg.eigh(gram[healthy])
        w = evecs[:, :, ::-1]
        s = np.sqrt(np.maximum(evals[:, ::-1], 0.0))
        sv[healthy] = s
        vt[healthy] = w.transpose(0, 2, 1)
        u[healthy] = np.matmul(xt[healthy], w) / s[:, None, :]
    for h in np.flatnonzero(~healthy):
        u[h], sv[h], vt[h] = np.linalg.svd(xt[h], full_matrices=False)
    return u, sv, vt


def _split_nuisance(nuisance: np.ndarray, orthogonal_to: int) -> np.ndarray:
    """The nuisance columns the data are not yet orthogonal to (orthonormal, orthogonal to the first ones)."""
    return nuisance[:, orthogonal_to:]


def rotate(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray], nuisance: Sequence[np.ndarray],
           hrf_index: np.ndarray, n_hrfs: int, orthogonal_to: Sequence[int] | None = None,
           unwhiten: float = 0.0) -> Rotated:
    """SVD each run's projected design under each HRF some voxel uses; rotate those voxels' projected data.

    ``data[r]`` (T, V) float32, ``regressors[r]`` (H, T, K), ``nuisance[r]`` (T, p) orthonormal. With
    ``orthogonal_to[r] = q``, ``data[r]`` is already orthogonal to the first ``q`` nuisance columns (see
    :func:`project_runs`) and the others are orthonormal noise components orthogonal to those: the data are then not
    projected again (``U' y`` is the same, ``U`` being orthogonal to the whole nuisance), only their sum of squares
    loses the components' part.

    ``unwhiten = rho``: the model of the unwhitened data ``y = L^-1 data[r]`` (:func:`unprewhiten`), with the designs
    and nuisance given unwhitened, computed without unwhitening the data: ``M' y = (L^-T M)' data[r]`` for the
    design's left singular vectors and the nuisance, and ``||y||^2`` by :func:`kernels.unwhitened_sum_squares`.
    """
    n_runs = len(data)
    n_vox = data[0].shape[1]
    n_trials = np.array([reg.shape[2] for reg in regressors], dtype=np.int64)
    k_max = int(n_trials.max()) if n_runs else 0
    W = np.zeros((n_runs, n_hrfs, k_max, k_max))
    s = np.zeros((n_runs, n_hrfs, k_max))
    Z_by_hrf = np.zeros((n_runs, k_max, n_vox), dtype=np.float32)  # in HRF order: the later stages work HRF by HRF
    yss = np.zeros((n_runs, n_vox))
    # Voxels sorted by HRF (one column gather per run, np.take: 5x faster than fancy indexing) make each HRF's
    # product a contiguous block (kept in that order: Rotated.Z gathers the voxel order only if asked).
    order, groups = hrf_groups(hrf_index)
    used = [h for h, _ in groups]

    def one_run(r: int) -> None:  # runs on parallel threads, each writing its own slices
        to_data = None  # L^-T (T, T): maps a vector's product with the unwhitened data to one with data[r]
        if unwhiten:
            yt = np.ascontiguousarray(data[r])
            to_data = unprewhiten(np.eye(yt.shape[0]), unwhiten).T
            yss[r] = kernels.unwhitened_sum_squares(yt, unwhiten, np.empty(n_vox))
            if nuisance[r].shape[1]:
                yss[r] -= sum_squares((to_data @ nuisance[r]).T.astype(np.float32) @ yt)
        elif orthogonal_to is None or orthogonal_to[r] == 0:
            yt = project_out(nuisance[r], data[r])
            yss[r] = sum_squares(yt)
        else:
            yt = data[r]
            extra = _split_nuisance(nuisance[r], orthogonal_to[r])
            yss[r] = sum_squares(yt)
            if extra.shape[1]:
                yss[r] -= sum_squares(extra.T.astype(np.float32) @ yt)
        kr = int(n_trials[r])
        if kr == 0:
            return
        xt = _projected_designs(regressors[r][used], nuisance[r])
        u, sv, vt = design_svds(xt)
        # Fewer volumes than trials (a real-time run cut short) leave only m < kr singular values: the others are
        # zero, which the gains treat as the pseudo-inverse does.
        m = sv.shape[1]
        if to_data is not None:
            u = np.matmul(to_data, u)
        sorted_y = np.take(yt, order, axis=1)
        del yt
        sorted_z = Z_by_hrf[r, :m]
        for i, (h, cols) in enumerate(groups):
            W[r, h, :kr, :m] = vt[i].T
            s[r, h, :m] = sv[i]
            np.matmul(u[i].T.astype(np.float32), sorted_y[:, cols], out=sorted_z[:, cols])
        del sorted_y

    parallel_map(one_run, range(n_runs))
    return Rotated(W, s, None, yss, n_trials, Z_by_hrf, order)


@dataclass
class ExplainedParts:
    """What :func:`explained_fraction` summed: per run, each HRF's fitted sum of squares ``fitted (R, H, V)`` float32
    and the data's ``total (R, V)``; :func:`explained_fraction_with_components` starts from them."""

    fitted: np.ndarray
    total: np.ndarray


#: Voxels per product of the HRF library's :func:`explained_fraction` (and of its refit with the noise components):
#: a chunk's (sum k_h x chunk) product then stays in cache for its squares and block sums (0.7 s instead of 1.2 s with
#: 8,192 at 20,000 x 11, loaded). The chunk does not change a product's columns there (checked on the 20k x 11 and
#: the bench's sessions); the on-off R^2's one-row-per-HRF products keep the default (8,192: with 1,024 they differ
#: by rounding).
LIBRARY_CHUNK = 1024


def explained_fraction(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray],
                       nuisance: Sequence[np.ndarray], per_run: bool = False, chunk: int = 8192,
                       orthogonal_to: Sequence[int] | None = None, keep_parts: bool = False):
    """Per voxel and HRF, R^2 of each run's OLS fit summed over runs: (H, V). One orthonormal basis per run and
    HRF (:func:`design_ranges`); ``orthogonal_to`` as in :func:`rotate`.

    With ``per_run``, also each run's own R^2, (R, H, V) float32 (GLMsingle's ``R2run``, from which the per-run
    HRF choice ``HRFindexrun`` follows); with ``keep_parts``, also the :class:`ExplainedParts` (returned last).

    ``chunk``: voxels per product (the HRF library's: :data:`LIBRARY_CHUNK`)."""
    n_hrfs = regressors[0].shape[0]
    n_vox = data[0].shape[1]
    fitted = np.zeros((n_hrfs, n_vox))
    total = np.zeros(n_vox)
    runs = np.zeros((len(data), n_hrfs, n_vox), dtype=np.float32) if per_run else None
    parts = (ExplainedParts(np.zeros((len(data), n_hrfs, n_vox), dtype=np.float32), np.zeros((len(data), n_vox)))
             if keep_parts else None)

    def run_design(r: int):  # every run's on parallel threads first (small: they would idle a core in the loop)
        # Every HRF's orthonormal basis side by side: one (sum k_h x T)(T x V) product per chunk of voxels
        # serves all HRFs (one BLAS call instead of one per HRF), then each HRF's block of squares is summed.
        if regressors[r].shape[2] == 0:
            return None
        bases = design_ranges(_projected_designs(regressors[r], nuisance[r]))
        sizes = np.array([b.shape[1] for b in bases])
        kept = np.flatnonzero(sizes > 0)  # an empty design explains nothing
        stacked = np.concatenate([bases[h] for h in kept], axis=1).T.astype(np.float32)
        blocks = np.zeros((kept.size, stacked.shape[0]), dtype=np.float32)  # sums each HRF's rows of squares
        blocks[np.repeat(np.arange(kept.size), sizes[kept]), np.arange(stacked.shape[0])] = 1.0
        return kept, stacked, blocks

    designs = parallel_map(run_design, range(len(data)))
    for r, y in enumerate(data):
        if orthogonal_to is None or orthogonal_to[r] == 0:
            yt = project_out(nuisance[r], y)
            run_total = sum_squares(yt)
        else:
            yt = y
            extra = _split_nuisance(nuisance[r], orthogonal_to[r])
            run_total = sum_squares(yt)
            if extra.shape[1]:
                run_total -= sum_squares(extra.T.astype(np.float32) @ yt)
        total += run_total
        if parts is not None:
            parts.total[r] = run_total
        if designs[r] is None:
            continue
        kept, stacked, blocks = designs[r]
        run_fit = np.zeros((n_hrfs, n_vox))

        def fit_part(part: slice) -> None:
            z = stacked @ yt[:, part]
            np.square(z, out=z)
            run_fit[kept, part] = blocks @ z

        parallel_map(fit_part, voxel_chunks(n_vox, chunk))
        fitted += run_fit
        if parts is not None:
            parts.fitted[r] = run_fit
        if per_run:
            with np.errstate(invalid="ignore", divide="ignore"):
                runs[r] = np.where(run_total > 0, run_fit / run_total, 0.0)
        del yt
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 0, fitted / total, 0.0)
    out = (r2,) + ((runs,) if per_run else ()) + ((parts,) if keep_parts else ())
    return out if len(out) > 1 else r2


#: Smallest eigenvalue of ``I - M'M`` (``M = U'C``: a design's orthonormal basis against the components) for the
#: update of :func:`explained_fraction_with_components`; below it (a component within ~6 degrees of the design's
#: span) the update would amplify the single-precision products' rounding by more than 100x, and that design is
#: recomputed directly.
WOODBURY_MIN_EIGENVALUE = 1e-2


def explained_fraction_with_components(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray],
                                       bases: Sequence[np.ndarray], components: Sequence[np.ndarray],
                                       parts: ExplainedParts, chunk: int = LIBRARY_CHUNK) -> np.ndarray:
    """:func:`explained_fraction` with ``[bases | components]`` as the nuisance, (H, V), from the ``parts`` of the
    fit with ``bases`` alone (``keep_parts``), for data already orthogonal to ``bases``.

    With ``U`` an orthonormal basis of a run's design under one HRF (drift removed), ``C`` the run's components
    (orthonormal, orthogonal to the drift), ``w = U'y``, ``e = C'y``, ``M = U'C``: the design with the components
    projected out spans ``(I - CC')U``, whose Gram matrix is ``I - MM'``, so its fitted sum of squares is
    ``u'(I - MM')^-1 u`` with ``u = w - Me``, which by Woodbury is
    ``|w|^2 - 2 e'f + e'Ke + q'(I - K)^-1 q`` with ``f = M'w = (UM)'y``, ``K = M'M``, ``q = f - Ke``. ``|w|^2`` is
    the kept fitted sum of squares, so the data are read through ``(UM)'`` (n rows per HRF) instead of ``U'`` (one
    row per trial): a sixth of the products of a full pass at 10 components."""
    n_hrfs = regressors[0].shape[0]
    n_vox = data[0].shape[1]
    fitted = np.zeros((n_hrfs, n_vox))
    total = np.zeros(n_vox)

    def run_setup(r: int):  # every run's on parallel threads first (small: they would idle a core in the loop)
        comps = np.asarray(components[r], dtype=np.float64)
        n = comps.shape[1]
        if n == 0 or regressors[r].shape[2] == 0:
            return None
        ranges = design_ranges(_projected_designs(regressors[r], bases[r]))
        updated, direct = [], []
        k_mats, s_inv, d_cols = [], [], []
        for h, u in enumerate(ranges):
            if u.shape[1] == 0:
                continue  # an empty design explains nothing, with or without the components
            m = u.T @ comps
            k = m.T @ m
            s = np.eye(n) - k
            if np.linalg.eigvalsh(s).min() > WOODBURY_MIN_EIGENVALUE:
                updated.append(h)
                k_mats.append(k)
                s_inv.append(np.linalg.inv(s))
                d_cols.append(u @ m)
            else:
                direct.append(h)
        rows = [np.concatenate(d_cols, axis=1).T] if d_cols else []
        direct_sizes = []
        if direct:
            nuisance = np.concatenate([bases[r], comps], axis=1)
            for u in design_ranges(_projected_designs(regressors[r][direct], nuisance)):
                rows.append(u.T)
                direct_sizes.append(u.shape[1])
        stacked = (np.concatenate(rows, axis=0).astype(np.float32) if rows
                   else np.zeros((0, comps.shape[0]), np.float32))
        k_mats = np.asarray(k_mats).reshape(len(updated), n, n)
        s_inv = np.asarray(s_inv).reshape(len(updated), n, n)
        return updated, direct, direct_sizes, stacked, k_mats, s_inv

    setups = parallel_map(run_setup, range(len(data)))
    for r, y in enumerate(data):
        n = np.shape(components[r])[1]
        if n == 0:
            fitted += parts.fitted[r]
            total += parts.total[r]
            continue
        c32 = np.asarray(components[r], dtype=np.float64).T.astype(np.float32)
        if regressors[r].shape[2] == 0:
            total += parts.total[r] - sum_squares(c32 @ y)
            continue
        updated, direct, direct_sizes, stacked, k_mats, s_inv = setups[r]
        n_upd = len(updated) * n
        run_total = np.empty(n_vox)

        # Voxel chunks on parallel threads (one BLAS thread each: 3 vs 16 ms per 8,192 voxels with several, loaded);
        # all done before the next run.
        def one_part(part: slice) -> None:
            e32 = c32 @ y[:, part]
            run_total[part] = parts.total[r, part] - sum_squares(e32)
            prod = stacked @ y[:, part]
            if updated:
                e = e32.astype(np.float64)
                f = prod[:n_upd].astype(np.float64).reshape(len(updated), n, -1)
                ke = np.matmul(k_mats, e)
                q = f - ke
                fitted[updated, part] += (parts.fitted[r][updated, part] - 2.0 * np.einsum("nc,hnc->hc", e, f)
                                          + np.einsum("nc,hnc->hc", e, ke)
                                          + np.einsum("hnc,hnc->hc", q, np.matmul(s_inv, q)))
            start = n_upd
            for h, size in zip(direct, direct_sizes):
                z = prod[start:start + size].astype(np.float64)
                fitted[h, part] += np.einsum("kc,kc->c", z, z)
                start += size

        parallel_map(one_part, voxel_chunks(n_vox, chunk))
        total += run_total
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, fitted / total, 0.0)


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

    @property
    def held_out(self) -> np.ndarray:
        """The held-out CV trial of every (trial, repeat) pair, aligned with ``mates_idx``."""
        return np.repeat(np.arange(self.n_trials), np.diff(self.mates_ptr)).astype(np.int64)


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


def hrf_groups(hrf_index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, slice]]]:
    """The voxel order that makes each HRF's voxels contiguous (stable), and each used HRF's slice in that order."""
    order = np.argsort(hrf_index, kind="stable")
    used, starts, counts = np.unique(hrf_index[order], return_index=True, return_counts=True)
    return order, [(int(h), slice(int(a), int(a + c))) for h, a, c in zip(used, starts, counts)]


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """The index that puts arrays sorted by ``order`` (e.g. :func:`hrf_groups`'s HRF order) back in the original
    order: ``np.take(x[..., order], inverse_permutation(order), axis=-1)`` is ``x``."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return inverse


def ridge_badness(rot: Rotated, hrf_index: np.ndarray, alphas: np.ndarray, test: np.ndarray,
                  cv: CrossValidation, chunk: int = 1024) -> np.ndarray:
    """GLMsingle's ``calcbadness`` (the sum of :func:`kernels.pair_squared_differences`) of the ridge betas for every
    candidate ridge parameter ``alphas (F, V)`` (one per voxel for all runs), against the held-out unregularised
    betas ``test (n_cv, V)``: (F, V).

    The sum over (held-out trial ``i_p``, repeat ``m_p``) pairs is written out per trial: ``sum_p (b[m_p] -
    t[i_p])^2 = sum_j c_j b_j^2 - 2 sum_j b_j u_j + sum_p t[i_p]^2``, ``c_j`` the pairs whose repeat is trial ``j``
    (0 for trials without repeats), ``u_j`` the sum of their held-out betas. A run's ridge betas are ``b = W x``,
    ``x = g * z``, with ``W`` orthonormal, so with ``c`` the run's most common ``c_j``: ``sum_j c_j b_j^2 =
    c ||x||^2 + sum_j (c_j - c) b_j^2`` and ``sum_j b_j u_j = (W' u) . x``. Only the trials whose count differs from
    ``c`` (e.g. images shown once) need their betas: per fraction a few rows of ``W`` instead of all of them, about a
    seventh of the products when most images are repeated in other runs.

    Voxels are grouped by HRF and cut into pieces of at most ``chunk`` (a piece's data stay in cache); pieces run in
    parallel threads (the kernels release the GIL)."""
    n_frac, n_vox = alphas.shape
    order, groups = hrf_groups(hrf_index)
    held_out = cv.held_out
    counts = np.bincount(cv.mates_idx, minlength=cv.n_trials).astype(np.float64)
    held_counts = np.bincount(held_out, minlength=cv.n_trials).astype(np.float64)
    runs = []
    for r in range(rot.s.shape[0]):
        rows = slice(int(cv.run_cv_ptr[r]), int(cv.run_cv_ptr[r + 1]))
        kr = int(rot.n_trials[r])
        if rows.stop == rows.start or kr == 0:
            continue
        trial_counts = np.zeros(kr)
        trial_counts[cv.cv_pos[rows]] = counts[rows]
        values, times = np.unique(trial_counts, return_counts=True)
        common = float(values[np.argmax(times)])
        differ = np.flatnonzero(trial_counts != common)
        runs.append((r, rows, kr, common, differ, trial_counts[differ] - common))
    # Per run and HRF: the rows of W that map the sums to W' u, and those of the trials whose count differs.
    w_cv = {(r, h): np.ascontiguousarray(rot.W[r, h][cv.cv_pos[rows], :kr])
            for r, rows, kr, *_ in runs for h, _ in groups}
    w_differ = {(r, h): np.ascontiguousarray(rot.W[r, h][differ, :kr])
                for r, _, kr, _, differ, _ in runs for h, _ in groups}
    k_max = int(rot.n_trials.max(initial=0))
    pieces = [(h, slice(first, min(first + chunk, cols.stop))) for h, cols in groups
              for first in range(cols.start, cols.stop, chunk)]
    # One gather each into HRF order (a gather per piece would read nearly all of Z's cache lines every time).
    sorted_test = np.take(test, order, axis=1)
    sorted_alphas = np.take(alphas, order, axis=1)
    sorted_z = rot.z_in_order(order)

    def one_piece(piece) -> np.ndarray:
        h, cols = piece
        t = np.ascontiguousarray(sorted_test[:, cols], dtype=np.float64)
        sums = kernels.pair_sums(t, held_out, cv.mates_idx, np.zeros_like(t))
        out = np.empty((n_frac, t.shape[1]))
        out[:] = held_counts @ (t * t)  # sum_p test[held_out[p]]^2
        a = np.ascontiguousarray(sorted_alphas[:, cols], dtype=np.float64)
        z = np.ascontiguousarray(sorted_z[:, :, cols])
        gz = np.empty((k_max, t.shape[1]))
        beta = np.empty((k_max, t.shape[1]))
        for r, rows, kr, common, differ, excess in runs:
            q = w_cv[r, h].T @ sums[rows]
            rows_differ = w_differ[r, h]
            for f in range(n_frac):
                kernels.gained_badness(rot.s[r, h, :kr], a[f], z[r, :kr], q, common, gz[:kr], out[f])
                if differ.size:
                    np.matmul(rows_differ, gz[:kr], out=beta[:differ.size])
                    kernels.weighted_squares(beta[:differ.size], excess, out[f])
        return out

    out = np.empty((n_frac, n_vox))  # voxels in HRF order
    for (_, cols), part in zip(pieces, parallel_map(one_piece, pieces)):
        out[:, cols] = part
    return np.take(out, inverse_permutation(order), axis=1)


def cv_rows(cv: CrossValidation, rot: Rotated) -> np.ndarray:
    """Rows of the cross-validation trials in the all-trials beta matrix."""
    return rot.run_offsets[cv.cv_run] + cv.cv_pos


def solve_gram(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``gram^+ rhs`` for a design's Gram matrix ``X'X`` (K, K): a plain solve when its Cholesky pivots are
    healthy (:data:`CHOLESKY_PIVOT_TOL`), else the pseudo-inverse dropping eigenvalues below ``SINGULAR_TOL^2`` of the
    largest (the SVD's rule on the singular values of ``X``)."""
    if _healthy_cholesky(gram) is not None:
        return np.linalg.solve(gram, rhs)
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > kernels.SINGULAR_TOL ** 2 * max(evals.max(initial=0.0), 1e-300)
    v = evecs[:, keep]
    return v @ ((v.T @ rhs) / evals[keep, None])


def pc_count_scores(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray], bases: Sequence[np.ndarray],
                    components: Sequence[np.ndarray], hrf_index: np.ndarray, cv: CrossValidation, n_max: int,
                    progress=None) -> np.ndarray:
    """GLMsingle's PC-count cross-validation (scores for 0..``n_max`` PCs) on voxels whose ``data[r]`` (T, V) are
    already orthogonal to ``bases[r]``: for each count, the unregularised single-trial betas of every run; each
    held-out trial's 0-PC beta is compared with its repeats' betas in the other runs (``calcbadness``, z-scored with
    the 0-PC betas' mean and sd); the score is minus the median over voxels.

    The data are read once: per run and HRF, ``A = X~' y`` (``X~`` the design without the drift basis), ``C' y`` and
    ``X~' C`` for the components ``C`` (orthogonal to the basis); with the first ``n`` components in the model the
    design's Gram matrix is ``X~'X~ - (X~'C_n)(C_n'X~)`` and its right-hand side ``A - (X~'C_n)(C_n'y)``, so each
    count costs small solves, not another pass over the data."""
    n_runs = len(data)
    # Voxels sorted by HRF: each HRF's voxels are one slice (scores are per voxel, then a median: order-free).
    order, groups = hrf_groups(hrf_index)
    used = [h for h, _ in groups]
    n_trials = np.array([reg.shape[2] for reg in regressors], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_trials)]).astype(np.int64)

    def prepare(r: int):  # runs on parallel threads
        y = np.take(data[r], order, axis=1)
        comps = np.asarray(components[r][:, :n_max], dtype=np.float64)
        cy = (comps.T.astype(np.float32) @ y).astype(np.float64)
        xt = _projected_designs(regressors[r][used], bases[r])
        grams = np.matmul(xt.transpose(0, 2, 1), xt)
        xcs = np.matmul(xt.transpose(0, 2, 1), comps)
        rhs = [(xt[i].T.astype(np.float32) @ y[:, cols]).astype(np.float64) for i, (_, cols) in enumerate(groups)]
        # Without components: B0 = G^-1 A; with the first n, by Woodbury (G_n = G - X_n X_n', X = X~'C):
        # G_n^-1 (A - X_n c_n) = B0 + P_n S_n^-1 (X_n' B0 - c_n), P = G^-1 X, S_n = I - X_n' P_n (n x n), so each
        # count costs an n x n solve and a (K x n)(n x V) product per HRF instead of a K x K inverse and product.
        updates = []
        for inverse, xc, right in zip(_gram_inverses(grams) if n_trials[r] else [], xcs, rhs):
            if inverse is None:
                updates.append(None)
                continue
            b0 = inverse @ right
            updates.append((b0, inverse @ xc, xc.T @ b0))
        return cy, grams, xcs, rhs, updates

    pre = parallel_map(prepare, range(n_runs))
    rows = offsets[cv.cv_run] + cv.cv_pos
    held_out = cv.held_out
    scores = np.zeros(n_max + 1)
    test = sd = None
    for n in range(n_max + 1):
        if progress is not None:
            progress(n, n_max + 1)
        betas = np.zeros((int(offsets[-1]), hrf_index.size), dtype=np.float32)  # the kernels' single precision
        for r in range(n_runs):  # small solves: worker threads would wait on each other for the GIL
            if n_trials[r] == 0:
                continue
            cy, grams, xcs, rhs, updates = pre[r]
            xc_n = xcs[:, :, :n]
            grams_n = grams - np.matmul(xc_n, xc_n.transpose(0, 2, 1))
            healthy = _healthy_grams(grams_n)
            update = [h and u is not None for h, u in zip(healthy, updates)]
            if n and any(update):  # P_n S_n^-1 for every HRF with an update, S_n inverted in one batch
                p_n = np.stack([u[1][:, :n] if ok else np.zeros((xcs.shape[1], n)) for u, ok in zip(updates, update)])
                s_n = np.eye(n) - np.matmul(xc_n.transpose(0, 2, 1), p_n)
                s_n[~np.asarray(update)] = np.eye(n)
                gain = np.matmul(p_n, np.linalg.inv(s_n))
            for i, (_, cols) in enumerate(groups):
                if update[i]:
                    b0, _, d = updates[i]
                    beta = b0 if n == 0 else b0 + gain[i] @ (d[:n] - cy[:n, cols])
                else:
                    beta = solve_gram(grams_n[i], rhs[i] - xc_n[i] @ cy[:n, cols])
                betas[offsets[r]:offsets[r + 1], cols] = beta
        train = betas[rows].astype(np.float64)
        if n == 0:
            sd = betas.astype(np.float64).std(axis=0, ddof=1)
            sd = np.where(sd > 0, sd, 1.0)
            test = np.ascontiguousarray(train / sd)
        badness = kernels.pair_squared_differences(np.ascontiguousarray(train / sd), test, held_out, cv.mates_idx)
        scores[n] = -np.median(badness)
    if progress is not None:
        progress(n_max + 1, n_max + 1)
    return scores


def _healthy_grams(grams: np.ndarray) -> np.ndarray:
    """Which of a stack of Gram matrices (G, K, K) have healthy Cholesky pivots (:data:`CHOLESKY_PIVOT_TOL`, as
    :func:`solve_gram`)."""
    try:
        return _healthy_pivots(np.linalg.cholesky(grams))
    except np.linalg.LinAlgError:  # some matrix not positive definite: check one by one
        return np.array([_healthy_cholesky(gram) is not None for gram in grams], dtype=bool)


def _gram_inverses(grams: np.ndarray) -> list:
    """Inverses of a stack of Gram matrices (G, K, K) whose Cholesky pivots are healthy (:func:`_healthy_grams`),
    None for the others (solved by :func:`solve_gram`)."""
    healthy = _healthy_grams(grams)
    out: list = [None] * grams.shape[0]
    if healthy.any():
        for g, inverse in zip(np.flatnonzero(healthy), np.linalg.inv(grams[healthy])):
            out[g] = inverse
    return out


def choose_pc_count(scores: np.ndarray, stop: float) -> int:
    """GLMsingle's ``select_noise_regressors``: the first PC count whose improvement over none is within ``stop``
    of the best improvement (``stop`` = 1 / ``pcstop``; GLMsingle's 1.05 is 0.952), 0 if none improves."""
    gain = scores - scores[0]
    best = gain.max()
    if not np.isfinite(best) or best <= 0:
        return 0
    return int(np.flatnonzero(gain >= stop * best - 1e-12 * abs(best))[0])


# --- fractional ridge ----------------------------------------------------------------------------------------------

def fraction_alphas(rot: Rotated, hrf_index: np.ndarray, fractions: Sequence[float], n_grid: int,
                    chunk: int = 16384) -> np.ndarray:
    """Ridge parameter per (fraction, voxel), one for all runs, that shrinks the norm of the voxel's whole-session
    OLS betas to each fraction (GLMsingle runs fracridge on the runs' concatenated, block-diagonal design)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    n_runs, n_hrfs = rot.s.shape[:2]
    n_vox = rot.yss.shape[1]
    ratio = np.ones((n_grid, n_vox))  # voxels in HRF order
    grids = np.zeros((n_hrfs, n_grid))
    grids[:, 1:] = np.arange(1, n_grid)  # placeholder increasing grid for unused HRFs
    order, groups = hrf_groups(hrf_index)
    inverse = inverse_permutation(order)
    sorted_z = rot.z_in_order(order).reshape(-1, n_vox)  # rows (run, component)

    def one_hrf(group) -> None:  # HRFs on parallel threads, each filling its own voxels' columns
        h, cols = group
        keep = [(r, k) for r in range(n_runs) for k in range(int(rot.n_trials[r]))
                if rot.s[r, h, k] > kernels.SINGULAR_TOL * rot.s[r, h, 0] and rot.s[r, h, 0] > 0]
        if not keep:
            return
        rr = np.array([r for r, _ in keep])
        kk = np.array([k for _, k in keep])
        sv = rot.s[rr, h, kk]
        grid = np.concatenate([[0.0], np.logspace(np.log10(sv.min() ** 2) - 3, np.log10(sv.max() ** 2) + 4,
                                                  n_grid - 1)])
        grids[h] = grid
        gain2 = (sv[None, :] / (sv[None, :] ** 2 + grid[:, None])) ** 2
        for start in range(cols.start, cols.stop, chunk):
            part = slice(start, min(start + chunk, cols.stop))
            z2 = np.take(sorted_z[:, part], rr * rot.W.shape[2] + kk, axis=0).astype(np.float64)
            np.square(z2, out=z2)
            norms2 = gain2 @ z2
            with np.errstate(invalid="ignore", divide="ignore"):
                part_ratio = np.sqrt(norms2 / norms2[:1])
            part_ratio[:, norms2[0] == 0] = 1.0
            ratio[:, part] = part_ratio

    parallel_map(one_hrf, groups)
    alphas = kernels.fraction_alphas(ratio, grids, fractions, hrf_index[order].astype(np.int64))
    return np.take(alphas, inverse, axis=1)


def rescale_to(betas: np.ndarray, target: np.ndarray) -> np.ndarray:
    """GLMsingle's rescaling: per voxel, the scale and offset (V, 2) that best fit ``target`` (the unregularised
    betas, trials x voxels) from ``betas``; a negative scale falls back to (1, 0)."""
    return kernels.scale_offset(np.ascontiguousarray(betas), np.ascontiguousarray(target),
                                np.empty((betas.shape[1], 2)))


def betas_and_sse(rot: Rotated, hrf_index: np.ndarray, alphas: np.ndarray,
                  chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Single-trial betas (n_all_trials, V) float32 and residual SS per voxel for ``alphas (R, V)``.

    Voxels sorted by HRF, in pieces of at most ``chunk`` (parallel threads): per run, the gains times the rotated
    data (:func:`kernels.ridge_gains`, which also updates the residuals), then one BLAS product with the run's right
    singular vectors gives the piece's betas."""
    n_runs, n_vox = alphas.shape
    offsets = rot.run_offsets
    order, groups = hrf_groups(hrf_index)
    inverse = inverse_permutation(order)
    k_max = int(rot.n_trials.max(initial=0))
    betas = np.zeros((int(offsets[-1]), n_vox), dtype=np.float32)  # columns in HRF order
    sse = np.empty(n_vox)
    pieces = [(h, slice(first, min(first + chunk, cols.stop))) for h, cols in groups
              for first in range(cols.start, cols.stop, chunk)]
    # One gather each into HRF order (a gather per piece would read nearly all of Z's cache lines every time).
    sorted_z = rot.z_in_order(order)
    sorted_alphas = np.take(alphas, order, axis=1).astype(np.float64)
    sorted_yss = np.take(rot.yss, order, axis=1)

    def one_piece(piece) -> None:
        h, cols = piece
        z = np.ascontiguousarray(sorted_z[:, :, cols])
        a = np.ascontiguousarray(sorted_alphas[:, cols])
        res = sorted_yss[:, cols].sum(axis=0)
        gz = np.empty((k_max, z.shape[2]))
        for r in range(n_runs):
            kr = int(rot.n_trials[r])
            if kr == 0:
                continue
            kernels.ridge_gains(rot.s[r, h, :kr], a[r], z[r, :kr], gz[:kr], res)
            np.matmul(rot.W[r, h, :kr, :kr], gz[:kr], out=betas[offsets[r]:offsets[r] + kr, cols])
        sse[cols] = res

    parallel_map(one_piece, pieces)
    return np.take(betas, inverse, axis=1), np.take(sse, inverse)


# --- designs -------------------------------------------------------------------------------------------------------

def run_regressors(hrfs: HRFSet, events: RunEvents, n_frames: int, tr: float, slice_time_ref: float) -> np.ndarray:
    """(H, T, K) single-trial regressors of one run."""
    return hrfs.regressors(frame_times(n_frames, tr, slice_time_ref), events.onsets, events.durations)


def onoff_regressors(regressors: np.ndarray) -> np.ndarray:
    """The on-off model: all trials as one condition, (H, T, 1)."""
    return regressors.sum(axis=2, keepdims=True)


# --- statistics for the real-time estimator ------------------------------------------------------------------------

def live_components(pool_psc: np.ndarray, loadings: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(T, n) live noise regressors of one run, exactly as the real-time stage computes them from each volume."""
    return np.divide(pool_psc, scale, dtype=np.float64) @ loadings


def noise_coefficients(data: Sequence[np.ndarray], regressors: Sequence[np.ndarray], bases: Sequence[np.ndarray],
                       components: Sequence[np.ndarray], hrf_index: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Per voxel, the coefficients (V, n) of the live noise regressors ``components[r] (T, n)`` in the calibration
    runs, fitted jointly with the voxel's single-trial design (its own HRF) and the drift/motion ``bases``.

    By Frisch-Waugh-Lovell, with ``c~`` the components with the run's trial design and basis projected out, the
    coefficients are ``(sum_r c~'c~)^-1 sum_r c~' y`` (``c~' y = c~' y~`` needs no projection of the data), so the
    cost is one small QR per run and HRF plus an (n x T) x (T x V) product per run."""
    n_vox = data[0].shape[1]
    n = components[0].shape[1] if components else 0
    out = np.zeros((n_vox, n))
    if n == 0:
        return out
    order, groups = hrf_groups(hrf_index)
    gram = {h: np.zeros((n, n)) for h, _ in groups}
    cross = np.zeros((n, n_vox))  # voxels in HRF order
    for r, y in enumerate(data):
        sorted_y = np.take(y, order, axis=1)  # each HRF's voxels one slice (one gather per run)

        def one_hrf(group) -> None:  # HRFs on parallel threads: each owns its Gram matrix and columns
            h, cols = group
            q, _ = np.linalg.qr(np.concatenate([bases[r], regressors[r][h]], axis=1))
            ct = components[r] - q @ (q.T @ components[r])
            gram[h] += ct.T @ ct
            for start in range(cols.start, cols.stop, chunk):
                part = slice(start, min(start + chunk, cols.stop))
                cross[:, part] += ct.T @ sorted_y[:, part].astype(np.float64)

        parallel_map(one_hrf, groups)
        del sorted_y
    for h, cols in groups:
        g = gram[h] + 1e-9 * max(np.trace(gram[h]), 1e-300) * np.eye(n)
        out[order[cols]] = np.linalg.solve(g, cross[:, cols]).T
    return out


def motion_coefficients(data: Sequence[np.ndarray], mean: np.ndarray, regressors: Sequence[np.ndarray],
                        drift: Sequence[np.ndarray], motion: Sequence[np.ndarray], components: Sequence[np.ndarray],
                        hrf_index: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Per run, each voxel's motion coefficients (R, V, k): the run's raw data ``data[r]`` (T, V) as % signal change
    about ``mean``, least squares on the motion parameters ``motion[r]`` (T, k) jointly with the voxel's single-trial
    design (its own HRF), the run's polynomial ``drift`` basis and the live noise ``components`` (as the real-time
    stage computes them from the raw volumes). By Frisch-Waugh-Lovell one small QR per run and HRF and one
    (k x T) x (T x V) product per run."""
    n_vox = hrf_index.size
    k = motion[0].shape[1]
    out = np.zeros((len(data), n_vox, k))
    groups = {int(h): np.flatnonzero(hrf_index == h) for h in np.unique(hrf_index)}
    for r, y in enumerate(data):
        m = np.asarray(motion[r], dtype=np.float64)
        m = m - m.mean(axis=0)
        for h, idx in groups.items():
            q, _ = np.linalg.qr(np.concatenate([drift[r], regressors[r][h], components[r]], axis=1))
            mt = m - q @ (q.T @ m)
            gram = mt.T @ mt
            gram += 1e-9 * max(np.trace(gram), 1e-300) * np.eye(k)
            for start in range(0, idx.size, chunk):
                part = idx[start:start + chunk]
                psc = percent_of_mean(y[:, part], mean[part])
                out[r, part] = np.linalg.solve(gram, mt.T @ psc).T
    return out


def reliable_mean(per_run: np.ndarray) -> np.ndarray:
    """The across-run mean (V, k) of per-run coefficients ``per_run`` (R, V, k), shrunk toward zero by its
    reliability (an empirical-Bayes posterior mean): with ``se^2`` the mean's sampling variance from the spread
    across runs and ``tau^2`` the variance of the true coefficients across voxels (per column: mean of the squared
    means minus the mean ``se^2``), each mean is multiplied by ``tau^2 / (tau^2 + se^2)``. The per-voxel ``se^2``
    (R - 1 degrees of freedom each) is smoothed as a voxel factor times a column factor. Needs R >= 2."""
    n_runs = per_run.shape[0]
    if n_runs < 2:
        raise ValueError("reliable_mean needs coefficients from at least 2 runs")
    mean = per_run.mean(axis=0)
    se2 = per_run.var(axis=0, ddof=1) / n_runs
    overall = max(float(se2.mean()), 1e-300)
    smooth = se2.mean(axis=1, keepdims=True) * (se2.mean(axis=0, keepdims=True) / overall)
    power = (mean ** 2).mean(axis=0)
    tau2 = np.maximum(power - smooth.mean(axis=0), 1e-12 * power)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(tau2 + smooth > 0, tau2 / (tau2 + smooth), 0.0)
    return mean * factor


def signal_to_noise_alpha(rot: Rotated, hrf_index: np.ndarray, ols: np.ndarray, sse: np.ndarray, dof: int,
                          floor: float = 0.05) -> np.ndarray:
    """Per voxel, the ridge parameter ``sigma^2 / tau^2`` of a Gaussian prior on its single-trial betas (V,): the
    residual variance per volume of the unregularised single-trial fit over the variance of the true betas across
    trials, estimated as the betas' variance minus the part the noise explains (``sigma^2`` times the mean diagonal of
    ``(X'X)^-1``); ``tau^2`` is kept above ``floor`` times the betas' variance."""
    sigma2 = sse / max(dof, 1)
    n_runs, n_hrfs = rot.s.shape[:2]
    diag_sum = np.zeros(hrf_index.size)
    for r in range(n_runs):
        k = int(rot.n_trials[r])
        if k == 0:
            continue
        s = rot.s[r, :, :k]
        tol = kernels.SINGULAR_TOL * np.maximum(s[:, :1], 1e-300)
        inv = np.zeros_like(s)
        np.divide(1.0, s * s, out=inv, where=s > tol)
        per_hrf = np.einsum("hjk,hk->h", rot.W[r, :, :k, :k] ** 2, inv)  # trace of (X'X)^-1 per HRF
        diag_sum += per_hrf[hrf_index]
    mean_diag = diag_sum / max(int(rot.n_trials.sum()), 1)
    # Narrow chunks: their double-precision temporaries stay in reused heap memory (wide ones page-fault afresh).
    var = np.concatenate([ols[:, i:i + 2048].astype(np.float64).var(axis=0)
                          for i in range(0, ols.shape[1], 2048)]) if ols.shape[1] else np.zeros(0)
    tau2 = np.maximum(var - sigma2 * mean_diag, floor * var)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(tau2 > 0, sigma2 / tau2, 0.0)
    return np.nan_to_num(alpha, nan=0.0, posinf=0.0)
