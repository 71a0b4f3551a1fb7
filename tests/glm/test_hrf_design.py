"""HRFs, design matrices, events and the numba kernels against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import gamma

from rt_mindeye.glm import kernels, kernels_reference
from rt_mindeye.glm.design import (RunEvents, drift_degree, frame_times, polynomial_drift, read_trials_tsv,
                                   trial_table, write_trials_tsv)
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.hrf import HRFSet, load_hrf_library, response_kernel


def nilearn_style_regressor(frame_t, onsets, durations, tr, oversampling=50):
    """nilearn's compute_regressor math: oversampled boxcar * Glover HRF, linear interpolation to frame times."""
    dt = tr / oversampling
    hr_times = np.arange(0, frame_t[-1] + 40, dt)
    box = np.zeros_like(hr_times)
    for o, d in zip(onsets, durations):
        box[(hr_times >= o) & (hr_times < o + d)] = 1.0
    t = np.linspace(0, 32, int(np.rint(32 / dt)))
    hrf = gamma.pdf(t, 6 / 0.9, loc=dt, scale=0.9) - 0.35 * gamma.pdf(t, 12 / 0.9, loc=dt, scale=0.9)
    hrf /= hrf.sum()
    conv = np.convolve(box, hrf)[: hr_times.size]
    return np.interp(frame_t, hr_times, conv)


def test_library_is_glmsingle_shape_and_kernels_peak_at_one():
    lib = load_hrf_library()
    assert lib.shape == (501, 20)
    peaks = np.argmax(lib, axis=0)
    assert np.all(np.diff(peaks) >= 0), "the library is ordered from early to late peaks"
    for duration in (0.05, 1.0, 3.0):
        k = response_kernel(lib[:, 7], duration)
        assert np.isclose(np.abs(k).max(), 1.0)


def test_glover_design_matches_nilearn_math():
    tr = 1.5
    ft = frame_times(120, tr)
    onsets = np.array([3.0, 20.3, 41.7, 77.1, 120.0])
    durations = np.array([3.0, 3.0, 1.0, 3.0, 2.0])
    ours = HRFSet.canonical("glover").regressors(ft, onsets, durations)[0]
    for j in range(onsets.size):
        ref = nilearn_style_regressor(ft, onsets[j:j + 1], durations[j:j + 1], tr)
        r = np.corrcoef(ours[:, j], ref)[0, 1]
        assert r > 0.999, (j, r)
        # Same shape after peak scaling (ours is peak 1; nilearn's is unit-area): timing agrees to a fraction.
        assert np.abs(ours[:, j] - ref / ref.max()).max() < 0.08


def test_library_regressors_follow_onsets_off_the_tr_grid():
    lib = HRFSet.library()
    ft = frame_times(60, 2.0)
    x = lib.regressors(ft, np.array([10.0, 10.7]), np.array([3.0, 3.0]))
    assert x.shape == (20, 60, 2)
    assert np.all(x[:, ft < 10.0, 0] == 0) and np.all(x[:, ft < 10.7, 1] == 0)
    # The later onset is the same response shifted by 0.7 s: it is smaller just after onset.
    assert np.all(x[:, 6, 1] <= x[:, 6, 0]) and x[0, 6, 1] < x[0, 6, 0]


def test_polynomial_drift_is_unit_norm_legendre_and_degree_rule():
    p = polynomial_drift(192, 3)
    assert p.shape == (192, 4)
    assert np.allclose(np.linalg.norm(p, axis=0), 1.0)
    assert np.linalg.cond(p) < 3
    assert np.allclose(p[:, 1] / p[-1, 1], np.linspace(-1, 1, 192))
    assert drift_degree(192, 1.5) == 2  # 4.8 min -> round(2.4)
    assert drift_degree(64, 1.5) == 1
    assert drift_degree(64, 1.5, 0) == 0


def test_events_tsv_sorting_na_rows_and_errors(tmp_path):
    path = tmp_path / "run_events.tsv"
    path.write_text("onset\tduration\ttrial_type\tstim\n10\t3\tb\tx.png\n2.5\t3\ta\ty.png\n5\t1\tn/a\tz\n")
    ev = RunEvents.from_tsv(path)
    assert list(ev.onsets) == [2.5, 10.0] and ev.trial_types == ("a", "b")
    assert RunEvents.from_tsv(path, condition_column="stim").trial_types == ("y.png", "z", "x.png")
    with pytest.raises(GLMInputError, match="run_events.tsv"):
        RunEvents.from_tsv(path, condition_column="image")
    bad = tmp_path / "bad.tsv"
    bad.write_text("onset\tduration\ttrial_type\nsoon\t3\ta\n")
    with pytest.raises(GLMInputError, match="row 0"):
        RunEvents.from_tsv(bad)


