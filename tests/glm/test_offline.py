"""The offline GLMsingle-style estimator on simulated sessions whose signal was not built with the fit's regressors
(``rt_mindeye.glm.simulate``: library and out-of-library HRFs, AR(1) noise, drift, low-rank shared noise)."""

from __future__ import annotations

import ast
import inspect
import warnings

import numpy as np
import pytest

from rt_mindeye.errors import NotFittedError
from rt_mindeye.glm import simulate
from rt_mindeye.glm.config import GLMConfig
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.errors import GLMInputError, GLMWarning
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle, fit_run_frozen


def test_simulator_does_not_use_the_fits_design_code():
    tree = ast.parse(inspect.getsource(simulate))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("rt_mindeye.glm")}, imported


def test_every_model_recovers_known_betas_and_each_step_helps(fits, synthetic_session, correlation):
    s = synthetic_session
    score = {m: correlation(f.betas_, s.true_betas, s.responsive) for m, f in fits.items()}
    assert score["a"] > 0.2, score
    assert score["b"] > score["a"] + 0.02, score      # per-voxel HRFs (half of them outside the library)
    assert score["c"] > score["b"] + 0.05, score      # strong low-rank shared noise is what GLMdenoise removes
    assert score["d"] > score["c"] + 0.01, score      # ridge chosen by cross-validation across repeats
    for f in fits.values():
        assert f.betas_.shape == (s.true_betas.shape[0], s.runs[0].shape[1]) and f.betas_.dtype == np.float32


def test_hrf_choice_recovers_library_hrfs_of_strong_voxels(fits, session_factory):
    s = session_factory(seed=1, shared_sd=0.3, thermal_sd=0.5)
    strong = s.responsive & (np.abs(s.true_betas).mean(axis=0) > 1.0) & (s.true_hrf >= 0)
    chosen = GLMSingle(model="b").fit(s.runs, s.events, s.tr).hrf_index_
    assert strong.sum() > 30
    assert np.mean(np.abs(chosen[strong] - s.true_hrf[strong]) <= 1) > 0.8
    assert np.mean(chosen[strong] == s.true_hrf[strong]) > 0.3
    assert np.all(fits["a"].hrf_index_ == 0)


def test_noise_pool_pcvoxels_pc_count_and_fractions(fits, session_factory, synthetic_session):
    s = synthetic_session
    d = fits["d"]
    # GLMsingle's split: pcvoxels above the on-off R^2 crossing point are mostly responsive voxels.
    assert np.mean(s.responsive[d.pcvoxels_]) > 0.8
    assert np.all(d.r2_onoff_[d.noise_pool_] < d.noise_pool_threshold_)
    assert d.n_pcs_ >= 2 and d.pc_scores_[d.n_pcs_] > d.pc_scores_[0], d.pc_scores_
    # GLMsingle's stopping rule: the first count within 1/1.05 of the best improvement.
    gain = d.pc_scores_ - d.pc_scores_[0]
    assert gain[d.n_pcs_] >= gain.max() / 1.05 - 1e-9 and np.all(gain[:d.n_pcs_] < gain.max() / 1.05)
    strong = s.responsive & (np.abs(s.true_betas).mean(axis=0) > 1.0)
    assert np.median(d.frac_[~s.responsive]) < np.median(d.frac_[strong])
    # Rescaling: non-negative scales, unshrunk voxels untouched.
    assert np.all(d.scale_offset_[:, 0] >= 0)
    assert np.all(d.scale_offset_[d.frac_ == 1] == np.array([1.0, 0.0], dtype=np.float32))
    quiet = session_factory(seed=5, shared_sd=0.0)
    q = GLMSingle(model="c").fit(quiet.runs, quiet.events, quiet.tr)
    assert q.n_pcs_ < d.n_pcs_, q.pc_scores_
    fixed = GLMSingle(model="c", n_pcs=3).fit(s.runs, s.events, s.tr)
    assert fixed.n_pcs_ == 3 and fixed.noise_components_[0].shape[1] == 3


