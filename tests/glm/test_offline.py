"""The offline GLMsingle-style estimator on synthetic sessions with known betas, HRFs and structured noise."""

from __future__ import annotations

import numpy as np
import pytest

from rt_mindeye.errors import NotFittedError
from rt_mindeye.glm.config import GLMConfig
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle, fit_run_frozen


@pytest.fixture(scope="module")
def fits(synthetic_session):
    s = synthetic_session
    return {m: GLMSingle(model=m).fit(s.runs, s.events, s.tr) for m in "abcd"}


def test_every_model_recovers_known_betas_and_each_step_helps(fits, synthetic_session, correlation):
    s = synthetic_session
    score = {m: correlation(f.betas_, s.true_betas, s.responsive) for m, f in fits.items()}
    assert score["a"] > 0.4
    assert score["b"] > score["a"] + 0.03, score      # the right HRF matters (true HRFs are spread over the library)
    assert score["c"] > score["b"] + 0.05, score      # structured noise is what GLMdenoise removes
    assert score["d"] >= score["c"] - 0.01, score     # ridge never costs much and shrinks the noisy voxels
    for f in fits.values():
        assert f.betas_.shape == (s.true_betas.shape[0], s.runs[0].shape[1]) and f.betas_.dtype == np.float32


def test_hrf_choice_recovers_true_hrf_for_strong_voxels(fits, session_factory):
    s = session_factory(seed=1, structured_sd=0.3, noise_sd=0.4)
    strong = s.responsive & (np.abs(s.true_betas).mean(axis=0) > 1.0)
    chosen = GLMSingle(model="b").fit(s.runs, s.events, s.tr).hrf_index_
    assert strong.sum() > 30
    assert np.mean(np.abs(chosen[strong] - s.true_hrf[strong]) <= 1) > 0.85
    assert np.mean(chosen[strong] == s.true_hrf[strong]) > 0.3
    assert np.all(fits["a"].hrf_index_ == 0)


def test_cross_validation_picks_sensible_pc_counts_and_fractions(fits, session_factory, synthetic_session):
    d = fits["d"]
    assert 2 <= d.n_pcs_ <= 6, d.pc_scores_   # three structured noise sources in the data
    assert d.pc_scores_[d.n_pcs_] > d.pc_scores_[0]
    # Noise-pool voxels are mostly the silent ones.
    assert np.mean(~synthetic_session.responsive[d.noise_pool_]) > 0.75
    # Silent voxels are shrunk hard, strongly responding voxels hardly.
    strong = synthetic_session.responsive & (np.abs(synthetic_session.true_betas).mean(axis=0) > 1.0)
    assert np.median(d.frac_[~synthetic_session.responsive]) < np.median(d.frac_[strong])
    # Without structured noise, no (or almost no) components are worth keeping.
    quiet = session_factory(seed=5, structured_sd=0.0)
    q = GLMSingle(model="c").fit(quiet.runs, quiet.events, quiet.tr)
    assert q.n_pcs_ <= 1, q.pc_scores_


def test_fit_is_deterministic(synthetic_session):
    s = synthetic_session
    a = GLMSingle(model="d").fit(s.runs, s.events, s.tr)
    b = GLMSingle(model="d").fit([r.copy() for r in s.runs], s.events, s.tr)
    assert np.array_equal(a.betas_, b.betas_)
    assert np.array_equal(a.frac_, b.frac_) and a.n_pcs_ == b.n_pcs_
    assert np.array_equal(a.noise_loadings_, b.noise_loadings_)


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


def test_calibration_round_trip(fits, tmp_path):
    cal = fits["d"].calibration_
    cal.save(tmp_path)
    back = GLMCalibration.load(tmp_path)
    assert back.model == "d" and back.n_pcs == cal.n_pcs and back.fractions == cal.fractions
    for name in GLMCalibration._ARRAYS + ("ridge_alpha",):
        assert np.array_equal(getattr(back, name), getattr(cal, name)), name
    with pytest.raises(GLMInputError, match="calibration"):
        GLMCalibration.load(tmp_path / "missing")


def test_parameter_and_input_errors_name_the_culprit(synthetic_session):
    s = synthetic_session
    with pytest.raises(NotFittedError):
        GLMSingle().calibration_
    with pytest.raises(GLMInputError, match="model"):
        GLMSingle(model="e").fit(s.runs, s.events, s.tr)
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
    g = GLMSingle.from_config(GLMConfig(model="c", max_pcs=4))
    assert g.model == "c" and g.max_pcs == 4