def test_trials_tsv_round_trip(tmp_path):
    events = [RunEvents(np.array([1.0, 5.0]), np.array([3.0, 3.0]), ("a", "b")),
              RunEvents(np.array([2.0]), np.array([3.0]), ("a",))]
    table = trial_table(events)
    write_trials_tsv(tmp_path / "t.tsv", table)
    back = read_trials_tsv(tmp_path / "t.tsv")
    assert list(back["run"]) == [0, 0, 1] and list(back["trial"]) == [0, 1, 0]
    assert list(back["trial_type"]) == ["a", "b", "a"]


def _random_problem(rng, n_runs=3, n_hrfs=2, k=6, t=30, n_vox=9):
    """A rotated problem built from explicit designs, returned with the designs for brute-force checks."""
    designs = rng.normal(size=(n_runs, n_hrfs, t, k))
    data = rng.normal(size=(n_runs, t, n_vox))
    hrf_index = rng.integers(0, n_hrfs, size=n_vox)
    W = np.zeros((n_runs, n_hrfs, k, k))
    s = np.zeros((n_runs, n_hrfs, k))
    Z = np.zeros((n_runs, k, n_vox), dtype=np.float32)
    for r in range(n_runs):
        for h in range(n_hrfs):
            u, sv, vt = np.linalg.svd(designs[r, h], full_matrices=False)
            W[r, h], s[r, h] = vt.T, sv
            idx = hrf_index == h
            Z[r][:, idx] = u.T @ data[r][:, idx]
    yss = np.einsum("rtv,rtv->rv", data, data)
    return designs, data, hrf_index, W, s, Z, yss


@pytest.mark.parametrize("reference", [False, True])
def test_ridge_betas_equal_direct_ridge_solve(monkeypatch, reference):
    from rt_mindeye.glm.fit import Rotated, betas_and_sse
    if reference:  # the plain numpy kernel (the bench's baseline) gives the same numbers
        monkeypatch.setattr(kernels, "ridge_gains", kernels_reference.ridge_gains)
    rng = np.random.default_rng(0)
    designs, data, hrf_index, W, s, Z, yss = _random_problem(rng)
    n_runs, _, t, k = designs.shape
    alphas = rng.uniform(0, 20, size=(n_runs, data.shape[2]))
    n_trials = np.full(n_runs, k, dtype=np.int64)
    # Pieces of 3 voxels: several per HRF.
    betas, sse = betas_and_sse(Rotated(W, s, Z, yss, n_trials), hrf_index, alphas, chunk=3)
    ref_sse = np.zeros(data.shape[2])
    for v in range(data.shape[2]):
        for r in range(n_runs):
            x = designs[r, hrf_index[v]]
            b = np.linalg.solve(x.T @ x + alphas[r, v] * np.eye(k), x.T @ data[r][:, v])
            assert np.allclose(betas[r * k:(r + 1) * k, v], b, atol=1e-4)
            ref_sse[v] += np.sum((data[r][:, v] - x @ b) ** 2)
    assert np.allclose(sse, ref_sse, rtol=1e-5)


def test_fraction_alphas_reach_the_requested_norm_fraction():
    rng = np.random.default_rng(1)
    sv = np.sort(rng.uniform(0.5, 5, size=8))[::-1]
    z = rng.normal(size=(8, 5))
    grid = np.concatenate([[0.0], np.logspace(-4, 4, 400)])
    norms = np.sqrt(((sv[None] / (sv[None] ** 2 + grid[:, None])) ** 2) @ z ** 2)
    ratio = norms / norms[:1]
    fractions = np.array([1.0, 0.9, 0.5, 0.2])
    grid_index = np.zeros(ratio.shape[1], dtype=np.int64)
    alphas = kernels.fraction_alphas(ratio, grid[None, :], fractions, grid_index)
    assert np.all(alphas[0] == 0) and np.all(np.diff(alphas, axis=0) > 0)
    for f, target in enumerate(fractions):
        got = np.sqrt(((sv[:, None] / (sv[:, None] ** 2 + alphas[f])) ** 2 * z ** 2).sum(0)) / norms[0]
        assert np.allclose(got, target, atol=0.01)
    assert np.allclose(kernels_reference.fraction_alphas(ratio, grid[None, :], fractions, grid_index), alphas)


