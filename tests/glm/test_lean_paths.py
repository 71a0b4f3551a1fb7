"""The `glm fit` command's lean paths give what the plain ones give: start-up without unused imports, the noise pool
gathered once for every stage that reads it, and outputs unmasked straight into NIfTI's (Fortran) order."""

from __future__ import annotations

import importlib
import sys

import nibabel as nib
import numpy as np
import pytest

from rt_mindeye.cli.glm import skipped_imports
from rt_mindeye.glm import fit as F
from rt_mindeye.glm.io import _unmask


def test_skipped_imports_fail_inside_and_work_again_after():
    name = "rt_mindeye_not_a_module_ever"
    with skipped_imports([name, "json"]):
        with pytest.raises(ImportError):
            importlib.import_module(name)
        importlib.import_module("json")  # already imported: untouched
        assert sys.modules.get(name, 0) is None
    assert name not in sys.modules and sys.modules["json"] is not None
    with pytest.raises(ModuleNotFoundError, match="No module named"):  # the ordinary error again
        importlib.import_module(name)


def _runs(seed=3, n_runs=3, n_t=(30, 26, 33), n_vox=50):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n_t[r], n_vox)).astype(np.float32) for r in range(n_runs)]


def test_gathered_pool_gives_the_stacked_runs_and_the_same_loadings():
    runs = _runs()
    index = np.array([1, 4, 5, 9, 17, 22, 23, 30, 41, 48])
    rows = F.run_rows(runs)
    stacked, gather = F.gather_runs(runs, index, rows)
    parts = F.parallel_map(gather, range(len(runs)))
    for r, y in enumerate(runs):
        assert np.array_equal(parts[r], y[:, index]) and parts[r].flags.c_contiguous
        assert np.shares_memory(parts[r], stacked)
    assert np.array_equal(stacked, np.concatenate([y[:, index] for y in runs]))
    kept = stacked.copy()
    bases = [np.zeros((y.shape[0], 0)) for y in runs]
    loadings, scale = F.stacked_noise_loadings(stacked, 4)
    assert np.array_equal(stacked, kept)  # read, not scaled in place
    expected = F.spatial_noise_loadings([y[:, index] for y in runs], bases, 4, projected=True)
    assert np.array_equal(loadings, expected[0]) and np.array_equal(scale, expected[1])
    assert loadings.shape == (index.size, 4)


@pytest.mark.parametrize("n_volumes", [None, 1, 7])
def test_unmask_is_fortran_ordered_and_places_every_value(tmp_path, n_volumes):
    rng = np.random.default_rng(0)
    mask = rng.random((5, 4, 3)) < 0.6
    shape = (mask.sum(),) if n_volumes is None else (n_volumes, mask.sum())
    values = rng.standard_normal(shape).astype(np.float32)
    out = _unmask(values, mask, np.float32)
    assert out.flags.f_contiguous and out.dtype == np.float32
    assert out.shape == mask.shape + (() if n_volumes is None else (n_volumes,))
    expected = np.zeros(out.shape, np.float32)
    expected[mask] = values if n_volumes is None else values.T
    assert np.array_equal(out, expected)
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(out, np.eye(4)), str(path))
    assert np.array_equal(np.asarray(nib.load(str(path)).dataobj), expected)


def test_rotated_data_kept_in_hrf_order_equal_the_gathered_ones():
    rng = np.random.default_rng(1)
    n_t, n_vox, n_hrfs = 40, 30, 3
    runs = [rng.standard_normal((n_t, n_vox)).astype(np.float32) for _ in range(2)]
    regressors = [rng.standard_normal((n_hrfs, n_t, k)) for k in (4, 5)]
    nuisance = [np.linalg.qr(rng.standard_normal((n_t, 2)))[0] for _ in runs]
    hrf_index = rng.integers(0, n_hrfs, n_vox)
    rot = F.rotate(runs, regressors, nuisance, hrf_index, n_hrfs)
    order, _ = F.hrf_groups(hrf_index)
    assert rot.z_in_order(order) is rot.Z_by_hrf
    assert np.array_equal(rot.Z_by_hrf, np.take(rot.Z, order, axis=2))
    other = rng.permutation(n_vox)
    assert np.array_equal(rot.z_in_order(other), np.take(rot.Z, other, axis=2))
    plain = F.Rotated(rot.W, rot.s, rot.Z, rot.yss, rot.n_trials)  # built without the kept copy: gathers
    alphas = np.abs(rng.standard_normal((2, n_vox)))
    for a, b in zip(F.betas_and_sse(rot, hrf_index, alphas), F.betas_and_sse(plain, hrf_index, alphas)):
        assert np.array_equal(a, b)


def _mixture_threshold_with_row_reductions(x, n_iter=500):
    """The EM of `fit.gaussian_mixture_threshold` with numpy's row reductions (max / sum along the length-2 axis)."""
    x = x[np.isfinite(x)]
    mu = np.quantile(x, [0.25, 0.9])
    sd = np.full(2, x.std() / 2 + 1e-12)
    w = np.array([0.5, 0.5])
    floor = 1e-6 * np.ptp(x)
    for _ in range(n_iter):
        log_dens = np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2
        log_dens -= log_dens.max(axis=1, keepdims=True)
        resp = np.exp(log_dens)
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        new_mu = (resp * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (x[:, None] - new_mu) ** 2).sum(axis=0) / nk) + floor
        w = nk / nk.sum()
        converged = np.allclose(new_mu, mu, rtol=0, atol=1e-10 * max(1.0, np.abs(mu).max()))
        mu = new_mu
        if converged:
            break
    return mu, sd, w


@pytest.mark.parametrize("seed", range(6))
def test_mixture_threshold_equals_the_em_with_row_reductions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    x = np.concatenate([rng.gamma(1.5, 0.02, n), rng.normal(0.3, 0.1, n // 4)])
    mu, sd, w = _mixture_threshold_with_row_reductions(x)
    assert F.gaussian_mixture_threshold(x, conservative=True) == float(mu[np.argmin(mu)])
    lo, hi = np.argsort(mu)
    low, high = np.percentile(x, [0.5, 99.5])
    grid = np.linspace(min(low, mu.min()), max(high, mu.max()), 500)
    upper = (np.log(w[hi]) - np.log(sd[hi]) - 0.5 * ((grid - mu[hi]) / sd[hi]) ** 2
             > np.log(w[lo]) - np.log(sd[lo]) - 0.5 * ((grid - mu[lo]) / sd[lo]) ** 2)
    below = np.flatnonzero(~upper)
    assert F.gaussian_mixture_threshold(x) == float(grid[below[-1]] if below.size else grid[0])