def test_save_types_rescale_and_determinism(synthetic_session, fits, correlation):
    s = synthetic_session
    # The single-trial fit in chunks of 77 voxels gives the same result as in one chunk.
    g = GLMSingle(model="d", save_types="abcd", chunk_voxels=77).fit([r.copy() for r in s.runs], s.events, s.tr)
    assert set(g.betas_by_type_) == set("abcd")
    for m in "abcd":
        assert np.allclose(g.betas_by_type_[m], fits[m].betas_, atol=1e-4), m
    d = fits["d"]
    assert np.mean(g.frac_ == d.frac_) > 0.99 and g.n_pcs_ == d.n_pcs_
    for name in ("snr_alpha_", "noise_coef_", "r2_"):
        assert np.allclose(getattr(g, name), getattr(d, name), rtol=1e-3, atol=1e-4), name
    # Deterministic: a second fit (on copies of the data) gives the same bits.
    a = GLMSingle(model="d").fit(s.runs[:3], s.events[:3], s.tr)
    b = GLMSingle(model="d").fit([r.copy() for r in s.runs[:3]], s.events[:3], s.tr)
    assert np.array_equal(a.betas_, b.betas_) and np.array_equal(a.frac_, b.frac_)
    assert np.array_equal(a.noise_loadings_, b.noise_loadings_) and np.array_equal(a.noise_coef_, b.noise_coef_)
    plain = GLMSingle(model="d", rescale=False).fit(s.runs, s.events, s.tr)
    shrunk = plain.frac_ < 1
    assert shrunk.any() and np.all(plain.scale_offset_ == np.array([1.0, 0.0], dtype=np.float32))
    # Rescaling is an affine map per voxel toward the unregularised betas: it moves the betas, not their pattern.
    so = g.scale_offset_
    assert np.allclose(g.betas_, plain.betas_ * so[:, 0] + so[:, 1], atol=1e-3)
    assert not np.allclose(g.betas_[:, shrunk], plain.betas_[:, shrunk], atol=1e-3)
    with pytest.raises(GLMInputError, match="save_types"):
        GLMSingle(model="b", save_types="c").fit(s.runs, s.events, s.tr)


def test_noise_pool_from_a_separate_whole_brain_set(synthetic_session):
    s = synthetic_session
    roi = np.flatnonzero(s.responsive)[:120]
    g = GLMSingle(model="c").fit([y[:, roi] for y in s.runs], s.events, s.tr, noise_runs=s.runs)
    assert g.noise_pool_candidates_.shape == (s.runs[0].shape[1],)
    assert np.mean(~s.responsive[g.noise_pool_candidates_]) > 0.4
    assert g.n_pcs_ >= 1 and g.betas_.shape[1] == roi.size
    with pytest.raises(GLMInputError, match="noise_runs"):
        GLMSingle(model="c").fit(s.runs, s.events, s.tr, noise_runs=s.runs[:2])


def test_single_run_and_no_repeats_warn_and_fall_back(synthetic_session):
    s = synthetic_session
    with pytest.warns(GLMWarning, match="no condition is repeated across runs"):
        one = GLMSingle(model="d").fit(s.runs[:1], s.events[:1], s.tr)
    assert one.n_pcs_ == 0 and np.all(one.frac_ == 1) and one.warnings_
    with pytest.warns(GLMWarning, match="repeated"):
        fixed = GLMSingle(model="d", n_pcs=2, fractions=(0.5,)).fit(s.runs[:1], s.events[:1], s.tr)
    assert fixed.n_pcs_ == 2 and np.all(fixed.frac_ == 0.5)
    unique = [RunEvents(e.onsets, e.durations, tuple(f"r{r}_{t}" for t in e.trial_types))
              for r, e in enumerate(s.events)]
    with pytest.warns(GLMWarning, match="no condition is repeated"):
        GLMSingle(model="c").fit(s.runs, unique, s.tr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GLMWarning)
        GLMSingle(model="b").fit(s.runs[:1], s.events[:1], s.tr)  # type b needs no repeats: no warning


def test_trials_near_the_end_of_a_run_warn(synthetic_session):
    s = synthetic_session
    n_frames = s.runs[0].shape[0]
    late = [RunEvents(np.append(e.onsets, (n_frames - 3) * s.tr), np.append(e.durations, 3.0),
                      e.trial_types + ("late",)) for e in s.events]
    with pytest.warns(GLMWarning, match="less than 8 s before the end"):
        GLMSingle(model="b").fit(s.runs, late, s.tr)


def test_outputs_for_glmsingle_users(fits, synthetic_session):
    s = synthetic_session
    d = fits["d"]
    n_vox = s.runs[0].shape[1]
    assert d.mean_.shape == (n_vox,) and np.all(d.mean_ > 0)
    assert d.r2_onoff_.shape == (n_vox,) and d.hrf_r2_.shape == (n_vox,)
    assert d.r2_run_.shape == (len(s.runs), n_vox) and d.hrf_index_run_.shape == (len(s.runs), n_vox)
    assert d.pc_scores_.shape == (11,) and d.pcvoxels_.dtype == bool
    assert d.scale_offset_.shape == (n_vox, 2)


def test_frozen_per_run_fit_reproduces_the_offline_run(fits, synthetic_session):
    s = synthetic_session
    d = fits["d"]
    k0, k1 = len(s.events[0]), len(s.events[1])
    betas = fit_run_frozen(d.calibration_, s.runs[1], s.events[1])
    assert np.allclose(betas, d.betas_[k0:k0 + k1], atol=1e-4)