def test_beta_space_cv_kernel_equals_brute_force_calcbadness(monkeypatch):
    rng = np.random.default_rng(2)
    designs, data, hrf_index, W, s, Z, yss = _random_problem(rng, n_runs=3, k=4)
    n_runs, _, t, k = designs.shape
    from rt_mindeye.glm.fit import cross_validation_sets
    # Trials 0-2 of every run repeat across runs (conditions a, b, c: two repeats each, the count most trials have);
    # trial 3 is unique.
    events = [RunEvents(np.arange(4.0), np.ones(4), ("a", "b", "c", f"u{r}")) for r in range(n_runs)]
    cv = cross_validation_sets(events)
    alphas = rng.uniform(0, 5, size=(2, data.shape[2]))
    n_trials = np.full(n_runs, k, dtype=np.int64)

    def betas_of(v, alpha):
        x = [designs[r, hrf_index[v]] for r in range(n_runs)]
        return [np.linalg.solve(xr.T @ xr + alpha * np.eye(k), xr.T @ data[r][:, v]) for r, xr in enumerate(x)]

    test = np.array([[betas_of(v, 0.0)[r][trial] for v in range(data.shape[2])]
                     for r in range(n_runs) for trial in (0, 1, 2)])
    from rt_mindeye.glm.fit import Rotated, ridge_badness
    rot = Rotated(W, s, Z, yss, n_trials)
    got = ridge_badness(rot, hrf_index, alphas, test, cv)
    for f in range(2):
        for v in range(data.shape[2]):
            ridge, ols = betas_of(v, alphas[f, v]), betas_of(v, 0.0)
            # GLMsingle's calcbadness: each held-out unregularised beta against its repeats in the other runs.
            want = sum((ridge[o][trial] - ols[r][trial]) ** 2 for r in range(n_runs) for o in range(n_runs)
                       if o != r for trial in (0, 1, 2))
            assert np.isclose(got[f, v], want, rtol=1e-4), (f, v)
    # The plain numpy kernels (the bench's baseline) give the same numbers.
    for name in ("gained_badness", "pair_sums", "weighted_squares"):
        monkeypatch.setattr(kernels, name, getattr(kernels_reference, name))
    ref = ridge_badness(rot, hrf_index, alphas, test, cv)
    assert np.allclose(ref, got, rtol=1e-6)


def test_tail_threshold_is_the_mixture_crossing_point():
    from rt_mindeye.glm.fit import tail_threshold
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.0, 1.0, 6000), rng.normal(6.0, 1.0, 4000)])
    # Equal widths: the posterior crosses 50 % at 3 + ln(0.6 / 0.4) / 6.
    assert abs(tail_threshold(values) - (3.0 + np.log(1.5) / 6.0)) < 0.1


def test_drift_degree_rounds_halves_up_as_glmsingle():
    from rt_mindeye.glm.design import drift_degree
    assert drift_degree(200, 1.5) == 3   # 5 minutes / 2 = 2.5 -> 3 (Python's round would give 2)
    assert drift_degree(192, 1.5) == 2   # 4.8 / 2 = 2.4
    assert drift_degree(100, 1.5) == 1   # 1.25
    assert drift_degree(192, 1.5, 4) == 4


def test_hrf_peak_at_tr_scales_the_tr_samples_to_one():
    from rt_mindeye.glm.hrf import HRFSet
    tr = 1.6
    frames = np.arange(40) * tr
    continuous = HRFSet.library().regressors(frames, np.array([0.0]), np.array([3.0]))[:, :, 0]
    at_tr = HRFSet.library(peak_tr=tr).regressors(frames, np.array([0.0]), np.array([3.0]))[:, :, 0]
    assert np.allclose(at_tr.max(axis=1), 1.0)
    assert np.all(continuous.max(axis=1) <= 1.0 + 1e-9) and np.any(continuous.max(axis=1) < 0.99)


