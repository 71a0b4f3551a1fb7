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
