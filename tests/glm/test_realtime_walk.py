"""The random-walk (local-level) baseline of the real-time estimator (``drift_walk``): exact against a batch GLS fit
written from the model's covariance, and better early estimates on an independently simulated session."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rt_mindeye.glm import realtime as realtime_module
from rt_mindeye.glm.config import RealtimeConfig
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.estimator import GLMSingle
from rt_mindeye.glm.realtime import RealtimeGLM
from rt_mindeye.glm.simulate import median_correlation, simulate_session


def test_walk_estimate_equals_batch_gls_with_random_walk_covariance_across_a_gap(synthetic_session, monkeypatch):
    """With no tail dropped, the Kalman-innovation sums give generalised least squares under
    cov(y) = I + q * (min(f_a, f_b) - f_0) (a diffuse level that then walks), the missing volume left out."""
    monkeypatch.setattr(realtime_module, "WALK_DROP", 0.0)
    s = synthetic_session
    cal = GLMSingle(model="b").fit(s.runs[:2], s.events[:2], s.tr).calibration_
    data, events = s.runs[3], s.events[3]
    q, gap = 0.05, 40
    cfg = RealtimeConfig(early_volumes=5, refine_every=0, zscore=False, max_drift_degree=0, neighbors=0,
                         ridge=False, ar_rho=0.0, drift_shrinkage=0.0, noise_pcs=False, drift_walk=q)
    rt = RealtimeGLM(cal, cfg).start_run(events, s.tr, n_volumes=data.shape[0])
    emitted = []
    for i, row in enumerate(data):
        emitted += rt.add_gap(i) if i == gap else rt.add_volume(i, row)
    hrfs = cal.hrf_set()
    checked = 0
    for e in emitted:
        if not (e.last_volume > gap and e.last_volume - gap < 10) and e.trial % 7:
            continue
        frames = np.array([f for f in range(e.last_volume + 1) if f != gap])
        regs = hrfs.regressors((frames + cal.slice_time_ref) * s.tr, events.onsets, events.durations)
        psc = data[frames].astype(np.float64) * (100.0 / cal.mean) - 100.0
        cov = np.eye(frames.size) + q * (np.minimum(frames[:, None], frames[None, :]) - frames[0])
        chol = np.linalg.cholesky(cov)
        ref = np.zeros(psc.shape[1])
        for h in np.unique(cal.hrf_index):
            idx = cal.hrf_index == h
            x = regs[h]
            design = np.column_stack([x[:, e.trial], x.sum(axis=1) - x[:, e.trial], np.ones(frames.size)])
            coef = np.linalg.lstsq(np.linalg.solve(chol, design), np.linalg.solve(chol, psc[:, idx]), rcond=None)[0]
            ref[idx] = coef[0]
        assert np.allclose(e.betas, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()), e.trial
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("seed", [21])
def test_walk_improves_early_estimates_on_an_independent_session(seed):
    """On a session from rt_mindeye.glm.simulate (its own HRFs, convolution, AR noise, random-walk drift and shared
    noise; nothing from the fit's design code), the default random-walk baseline gives better early estimates than
    the constant + linear drift alone."""
    sess = simulate_session(seed=seed, n_runs=6, n_vox=1500, responsive_fraction=0.5, drift_sd=2.0)
    events = [RunEvents.coerce(e) for e in sess.events]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = GLMSingle(model="d").fit(sess.runs[:3], events[:3], sess.tr, motion=sess.motion[:3])
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in events])])
    rows = np.arange(offsets[3], offsets[-1])
    scores = {}
    for walk in (0.0, RealtimeConfig().drift_walk):
        early = {}
        for r in range(3, len(events)):
            rt = RealtimeGLM(cal, RealtimeConfig(zscore=False, refine_every=0, drift_walk=walk))
            rt.start_run(events[r], sess.tr, n_volumes=sess.runs[r].shape[0])
            for i, row in enumerate(sess.runs[r]):
                for e in rt.add_volume(i, row, motion_params=sess.motion[r][i]):
                    early[offsets[r] + e.trial] = e.betas
        scores[walk] = median_correlation(np.stack([early[i] for i in rows]), sess.true_betas[rows],
                                          sess.responsive)
    assert RealtimeConfig().drift_walk > 0
    assert scores[RealtimeConfig().drift_walk] > scores[0.0] + 0.005, scores