def test_own_pchip_and_gamma_density_equal_scipy():
    from scipy.interpolate import PchipInterpolator

    from rt_mindeye.glm.hrf import Pchip, gamma_pdf
    rng = np.random.default_rng(4)
    knots = np.cumsum(rng.uniform(0.05, 1.0, size=40))
    values = np.concatenate([rng.normal(size=(40, 3)), np.zeros((40, 1)),
                             np.repeat(np.arange(40.0)[:, None], 1, axis=1) ** 2], axis=1)
    values[10:14, 0] = 1.5  # flat stretch: zero slopes
    points = np.concatenate([rng.uniform(knots[0] - 1, knots[-1] + 1, size=500), knots])
    want = PchipInterpolator(knots, values, axis=0, extrapolate=False)(points)
    got = Pchip(knots, values)(points)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-12, atol=1e-12)
    t = np.concatenate([np.linspace(-1.0, 40.0, 700), [0.0]])
    for shape, scale in ((6.0 / 0.9, 0.9), (16.0, 1.0), (1.0, 2.0)):
        assert np.allclose(gamma_pdf(t, shape, scale), gamma.pdf(t, shape, scale=scale), rtol=1e-12, atol=1e-300)


def test_refit_with_components_equals_a_full_pass_with_them_in_the_nuisance():
    from rt_mindeye.glm.fit import (explained_fraction, explained_fraction_with_components, nuisance_basis,
                                    project_runs)
    rng = np.random.default_rng(5)
    t, n_vox, lib = 80, 300, HRFSet.library()
    data, regs, bases, comps = [], [], [], []
    for r in range(3):
        onsets = np.sort(rng.uniform(0, t * 1.5 - 20, size=8))
        x = lib.regressors(frame_times(t, 1.5), onsets, np.full(8, 3.0))
        regs.append(x)
        b = nuisance_basis(t, 1.5, None)
        # Data driven partly by a component, so removing it matters; one run's first component inside a trial's
        # span (that design is recomputed directly).
        first = x[4][:, :1] if r == 2 else rng.normal(size=(t, 1))
        c = np.linalg.qr(np.concatenate([b, first, rng.normal(size=(t, 2))], axis=1))[0][:, b.shape[1]:]
        y = (x[rng.integers(0, 20)] @ rng.normal(size=8))[:, None] + rng.normal(size=(t, n_vox)) \
            + 3 * c[:, :1] * rng.normal(size=n_vox)
        data.append(y.astype(np.float32))
        bases.append(b)
        comps.append(c)
    data = project_runs(data, bases)
    ortho = [b.shape[1] for b in bases]
    _, parts = explained_fraction(data, regs, bases, orthogonal_to=ortho, keep_parts=True)
    want = explained_fraction(data, regs, [np.concatenate([b, c], axis=1) for b, c in zip(bases, comps)],
                              orthogonal_to=ortho)
    got = explained_fraction_with_components(data, regs, bases, comps, parts)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.array_equal(np.argmax(got, axis=0), np.argmax(want, axis=0))


def test_data_kernels_equal_their_numpy_versions():
    rng = np.random.default_rng(6)
    data = (rng.normal(size=(60, 500)) * 4 + rng.uniform(-5, 900, size=500)).astype(np.float32)
    data[:, :3] = 0.0
    assert np.allclose(kernels.column_sum_squares(data, np.empty(500)),
                       kernels_reference.column_sum_squares(data, np.empty(500)), rtol=1e-12)
    assert np.allclose(kernels.row_sum_squares(data.T, np.empty(500)),
                       kernels_reference.row_sum_squares(data.T, np.empty(500)), rtol=1e-12)
    mean_a, mean_b = np.empty(500), np.empty(500)
    psc_a = kernels.percent_signal(data, mean_a, np.empty_like(data))
    psc_b = kernels_reference.percent_signal(data, mean_b, np.empty_like(data))
    assert np.allclose(mean_a, mean_b, rtol=1e-12) and np.allclose(psc_a, psc_b, rtol=1e-5, atol=1e-5)
    assert np.all(psc_a[:, :3] == 0)
    target = (0.7 * data[:40] + rng.normal(size=(40, 500))).astype(np.float32)
    target[:, 10] = -data[:40, 10]  # negative scale: falls back to (1, 0)
    got = kernels.scale_offset(data[:40], target, np.empty((500, 2)))
    assert np.allclose(got, kernels_reference.scale_offset(data[:40], target, np.empty((500, 2))), rtol=1e-9)
    assert tuple(got[10]) == (1.0, 0.0) and tuple(got[0]) == (1.0, 0.0)  # no variance: (1, 0)
