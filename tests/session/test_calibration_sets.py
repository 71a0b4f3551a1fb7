"""The calibration workflow's decoding sets: the calibration runs replayed through the real-time estimator (what the
model is fine-tuned on by default), the held-out split by image, and the offline reference betas of later runs."""

from __future__ import annotations

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.calibration.config import CalibrationConfig
from rt_mindeye.calibration.workflow import finetune_set, list_stimuli, offline_betas, realtime_replay
from rt_mindeye.glm.config import GLMConfig
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle
from rt_mindeye.glm.realtime import RealtimeGLM


def test_realtime_replay_gives_each_trial_its_first_last_refined_and_final_estimate(calibrated_phantom):
    session = calibrated_phantom.session
    runs = [session.visual_timeseries(r) for r in (0, 1)]
    events = [RunEvents.from_records(session.events(r), condition_column="stim_file") for r in (0, 1)]
    fit = GLMSingle(model="b").fit(runs, events, session.tr)
    rows, trial = realtime_replay(fit.calibration_, GLMConfig(), runs, events, None, session.tr)
    n = sum(len(e) for e in events)
    assert rows.shape == (3 * n, runs[0].shape[1]) and np.isfinite(rows).all()
    np.testing.assert_array_equal(np.bincount(trial, minlength=n), np.full(n, 3))
    # The first row of each trial is exactly what the live estimator emits first for it.
    live = RealtimeGLM(fit.calibration_, GLMConfig()).start_run(events[1], session.tr, run=1,
                                                                n_volumes=runs[1].shape[0])
    first = {}
    for i, volume in enumerate(runs[1]):
        for estimate in live.add_volume(i, volume):
            first.setdefault(estimate.trial, estimate.betas)
    offset = len(events[0])
    np.testing.assert_array_equal(rows[n + offset + 0], first[0])  # kinds are stacked: early rows come first

    image_ids = np.array([t.image_index for r in (0, 1) for t in session.trials(r)])
    offline_z = fit.zscored_betas()
    for choice, factor in (("offline", 1), ("realtime", 3), ("both", 4)):
        betas, ids, trials = finetune_set(CalibrationConfig(finetune_betas=choice), fit, offline_z, runs, events, None,
                                  session.tr, image_ids)
        assert betas.shape[0] == ids.size == trials.size == factor * n
        np.testing.assert_array_equal(ids, image_ids[trials])
        assert sorted(np.unique(ids)) == sorted(np.unique(image_ids))


def test_offline_reference_betas_of_a_live_run_are_z_scored_on_the_decoder_voxels(calibrated_phantom):
    phantom_dir = calibrated_phantom.phantom_dir
    bundle = CalibrationBundle.open(calibrated_phantom.bundle_dir)
    stimuli = list_stimuli(phantom_dir / "stimuli")
    betas, ids = offline_betas(bundle, phantom_dir / "dicom", phantom_dir / "events", [3], stimuli,
                               CalibrationConfig(condition_column="stim_file"))
    assert betas.shape == (calibrated_phantom.live_trials, bundle.decoder_index().size)
    assert np.isfinite(betas).all() and 0.3 < float(np.median(betas.std(axis=0))) < 3.0
    trials = calibrated_phantom.session.trials(2)
    expected = [next(k for k, p in enumerate(stimuli) if p.name == t.stim_file.split("/")[-1]) for t in trials]
    np.testing.assert_array_equal(ids, expected)
    # Without a config, the bundle's recorded condition column (stim_file here, not the generic trial_type that
    # would make every trial a repeat of one condition) gives the same fit.
    assert bundle.info.extra["condition_column"] == "stim_file"
    default, _ = offline_betas(bundle, phantom_dir / "dicom", phantom_dir / "events", [3], stimuli)
    np.testing.assert_array_equal(default, betas)


def test_motion_regressors_are_off_by_default_recorded_in_the_bundle_and_followed_by_the_offline_reference(
        calibrated_phantom):
    """The calibration's GLM runs without the motion parameters unless asked (GLMsingle's default; docs/glm.md
    has the measurement), says so in the bundle, and the offline reference of later runs follows the bundle."""
    phantom_dir = calibrated_phantom.phantom_dir
    bundle = CalibrationBundle.open(calibrated_phantom.bundle_dir)
    assert CalibrationConfig().motion_regressors is False
    assert bundle.info.extra["motion_regressors"] is False
    assert GLMCalibration.load(bundle.glm_dir).uses_motion is False  # so the live estimator uses none either
    stimuli = list_stimuli(phantom_dir / "stimuli")
    args = (bundle, phantom_dir / "dicom", phantom_dir / "events", [3], stimuli)
    default, _ = offline_betas(*args)
    without, _ = offline_betas(*args, CalibrationConfig(condition_column="stim_file", motion_regressors=False))
    with_motion, _ = offline_betas(*args, CalibrationConfig(condition_column="stim_file", motion_regressors=True))
    np.testing.assert_array_equal(default, without)
    assert not np.allclose(with_motion, without)  # the phantom's head moves: the regressors change the fit
