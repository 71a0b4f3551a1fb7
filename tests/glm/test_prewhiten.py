"""AR(1) prewhitening of the offline fit: the whitening is the textbook AR(1) covariance's, the coefficient is
estimated from the noise pool, and it improves the betas on sessions simulated independently of the fit
(``rt_mindeye.glm.simulate``: per-voxel AR(1) noise, random-walk drift, shared noise)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rt_mindeye.glm import fit as F
from rt_mindeye.glm.design import orthonormal_basis
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.estimator import GLMSingle, fit_run_frozen


def ar1_covariance(frames: np.ndarray, rho: float) -> np.ndarray:
    """Covariance of a stationary AR(1) process of unit innovation variance at the given volume indices."""
    lag = np.abs(frames[:, None] - frames[None, :])
    return rho ** lag / (1.0 - rho ** 2)


@pytest.mark.parametrize("frames", [np.arange(12), np.array([0, 1, 2, 5, 6, 7, 8, 12, 13])])
def test_prewhitening_is_the_inverse_square_root_of_the_ar1_covariance(frames):
    rho = 0.4
    whiten = F.prewhiten(np.eye(frames.size), rho, frames)  # the whitening matrix, column by column
    assert np.allclose(whiten @ ar1_covariance(frames, rho) @ whiten.T, np.eye(frames.size), atol=1e-12)
    # Along another axis, and a no-op at rho = 0.
    x = np.random.default_rng(0).normal(size=(3, frames.size, 2))
    assert np.allclose(F.prewhiten(x, rho, frames, axis=1), np.einsum("ts,ksv->ktv", whiten, x))
    assert np.array_equal(F.prewhiten(x, 0.0, axis=1), x)


@pytest.mark.parametrize("frames", [None, np.array([0, 1, 2, 5, 6, 7, 8, 12, 13, 14])])
def test_prewhitening_kernel_of_whole_runs_equals_numpy(monkeypatch, frames):
    x = np.random.default_rng(6).normal(size=(10, 7)).astype(np.float32) * 30
    want = F.prewhiten(x, 0.43, frames)
    monkeypatch.setattr(F, "PREWHITEN_KERNEL_SIZE", 1)  # this small run by the kernel
    assert np.array_equal(F.prewhiten(x, 0.43, frames), want)


def test_noise_autocorrelation_recovers_the_ar1_coefficient_after_the_drift_is_removed():
    rng = np.random.default_rng(3)
    n_frames, n_vox, rho = 300, 400, 0.35
    noise = np.zeros((n_frames, n_vox))
    noise[0] = rng.normal(size=n_vox) / np.sqrt(1 - rho ** 2)
    for t in range(1, n_frames):
        noise[t] = rho * noise[t - 1] + rng.normal(size=n_vox)
    t = np.linspace(-1, 1, n_frames)[:, None]
    data = noise + 5.0 * t + 3.0 * t ** 2 * rng.normal(size=n_vox)
    half = np.linspace(-1, 1, n_frames // 2)[:, None]
    basis = orthonormal_basis(np.concatenate([np.ones_like(half), half, half ** 2], axis=1))
    runs = [F.project_out(basis, data[:150]), F.project_out(basis, data[150:])]
    assert abs(F.noise_autocorrelation(runs, np.arange(n_vox)) - rho) < 0.05
    assert F.noise_autocorrelation(runs, np.arange(0)) == 0.0
    # White noise: no prewhitening (the projection's slightly negative lag-1 autocorrelation is clipped to 0).
    white = [F.project_out(basis, rng.normal(size=(150, n_vox))) for _ in range(2)]
    assert F.noise_autocorrelation(white, np.arange(n_vox)) == 0.0


def test_lag1_kernel_equals_the_numpy_sums_on_a_column_subset():
    from rt_mindeye.glm import kernels, kernels_reference
    y = np.random.default_rng(4).normal(size=(40, 30)).astype(np.float32)
    index = np.array([0, 3, 4, 17, 29], dtype=np.int64)
    got = kernels.lag1_sums(y, index, np.empty(5), np.empty(5))
    want = kernels_reference.lag1_sums(y, index, np.empty(5), np.empty(5))
    pool = y[:, index].astype(np.float64)
    assert np.allclose(got, want, rtol=1e-12)
    assert np.allclose(got[1], (pool[1:] * pool[:-1]).sum(axis=0), rtol=1e-12)


def test_rotation_of_the_unwhitened_model_from_whitened_data():
    """``rotate(..., unwhiten=rho)`` on whitened data equals ``rotate`` on the unwhitened data (the real-time
    signal-to-noise ridge's model), without unwhitening them."""
    from rt_mindeye.glm import kernels, kernels_reference
    rng = np.random.default_rng(5)
    rho, n_frames, n_vox = 0.45, 40, 12
    runs = [rng.normal(size=(n_frames, n_vox)).astype(np.float32) for _ in range(2)]
    regs = [rng.normal(size=(2, n_frames, 5)) for _ in range(2)]
    t = np.linspace(-1, 1, n_frames)[:, None]
    nuisance = [orthonormal_basis(np.concatenate([np.ones_like(t), t, rng.normal(size=(n_frames, 1))], axis=1))
                for _ in range(2)]
    hrf_index = rng.integers(0, 2, size=n_vox)
    want = F.rotate([F.unprewhiten(y, rho) for y in runs], regs, nuisance, hrf_index, 2)
    got = F.rotate(runs, regs, nuisance, hrf_index, 2, unwhiten=rho)
    assert np.array_equal(got.W, want.W) and np.array_equal(got.s, want.s)
    assert np.allclose(got.Z, want.Z, rtol=1e-4, atol=1e-4 * np.abs(want.Z).max())
    assert np.allclose(got.yss, want.yss, rtol=1e-5)
    plain = F.unprewhiten(runs[0].astype(np.float64), rho)
    assert np.allclose(kernels.unwhitened_sum_squares(runs[0], rho, np.empty(n_vox)), (plain ** 2).sum(axis=0))
    assert np.allclose(kernels_reference.unwhitened_sum_squares(runs[0], rho, np.empty(n_vox)),
                       (plain ** 2).sum(axis=0))


def test_estimated_prewhitening_improves_type_d_on_independent_sessions(session_factory, correlation):
    gains = []
    for seed in (21, 22):  # the bench's run layout (8 runs x 192 volumes), fewer voxels
        s = session_factory(seed=seed, n_vox=600, n_runs=8, n_frames=192, shared_sd=1.0)
        off = GLMSingle(model="d", prewhiten=0.0).fit(s.runs, s.events, s.tr)
        auto = GLMSingle(model="d").fit(s.runs, s.events, s.tr)
        assert off.ar_rho_ == 0.0
        # The simulator's per-voxel AR(1) coefficients lie in [0.05, 0.45]; drift and shared noise add to them.
        assert 0.1 < auto.ar_rho_ < 0.7
        gains.append(correlation(auto.betas_, s.true_betas, s.responsive)
                     - correlation(off.betas_, s.true_betas, s.responsive))
    assert min(gains) > 0 and np.mean(gains) > 0.005, gains


def test_frozen_refit_of_a_run_uses_the_calibration_prewhitening(session_factory):
    s = session_factory(seed=22, n_vox=200, n_runs=4)
    fit = GLMSingle(model="d").fit(s.runs, s.events, s.tr)
    cal = fit.calibration_
    assert cal.ar_rho == pytest.approx(fit.ar_rho_) and cal.ar_rho > 0
    whitened = fit_run_frozen(cal, s.runs[1], s.events[1])
    plain = fit_run_frozen(type(cal)(**{**cal.__dict__, "ar_rho": 0.0}), s.runs[1], s.events[1])
    assert whitened.shape == plain.shape and not np.allclose(whitened, plain, atol=1e-3)


def test_prewhiten_option_is_validated(session_factory):
    with pytest.raises(GLMInputError, match="prewhiten"):
        GLMSingle(prewhiten=1.2).fit(*_tiny(session_factory))
    from rt_mindeye.cli.glm import _prewhiten_option
    assert _prewhiten_option("auto") is None and _prewhiten_option("off") == 0.0
    assert _prewhiten_option("0.3") == 0.3
    with pytest.raises(GLMInputError, match="--prewhiten"):
        _prewhiten_option("strong")


def _tiny(session_factory):
    s = session_factory(seed=23, n_vox=60, n_runs=2, n_frames=80)
    return s.runs, s.events, s.tr


def test_unprewhiten_inverts_prewhiten():
    x = np.random.default_rng(4).normal(size=(30, 5))
    assert np.allclose(F.unprewhiten(F.prewhiten(x, 0.45), 0.45), x)
    assert np.allclose(F.prewhiten(F.unprewhiten(x, 0.3, axis=0), 0.3), x)


def test_live_estimates_keep_the_unwhitened_signal_to_noise_ridge(session_factory):
    """The early/refined estimates filter with their own milder AR(1): a prewhitened calibration gives them the
    signal-to-noise ridge of the unwhitened model, equal to an unwhitened fit's wherever both chose the same HRF."""
    s = session_factory(seed=24, n_vox=300, n_runs=4)
    plain = GLMSingle(model="d", prewhiten=0.0, n_pcs=0).fit(s.runs, s.events, s.tr)
    white = GLMSingle(model="d", prewhiten=0.35, n_pcs=0).fit(s.runs, s.events, s.tr)
    assert plain.live_snr_alpha_ is None and plain.calibration_.live_snr_alpha is None
    same = white.hrf_index_ == plain.hrf_index_
    assert same.sum() > 50
    assert np.allclose(white.live_snr_alpha_[same], plain.snr_alpha_[same], rtol=1e-3, atol=1e-6)
    assert not np.allclose(white.snr_alpha_[same], plain.snr_alpha_[same], rtol=0.05)
    assert np.array_equal(white.calibration_.live_snr_alpha, white.live_snr_alpha_)
