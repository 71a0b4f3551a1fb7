"""The real-time estimator: emission kinds, incremental cost, gaps, and agreement with batch fits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rt_mindeye.glm.config import GLMConfig, RealtimeConfig
from rt_mindeye.glm.errors import GLMInputError, GLMWarning, RealtimeStateError
from rt_mindeye.glm.estimator import GLMSingle, fit_run_frozen
from rt_mindeye.glm.realtime import RealtimeGLM


@pytest.fixture(scope="module")
def calibrated(synthetic_session):
    s = synthetic_session
    return GLMSingle(model="d").fit(s.runs[:3], s.events[:3], s.tr)


def run_stream(rt, data, gap=None):
    out = []
    for i, row in enumerate(data):
        if gap is not None and i == gap:
            out += rt.add_gap(i)
            continue
        out += rt.add_volume(i, row)
    return out


def test_kinds_early_refined_final(calibrated, synthetic_session):
    s = synthetic_session
    cfg = RealtimeConfig(early_volumes=4, refine_every=3, refine_until=10)
    rt = RealtimeGLM(calibrated, cfg).start_run(s.events[3], s.tr)
    live = run_stream(rt, s.runs[3])
    final = rt.end_run()
    k = len(s.events[3])
    early = [e for e in live if e.kind == "early"]
    refined = [e for e in live if e.kind == "refined"]
    assert sorted(e.trial for e in early) == list(range(k))
    assert all(e.n_volumes == 4 for e in early)
    assert {e.n_volumes for e in refined} == {7, 10}
    assert [e.kind for e in final] == ["final"] * k and [e.trial for e in final] == list(range(k))
    for e in live + final:
        assert e.betas.dtype == np.float32 and e.betas.shape == (s.runs[3].shape[1],)
        assert e.zscored and e.run == 0 and e.trial_type == s.events[3].trial_types[e.trial]
    # Early estimates come out in onset order, each one as soon as its 4th post-onset volume arrives.
    first_volume = [e.last_volume for e in early]
    assert first_volume == sorted(first_volume)
    assert early[0].last_volume == int(np.ceil(s.events[3].onsets[0] / s.tr)) + 3


def _reference_design(calibration, data_rows, frames, events, tr, time_scale, degree, n_pcs, motion=None):
    """Per-HRF trial regressors, % signal change and the nuisance columns (polynomial drift on the run's time scale,
    the motion parameters if given, the frozen noise components) of the given frames, written from the definitions
    for the batch references."""
    hrfs = calibration.hrf_set()
    regs = hrfs.regressors((frames + calibration.slice_time_ref) * tr, events.onsets, events.durations)
    psc = data_rows.astype(np.float64) * (100.0 / calibration.mean) - 100.0
    u = (frames + calibration.slice_time_ref) * tr / time_scale
    nuis = [u[:, None] ** np.arange(degree + 1)]
    if motion is not None:
        nuis.append(motion)
    if n_pcs:
        pool = psc[:, calibration.noise_pool_index] / calibration.noise_scale
        nuis.append(pool @ calibration.noise_loadings[:, :n_pcs])
    return regs, psc, np.concatenate(nuis, axis=1)


def _lss_reference(calibration, data_rows, frames, events, tr, trial, time_scale, degree, n_pcs):
    """Batch LSS (numpy lstsq) for one trial on the given frames: trial, sum of the others, drift, noise PCs."""
    regs, psc, nuis = _reference_design(calibration, data_rows, frames, events, tr, time_scale, degree, n_pcs)
    betas = np.zeros(psc.shape[1])
    for h in np.unique(calibration.hrf_index):
        idx = calibration.hrf_index == h
        x = regs[h]
        design = np.column_stack([x[:, trial], x.sum(axis=1) - x[:, trial], nuis])
        coef = np.linalg.lstsq(design, psc[:, idx], rcond=None)[0]
        betas[idx] = coef[0]
    return betas


def test_estimates_equal_batch_lss_and_gaps_are_dropped_not_zero_filled(calibrated, synthetic_session):
    s = synthetic_session
    cal = calibrated.calibration_
    data, events = s.runs[3], s.events[3]
    gap = 30
    cfg = RealtimeConfig(early_volumes=5, refine_every=0, zscore=False, max_drift_degree=1, neighbors=0,
                         ridge=False, ar_rho=0.0, drift_shrinkage=0.0, noise_prior=0.0, drift_walk=0.0)
    rt = RealtimeGLM(cal, cfg).start_run(events, s.tr, n_volumes=data.shape[0])
    live = {e.trial: e for e in run_stream(rt, data, gap=gap)}
    affected = [e for e in live.values() if e.last_volume > gap and e.last_volume - gap < 8]
    assert affected, "some early estimate must be fitted across the gap"
    for e in affected:
        frames = np.array([f for f in range(e.last_volume + 1) if f != gap])
        degree = min(1, int(round((e.last_volume + 1) * s.tr / 120.0)))
        ref = _lss_reference(cal, data[frames], frames, events, s.tr, e.trial, rt._time_scale, degree, cal.n_pcs)
        assert np.allclose(e.betas, ref, atol=1e-3 * max(1.0, np.abs(ref).max())), e.trial
        # Zero-filling the missing volume would give a different answer.
        filled = data[:e.last_volume + 1].copy()
        filled[gap] = 0.0
        zero = _lss_reference(cal, filled, np.arange(e.last_volume + 1), events, s.tr, e.trial, rt._time_scale,
                              degree, cal.n_pcs)
        assert not np.allclose(e.betas, zero, atol=1e-2)


@pytest.mark.parametrize("drift_walk", [0.0, RealtimeConfig().drift_walk])
def test_cost_per_trial_does_not_grow_with_run_length(calibrated, session_factory, drift_walk):
    short = session_factory(seed=7, n_runs=2, n_frames=80)
    long = session_factory(seed=7, n_runs=2, n_frames=320)
    sizes, rows, late = {}, {}, {}
    for name, sess in (("short", short), ("long", long)):
        rt = RealtimeGLM(calibrated, RealtimeConfig(early_volumes=5, refine_every=2, refine_until=12,
                                                    drift_walk=drift_walk))
        rt.start_run(sess.events[0], sess.tr)
        emitted = run_stream(rt, sess.runs[0])
        assert len(sess.events[0]) > (40 if name == "long" else 5)
        assert len(emitted) > len(sess.events[0])
        sizes[name] = rt.work_["solve_size"]
        rows[name] = max(rt.work_["rows_updated"])
        late[name] = rt.work_["rows_updated"]
        # Every estimate solves a system of bounded size: the trial and its neighbours, the other-trials column,
        # drift, motion and noise regressors, early in the run or late.
        n_nuisance = rt.config_.max_drift_degree + 1 + rt._n_pcs
        assert max(sizes[name]) <= 2 * rt.config_.neighbors + 2 + n_nuisance
    assert max(sizes["long"]) == max(sizes["short"])
    # Late in the long run the systems are no larger than early on.
    half = len(sizes["long"]) // 2
    assert max(sizes["long"][half:]) <= max(sizes["long"][:half])
    if not drift_walk:
        # Each volume touches only the trials whose response is under way, plus the sum and the nuisance rows.
        assert rows["long"] <= rows["short"] + 1
    else:
        # With the random-walk baseline a trial's filtered regressor has a geometric tail, dropped below WALK_DROP:
        # the rows a volume touches stay bounded however long the run.
        half = len(late["long"]) // 2
        assert max(late["long"][half:]) <= max(late["long"][:half]) + 2
        # (the trials' rows, besides the sum and nuisance rows every volume touches)
        assert rows["long"] - n_nuisance - 1 < len(long.events[0]) // 2


def test_final_equals_offline_per_run_fit_with_frozen_choices(calibrated, synthetic_session):
    s = synthetic_session
    frozen_choices = RealtimeConfig(zscore=False, snr_ridge=False, final_denoise=False)
    rt = RealtimeGLM(calibrated, frozen_choices).start_run(s.events[0], s.tr)
    run_stream(rt, s.runs[0])
    final = np.stack([e.betas for e in rt.end_run()])
    k0 = len(s.events[0])
    assert np.allclose(final, calibrated.betas_[:k0], atol=1e-4)  # run 0 was a calibration run
    frozen = fit_run_frozen(calibrated.calibration_, s.runs[3], s.events[3])
    rt.start_run(s.events[3], s.tr)
    run_stream(rt, s.runs[3])
    assert np.allclose(np.stack([e.betas for e in rt.end_run()]), frozen, atol=1e-4)


def test_default_final_subtracts_the_predicted_noise_and_uses_the_snr_ridge(calibrated, synthetic_session,
                                                                          correlation):
    s = synthetic_session
    cal = calibrated.calibration_
    assert cal.noise_coef.shape == (cal.n_voxels, cal.noise_loadings.shape[1]) and cal.noise_coef.shape[1] > cal.n_pcs
    rt = RealtimeGLM(cal, RealtimeConfig(zscore=False)).start_run(s.events[3], s.tr)
    run_stream(rt, s.runs[3])
    final = np.stack([e.betas for e in rt.end_run()])
    # Batch reference from the definitions: live components of every volume, each voxel's frozen coefficients,
    # back to intensities; then the frozen per-run fit with the signal-to-noise ridge and its rescaling.
    data = s.runs[3].astype(np.float64)
    psc = data * (100.0 / cal.mean) - 100.0
    comps = (psc[:, cal.noise_pool_index] / cal.noise_scale) @ cal.noise_loadings
    cleaned = data - (comps @ cal.noise_coef.T.astype(np.float64)) * (cal.mean / 100.0)
    snr = dataclasses.replace(cal, ridge_alpha=cal.snr_alpha, scale_offset=cal.snr_scale_offset)
    reference = fit_run_frozen(snr, cleaned.astype(np.float32), s.events[3])
    assert np.allclose(final, reference, atol=1e-3 * max(1.0, np.abs(reference).max()))
    # ...and it is closer to the truth than the end-of-run estimate with the frozen type-d choices alone.
    plain = RealtimeGLM(cal, RealtimeConfig(zscore=False, snr_ridge=False, final_denoise=False))
    plain.start_run(s.events[3], s.tr)
    run_stream(plain, s.runs[3])
    k0 = sum(len(e) for e in s.events[:3])
    truth = s.true_betas[k0:k0 + len(s.events[3])]
    before = correlation(np.stack([e.betas for e in plain.end_run()]), truth, s.responsive)
    assert correlation(final, truth, s.responsive) > before + 0.01


def test_realtime_accuracy_improves_with_delay_and_final(calibrated, synthetic_session, correlation):
    s = synthetic_session
    cfg = RealtimeConfig(early_volumes=3, refine_every=1, refine_until=12, zscore=False)
    by_n = {3: {}, 6: {}, 12: {}}
    rt = RealtimeGLM(calibrated, cfg).start_run(s.events[3], s.tr)
    for e in run_stream(rt, s.runs[3]):
        if e.n_volumes in by_n:
            by_n[e.n_volumes][e.trial] = e.betas
    final = np.stack([e.betas for e in rt.end_run()])
    k0 = sum(len(e) for e in s.events[:3])
    truth = s.true_betas[k0:k0 + len(s.events[3])]
    score = {n: correlation(np.stack([v[t] for t in sorted(v)]), truth[sorted(v)], s.responsive)
             for n, v in by_n.items()}
    score["final"] = correlation(final, truth, s.responsive)
    assert score[6] > score[3] + 0.1 and score["final"] > 0.3, score


def test_zscoring_uses_calibration_statistics(calibrated, synthetic_session):
    s = synthetic_session
    raw = RealtimeGLM(calibrated, RealtimeConfig(zscore=False)).start_run(s.events[3], s.tr)
    z = RealtimeGLM(calibrated, GLMConfig()).start_run(s.events[3], s.tr)
    a, b = run_stream(raw, s.runs[3]), run_stream(z, s.runs[3])
    cal = calibrated.calibration_
    assert not a[0].zscored and b[0].zscored
    assert np.allclose(b[0].betas, (a[0].betas - cal.beta_mean) / cal.beta_std, atol=1e-4)


def test_state_and_input_errors(calibrated, synthetic_session):
    s = synthetic_session
    rt = RealtimeGLM(calibrated)
    with pytest.raises(RealtimeStateError):
        rt.add_volume(0, s.runs[0][0])
    rt.start_run(s.events[0], s.tr)
    rt.add_volume(3, s.runs[0][3])
    with pytest.raises(GLMInputError, match="increasing order"):
        rt.add_volume(2, s.runs[0][2])
    with pytest.raises(GLMInputError, match="voxels"):
        rt.add_volume(4, s.runs[0][4][:10])
    with pytest.raises(GLMInputError, match="calibration"):
        RealtimeGLM(object()).start_run(s.events[0], s.tr)
    rt.end_run()
    with pytest.raises(RealtimeStateError):
        rt.end_run()


def _local_ridge_reference(calibration, data_rows, frames, events, tr, trial, time_scale, degree, neighbors, alpha):
    """Batch ridge fit for one trial: own columns for the trial and its started neighbours (penalised by alpha),
    one column for every other trial, drift (unpenalised)."""
    regs, psc, nuis = _reference_design(calibration, data_rows, frames, events, tr, time_scale, degree, n_pcs=0)
    t_last = (frames[-1] + calibration.slice_time_ref) * tr
    own = [k for k in range(max(0, trial - neighbors), min(len(events), trial + neighbors + 1))
           if events.onsets[k] <= t_last]
    betas = np.zeros(psc.shape[1])
    for v in range(psc.shape[1]):
        x = regs[calibration.hrf_index[v]]
        design = np.column_stack([x[:, own], x.sum(axis=1) - x[:, own].sum(axis=1), nuis])
        penalty = np.zeros(design.shape[1])
        penalty[:len(own)] = alpha[v]
        coef = np.linalg.solve(design.T @ design + np.diag(penalty) + 1e-12 * np.eye(design.shape[1]),
                               design.T @ psc[:, v])
        betas[v] = coef[own.index(trial)]
    return betas


def test_local_ridge_estimate_equals_batch_ridge_fit(calibrated, synthetic_session):
    s = synthetic_session
    cal = calibrated.calibration_
    cfg = RealtimeConfig(early_volumes=6, refine_every=0, zscore=False, neighbors=2, noise_pcs=False, ar_rho=0.0,
                         drift_shrinkage=0.0, ridge_prior_mean=False, drift_walk=0.0)
    rt = RealtimeGLM(cal, cfg).start_run(s.events[3], s.tr)
    emitted = run_stream(rt, s.runs[3])
    # The estimator quantises each voxel's alpha to its ridge level; the reference uses the same levels.
    alpha = rt._group_alpha[rt._group_of_voxel]
    assert np.any(alpha > 0)
    for e in emitted[3:6]:
        frames = np.arange(e.last_volume + 1)
        degree = min(1, int(round((e.last_volume + 1) * s.tr / 120.0)))
        ref = _local_ridge_reference(cal, s.runs[3][frames], frames, s.events[3], s.tr, e.trial, rt._time_scale,
                                     degree, 2, alpha)
        # Unpenalised (alpha 0) voxels with a just-started neighbour are ill-conditioned: the estimator's 1e-9
        # relative stabiliser moves those by up to ~1%; everything else agrees to float32 precision.
        close = np.abs(e.betas - ref) <= 1e-3 * max(1.0, np.abs(ref).max())
        assert close.mean() > 0.98 and np.all(close | (alpha == 0)), e.trial
        assert np.allclose(e.betas, ref, atol=0.05 * max(1.0, np.abs(ref).max()))


def _whitened_ridge_reference(calibration, data_rows, frames, events, tr, trial, time_scale, degree, neighbors, alpha,
                              rho, drift_shrinkage, n_pcs, noise_prior=0.0, motion=None, motion_prior=0.0):
    """Batch fit of the full early-estimate model for one trial, straight from its definition: own columns for the
    trial and its started neighbours (ridge alpha toward the calibration mean beta), one column for every other
    trial, drift (slope ridge = drift_shrinkage x the constant column's weight), motion (ridge toward the
    calibration's motion coefficients = motion_prior / elapsed fraction x the column's own weight) and noise
    components (ridge = drift_shrinkage / (elapsed fraction of the run)^2 x the column's own weight), every row
    AR(1)-prewhitened (a row whose previous volume is missing restarts at scale sqrt(1 - rho^2))."""
    regs, psc, nuis = _reference_design(calibration, data_rows, frames, events, tr, time_scale, degree, n_pcs,
                                        motion)
    n_motion = 0 if motion is None else motion.shape[1]
    whiten = np.zeros((frames.size, frames.size))
    for i, f in enumerate(frames):
        if i and frames[i - 1] == f - 1:
            whiten[i, i], whiten[i, i - 1] = 1.0, -rho
        else:
            whiten[i, i] = np.sqrt(1.0 - rho ** 2)
    t_last = (frames[-1] + calibration.slice_time_ref) * tr
    own = [k for k in range(max(0, trial - neighbors), min(len(events), trial + neighbors + 1))
           if events.onsets[k] <= t_last]
    n_own = len(own)
    betas = np.zeros(psc.shape[1])
    for v in range(psc.shape[1]):
        x = regs[calibration.hrf_index[v]]
        design = whiten @ np.column_stack([x[:, own], x.sum(axis=1) - x[:, own].sum(axis=1), nuis])
        penalty = np.zeros(design.shape[1])
        penalty[:n_own] = alpha[v]
        constant = n_own + 1
        penalty[constant + 1:constant + 1 + degree] = drift_shrinkage * (design[:, constant] ** 2).sum()
        elapsed = frames.size / 200.0  # the run was started without n_volumes: a typical run of 200 volumes
        moved = slice(constant + 1 + degree, constant + 1 + degree + n_motion)
        pcs = slice(constant + 1 + degree + n_motion, design.shape[1])
        prior = np.zeros(design.shape[1])
        prior[:n_own] = calibration.beta_mean[v]
        if n_motion:
            penalty[moved] = motion_prior / elapsed * (design[:, moved] ** 2).sum(axis=0)
            prior[moved] = calibration.motion_coef[v]
        if noise_prior:  # coefficients shrunk toward the calibration's, weight noise_prior runs of data
            penalty[pcs] = noise_prior / elapsed * (design[:, pcs] ** 2).sum(axis=0)
            prior[pcs] = calibration.noise_coef[v, :n_pcs]
        else:
            penalty[pcs] = drift_shrinkage / elapsed ** 2 * (design[:, pcs] ** 2).sum(axis=0)
        coef = np.linalg.solve(design.T @ design + np.diag(penalty) + 1e-12 * np.eye(design.shape[1]),
                               design.T @ (whiten @ psc[:, v]) + penalty * prior)
        betas[v] = coef[own.index(trial)]
    return betas


def test_prewhitened_drift_shrunk_estimate_with_prior_mean_equals_batch_fit_across_a_gap(calibrated,
                                                                                        session_factory):
    s = session_factory(seed=7, n_runs=2, n_frames=160)  # long enough for the linear drift term
    cal = calibrated.calibration_
    gap = 65
    cfg = RealtimeConfig(early_volumes=5, refine_every=0, zscore=False, neighbors=2, ar_rho=0.3, drift_shrinkage=0.05,
                         drift_walk=0.0)
    assert cfg.ridge_prior_mean and cfg.max_drift_degree == 1 and cfg.noise_prior > 0
    rt = RealtimeGLM(cal, cfg).start_run(s.events[0], s.tr)
    assert rt._n_pcs == cal.noise_loadings.shape[1] > cal.n_pcs  # every frozen component, with the prior
    emitted = run_stream(rt, s.runs[0], gap=gap)
    alpha = rt._group_alpha[rt._group_of_voxel]
    # Estimates fitted across the gap, late enough for the linear drift term (round(minutes / 2) >= 1).
    across = [e for e in emitted if gap < e.last_volume < gap + 10]
    assert across and all((e.last_volume + 1) * s.tr >= 90.0 for e in across)
    for e in across[:2]:
        frames = np.array([f for f in range(e.last_volume + 1) if f != gap])
        ref = _whitened_ridge_reference(cal, s.runs[0][frames], frames, s.events[0], s.tr, e.trial, rt._time_scale,
                                        1, 2, alpha, 0.3, 0.05, rt._n_pcs, cfg.noise_prior)
        close = np.abs(e.betas - ref) <= 1e-3 * max(1.0, np.abs(ref).max())
        assert close.mean() > 0.98 and np.all(close | (alpha == 0)), e.trial
    # Each of the four changes the estimate (so the reference above checks all four).
    base = dict(early_volumes=5, refine_every=0, zscore=False, neighbors=2)
    full = {e.trial: e.betas for e in emitted}
    for off in ({"ar_rho": 0.0, "drift_shrinkage": 0.05}, {"ar_rho": 0.3, "drift_shrinkage": 0.0},
                {"ar_rho": 0.3, "drift_shrinkage": 0.05, "ridge_prior_mean": False},
                {"ar_rho": 0.3, "drift_shrinkage": 0.05, "noise_prior": 0.0}):
        other = RealtimeGLM(cal, RealtimeConfig(**base, **off)).start_run(s.events[0], s.tr)
        changed = {e.trial: e.betas for e in run_stream(other, s.runs[0], gap=gap)}
        assert not np.allclose(changed[across[0].trial], full[across[0].trial], atol=1e-3), off


def test_motion_prior_estimate_equals_batch_fit_across_a_gap(synthetic_session, session_factory):
    """Motion coefficients shrunk toward the calibration's (weight motion_prior runs of data), the noise prior and
    AR(1) prewhitening together, against the batch fit written from the definition."""
    s = synthetic_session
    cal = GLMSingle(model="d").fit(s.runs[:3], s.events[:3], s.tr, motion=s.motion[:3]).calibration_
    assert cal.motion_coef is not None and cal.motion_coef.shape == (cal.n_voxels, 6)
    live = session_factory(seed=7, n_runs=2, n_frames=160)
    gap = 65
    cfg = RealtimeConfig(early_volumes=5, refine_every=0, zscore=False, neighbors=2, ar_rho=0.3,
                         drift_shrinkage=0.05, drift_walk=0.0, motion_prior=2.0)
    rt = RealtimeGLM(cal, cfg).start_run(live.events[0], live.tr)
    emitted = []
    for i, row in enumerate(live.runs[0]):
        emitted += rt.add_gap(i) if i == gap else rt.add_volume(i, row, motion_params=live.motion[0][i])
    alpha = rt._group_alpha[rt._group_of_voxel]
    across = [e for e in emitted if gap < e.last_volume < gap + 10]
    assert across
    for e in across[:2]:
        frames = np.array([f for f in range(e.last_volume + 1) if f != gap])
        ref = _whitened_ridge_reference(cal, live.runs[0][frames], frames, live.events[0], live.tr, e.trial,
                                        rt._time_scale, 1, 2, alpha, 0.3, 0.05, rt._n_pcs, cfg.noise_prior,
                                        motion=live.motion[0][frames], motion_prior=2.0)
        close = np.abs(e.betas - ref) <= 1e-3 * max(1.0, np.abs(ref).max())
        assert close.mean() > 0.98 and np.all(close | (alpha == 0)), e.trial
    # Without stored coefficients (a calibration from before the prior) the motion columns are shrunk toward zero
    # as before, which is a different estimate.
    old = dataclasses.replace(cal, motion_coef=None)
    rt_old = RealtimeGLM(old, cfg).start_run(live.events[0], live.tr)
    before = {}
    with pytest.warns(GLMWarning, match="no motion coefficients"):
        rt_old.add_volume(0, live.runs[0][0], motion_params=live.motion[0][0])
    for i, row in enumerate(live.runs[0][:across[0].last_volume + 1]):
        if 0 < i != gap:
            before.update({e.trial: e.betas for e in rt_old.add_volume(i, row, motion_params=live.motion[0][i])})
    assert not np.allclose(before[across[0].trial], across[0].betas, atol=1e-3)


def test_early_model_choices_raise_accuracy_at_the_default_delay(calibrated, synthetic_session, correlation):
    """At 5 post-onset volumes, prewhitening + drift shrinkage + prior-mean ridge + the noise-coefficient prior and
    the signal-to-noise ridge beat the plain local ridge fit."""
    sess, cal = synthetic_session, calibrated
    k0 = sum(len(e) for e in sess.events[:3])
    plain = dict(ar_rho=0.0, drift_shrinkage=0.0, ridge_prior_mean=False, noise_prior=0.0, snr_ridge=False)
    score = {}
    for name, options in (("plain", plain), ("default", {})):
        cfg = RealtimeConfig(early_volumes=5, refine_every=0, zscore=False, **options)
        got, rows = [], []
        start = k0
        for r in (3, 4):
            rt = RealtimeGLM(cal, cfg).start_run(sess.events[r], sess.tr)
            for e in run_stream(rt, sess.runs[r]):
                got.append(e.betas)
                rows.append(start + e.trial)
            start += len(sess.events[r])
        score[name] = correlation(np.stack(got), sess.true_betas[rows], sess.responsive)
    assert score["default"] > score["plain"] + 0.02, score


def test_noise_pool_from_noise_runs_is_the_live_pool_when_volumes_bring_their_noise_vector(synthetic_session):
    s = synthetic_session
    roi = np.flatnonzero(s.responsive)[:100]
    fit = GLMSingle(model="d").fit([y[:, roi] for y in s.runs[:3]], s.events[:3], s.tr, noise_runs=s.runs[:3])
    cal = fit.calibration_
    assert cal.n_noise_voxels == s.runs[0].shape[1] and np.array_equal(cal.noise_ext_index, fit.noise_pool_used_)
    assert cal.noise_ext_coef.shape == (roi.size, cal.noise_ext_loadings.shape[1])
    # The end-of-run estimate of a calibration run with the frozen choices is the offline fit of that run: its
    # noise components come from the offline pool (outside the fitted region), as in the offline fit.
    rt = RealtimeGLM(cal, RealtimeConfig(zscore=False, snr_ridge=False, final_denoise=False))
    rt.start_run(s.events[1], s.tr)
    for i, row in enumerate(s.runs[1]):
        rt.add_volume(i, row[roi], noise_vector=row)
    assert rt._pool_external and rt._n_pcs == cal.noise_ext_loadings.shape[1]
    k0, k1 = len(s.events[0]), len(s.events[1])
    assert np.allclose(np.stack([e.betas for e in rt.end_run()]), fit.betas_[k0:k0 + k1], atol=1e-4)
    # Without the noise vector: the fitted voxels in the pool, with a warning; a wrong-sized one is an error.
    rt = RealtimeGLM(cal, RealtimeConfig(zscore=False)).start_run(s.events[3], s.tr)
    with pytest.warns(GLMWarning, match="noise_vector"):
        rt.add_volume(0, s.runs[3][0, roi])
    assert not rt._pool_external
    rt = RealtimeGLM(cal).start_run(s.events[3], s.tr)
    with pytest.raises(GLMInputError, match="noise_vector"):
        rt.add_volume(0, s.runs[3][0, roi], noise_vector=s.runs[3][0, :10])


def test_voxels_a_volume_did_not_acquire_take_their_level_not_zero(calibrated, synthetic_session):
    """NaN marks a voxel the head moved out of the slab. Live, it takes the voxel's mean over the run's volumes so
    far; at the end of the run, its mean over the whole run, so the final estimate equals the frozen per-run fit of
    the offline fill (fill_not_acquired). A 0 in its place (what the reslice wrote before) wrecks those voxels."""
    from rt_mindeye.glm.missing import fill_not_acquired

    s = synthetic_session
    cfg = RealtimeConfig(snr_ridge=False, final_denoise=False)
    data = s.runs[3].astype(np.float32).copy()
    lost = np.arange(0, data.shape[1], 7)  # voxels that leave the slab early in the run, as edge voxels did
    data[20:, lost] = np.nan
    rt = RealtimeGLM(calibrated, cfg).start_run(s.events[3], s.tr)
    live = run_stream(rt, data)
    final = np.stack([e.betas for e in rt.end_run()])
    assert all(np.all(np.isfinite(e.betas)) for e in live) and np.all(np.isfinite(final))
    cal = calibrated.calibration_
    filled, n_missing = fill_not_acquired(data, cal.mean)
    assert np.array_equal(np.flatnonzero(n_missing), lost) and np.all(n_missing[lost] == data.shape[0] - 20)
    frozen = fit_run_frozen(cal, filled, s.events[3])
    z = (frozen - cal.beta_mean) / cal.beta_std
    assert np.allclose(final, z, atol=1e-3 * max(1.0, np.abs(z).max()))
    # The early estimates of the lost voxels stay on the scale of the others.
    early = np.stack([e.betas for e in live if e.kind == "early"])
    kept = np.setdiff1d(np.arange(data.shape[1]), lost)
    assert np.abs(early[:, lost]).max() < 2 * np.abs(early[:, kept]).max()
    # What zeros did: the end-of-run betas of those voxels far off the scale of the rest.
    zeroed = np.nan_to_num(data, nan=0.0)
    rt.start_run(s.events[3], s.tr)
    run_stream(rt, zeroed)
    wrecked = np.stack([e.betas for e in rt.end_run()])
    assert np.abs(wrecked[:, lost]).max() > 4 * np.abs(final[:, kept]).max()


def test_fill_not_acquired_uses_the_voxels_own_level_and_the_fallback_when_never_acquired():
    from rt_mindeye.glm.missing import RunningLevel, fill_not_acquired

    series = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.nan], [np.nan, np.nan, 7.0]], dtype=np.float32)
    filled, n_missing = fill_not_acquired(series, fallback=np.array([10.0, 20.0, 30.0]))
    assert np.array_equal(filled, [[1, 20, 5], [3, 20, 6], [2, 20, 7]]) and np.array_equal(n_missing, [1, 3, 1])
    level = RunningLevel(np.array([10.0, 20.0, 30.0]))
    got = []
    for row in series:
        got.append(level.fill(row))
        level.add(row)
    assert np.array_equal(np.stack([g[0] for g in got]), [[1, 20, 5], [3, 20, 5], [2, 20, 7]])
    assert [g[1].tolist() for g in got] == [[1], [1, 2], [0, 1]]


def test_not_acquired_counts_per_voxel(calibrated, synthetic_session):
    s = synthetic_session
    rt = RealtimeGLM(calibrated)
    assert rt.not_acquired_counts().size == 0  # no run yet
    rt.start_run(s.events[3], s.tr)
    assert not rt.not_acquired_counts().any()
    data = s.runs[3][:30].astype(np.float32).copy()
    data[10:, 5] = np.nan
    data[29, 6] = np.nan
    run_stream(rt, data)
    counts = rt.not_acquired_counts()
    assert counts[5] == 20 and counts[6] == 1 and counts.sum() == 21