def test_trials_table_order_and_motion_regressors(synthetic_session):
    s = synthetic_session
    g = GLMSingle(model="b").fit(s.runs, s.events, s.tr, motion=s.motion)
    assert list(g.trials_["run"]) == [r for r, e in enumerate(s.events) for _ in range(len(e))]
    assert list(g.trials_["trial"][:3]) == [0, 1, 2]
    assert np.all(np.diff(g.trials_["onset"][g.trials_["run"] == 0]) > 0)
    assert g.calibration_.uses_motion


def test_motion_coefficients_recover_the_motion_locked_signal_and_shrink_unreliable_ones(session_factory):
    """The calibration's per-voxel motion coefficients (the real-time prior) on sessions whose motion-locked signal
    the simulator drew (its own maps, not the fit's regressors): close to the truth where motion drives the data
    strongly, shrunk toward zero where the data carry none (the per-run estimates then disagree across runs)."""
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))  # noqa: E731
    got = {}
    for motion_sd in (0.45, 0.0):
        s = session_factory(seed=3, n_runs=4, n_vox=400, motion_sd=motion_sd)
        fit = GLMSingle(model="b").fit(s.runs, s.events, s.tr, motion=s.motion)
        got[motion_sd] = (fit.calibration_.motion_coef, s.true_motion_coef)
    strong, truth = got[0.45]
    assert strong.shape == truth.shape == (400, 6)
    assert np.corrcoef(strong.ravel(), truth.ravel())[0, 1] > 0.8
    assert 0.7 < rms(strong) / rms(truth) < 1.2
    none, zero = got[0.0]
    assert not zero.any() and rms(none) < 0.15 * rms(truth)
    # Without motion, or with motion in a single run, there is no reliability to judge: no coefficients.
    s = session_factory(seed=3, n_runs=2, n_vox=200)
    assert GLMSingle(model="b").fit(s.runs, s.events, s.tr).calibration_.motion_coef is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = GLMSingle(model="b").fit(s.runs[:1], s.events[:1], s.tr, motion=s.motion[:1])
    assert one.calibration_.motion_coef is None


def test_reliable_mean_keeps_consistent_coefficients_and_shrinks_noise():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2000, 6)) * np.array([3.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    per_run = truth[None] + rng.normal(size=(4, 2000, 6))
    from rt_mindeye.glm.fit import reliable_mean
    shrunk = reliable_mean(per_run)
    raw = per_run.mean(axis=0)
    # Columns with real coefficients keep most of their mean; pure-noise columns are shrunk nearly to zero, and the
    # shrunk means are closer to the truth than the raw means.
    assert np.all(np.abs(shrunk[:, :3]).sum(axis=0) > 0.85 * np.abs(raw[:, :3]).sum(axis=0))
    assert np.all(np.abs(shrunk[:, 3:]).sum(axis=0) < 0.2 * np.abs(raw[:, 3:]).sum(axis=0))
    assert np.square(shrunk - truth).sum() < 0.6 * np.square(raw - truth).sum()
    with pytest.raises(ValueError, match="2 runs"):
        reliable_mean(per_run[:1])


def test_calibration_round_trip(fits, tmp_path):
    cal = fits["d"].calibration_
    cal.save(tmp_path)
    back = GLMCalibration.load(tmp_path)
    assert back.model == "d" and back.n_pcs == cal.n_pcs and back.fractions == cal.fractions
    for name in GLMCalibration._ARRAYS + GLMCalibration._OPTIONAL:
        assert np.array_equal(getattr(back, name), getattr(cal, name)), name
    with pytest.raises(GLMInputError, match="calibration"):
        GLMCalibration.load(tmp_path / "missing")


def test_parameter_and_input_errors_name_the_culprit(synthetic_session):
    s = synthetic_session
    with pytest.raises(NotFittedError):
        GLMSingle().calibration_
    with pytest.raises(GLMInputError, match="model"):
        GLMSingle(model="e").fit(s.runs, s.events, s.tr)
    with pytest.raises(GLMInputError, match="n_pcs"):
        GLMSingle(n_pcs=-1).fit(s.runs, s.events, s.tr)
    with pytest.raises(GLMInputError, match="'tr' must be a positive"):
        GLMSingle().fit(s.runs, s.events, -1.0)
    with pytest.raises(GLMInputError, match="events"):
        GLMSingle().fit(s.runs, s.events[:2], s.tr)
    bad = [r.copy() for r in s.runs]
    bad[1][3, 5] = np.nan
    with pytest.raises(GLMInputError, match=r"runs\[1\]"):
        GLMSingle().fit(bad, s.events, s.tr)
    with pytest.raises(GLMInputError, match=r"runs\[2\]"):
        GLMSingle().fit(s.runs[:2] + [s.runs[2][:, :10]] + s.runs[3:], s.events, s.tr)


def test_from_config_uses_the_config_values():
    g = GLMSingle.from_config(GLMConfig(model="c", max_pcs=4, n_pcs=2, rescale=False))
    assert g.model == "c" and g.max_pcs == 4 and g.n_pcs == 2 and g.rescale is False
