"""Simulated session: determinism, subjects, design, ground truth, motion, decodability."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from rt_mindeye.phantom import make_subject, phantom_config, response_regressors, simulate_session
from rt_mindeye.phantom.brain import LABELS
from rt_mindeye.phantom.session import HRF_LIBRARY_PATH


def test_same_seed_same_session(tiny_config, tiny_session):
    again = simulate_session(tiny_config, subject=1, seed=0)
    for a, b in zip(tiny_session.betas, again.betas):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tiny_session.motion, again.motion):
        np.testing.assert_array_equal(a, b)
    assert [r.trials for r in tiny_session.runs] == [r.trials for r in again.runs]
    np.testing.assert_array_equal(tiny_session.visual_timeseries(1), again.visual_timeseries(1))
    np.testing.assert_array_equal(next(tiny_session.iter_volumes(2)), next(again.iter_volumes(2)))


def test_other_seed_other_design_and_noise(tiny_config, tiny_session):
    other = simulate_session(tiny_config, subject=1, seed=1)
    assert [t.image_index for t in other.trials()] != [t.image_index for t in tiny_session.trials()]
    assert not np.allclose(other.motion[1][:10], tiny_session.motion[1][:10])
    # Same subject: same brain and tuning.
    np.testing.assert_array_equal(other.subject.anatomy, tiny_session.subject.anatomy)
    np.testing.assert_array_equal(other.tuned_responses, tiny_session.tuned_responses)


def test_stimulus_offset_selects_other_images(tiny_config, tiny_session):
    from rt_mindeye.phantom.config import replace

    other = simulate_session(replace(tiny_config, n_runs=1, calibration_runs=1, repeated_images=0,
                                     stimulus_offset=200), subject=1, seed=0)
    assert [s.index for s in other.stimuli] == list(range(200, 200 + len(other.stimuli)))
    assert other.events(0)[0]["stimulus_index"] == 200 + other.events(0)[0]["image_index"]
    assert not set(s.name for s in other.stimuli) & set(s.name for s in tiny_session.stimuli)


def test_subjects_differ_in_anatomy_masks_and_maps(tiny_config, tiny_session):
    s1 = tiny_session.subject
    s2 = make_subject(tiny_config, 2)
    assert not np.allclose(s1.head_to_world, s2.head_to_world)
    assert (s1.visual_mask != s2.visual_mask).sum() > 0.2 * s1.visual_mask.sum()
    assert s1.n_voxels != s2.n_voxels
    assert np.corrcoef(s1.anatomy.ravel(), s2.anatomy.ravel())[0, 1] < 0.99
    # Rebuilding a subject gives exactly the same one.
    again = make_subject(tiny_config, 2)
    np.testing.assert_array_equal(again.anatomy, s2.anatomy)
    np.testing.assert_array_equal(again.prf_centres, s2.prf_centres)


def test_subject_has_plausible_brain(tiny_session):
    subj = tiny_session.subject
    assert subj.visual_mask[subj.visual_mask].size > 200
    assert not (subj.visual_mask & ~subj.brain_mask).any()
    assert 0.3 < subj.responsive.mean() < 0.95
    assert (subj.mean_response[~subj.responsive] == 0).all() and (subj.mean_response[subj.responsive] > 0).all()
    assert len(np.unique(subj.hrf_index)) >= 5
    # Contralateral retinotopy: left-hemisphere (RAS x < 0) voxels see the right visual field.
    world_x = (subj.affine[:3, :3] @ subj.voxel_indices.T + subj.affine[:3, 3:4])[0] - subj.head_centre_world[0]
    assert np.mean(subj.prf_centres[world_x < -5, 0] > 0) > 0.8
    assert np.mean(subj.prf_centres[world_x > 5, 0] < 0) > 0.8
    # T2*-weighted contrast for motion correction to lock onto: ventricles > grey matter > white matter > bone.
    mean = {name: subj.anatomy[subj.labels == code].mean() for name, code in LABELS.items()
            if (subj.labels == code).any()}
    assert mean["ventricle"] > mean["grey"] > mean["white"] > mean["skull"]


def test_design_repeats_timing_and_volumes(tiny_config, tiny_session):
    cfg = tiny_config
    trials = tiny_session.trials()
    assert len(trials) == cfg.n_runs * cfg.trials_per_run
    by_image: dict[int, list] = {}
    for t in trials:
        by_image.setdefault(t.image_index, []).append(t)
    counts = sorted(len(v) for v in by_image.values())
    assert counts.count(cfg.repeats) == cfg.repeated_images and set(counts) <= {1, cfg.repeats}
    for shown in by_image.values():
        assert len({t.run for t in shown}) == len(shown)  # repeats in different runs
        assert sorted(t.repeat for t in shown) == list(range(len(shown)))
    assert tiny_session.calibration_runs == list(range(cfg.calibration_runs))
    for run in tiny_session.runs:
        onsets = run.onsets
        assert len(run.trials) == cfg.trials_per_run
        assert onsets[0] == pytest.approx(cfg.rest_start_s)
        gaps = np.diff(onsets)
        lo = cfg.stim_duration_s + cfg.isi_s - cfg.isi_jitter_s
        hi = cfg.stim_duration_s + cfg.isi_s + cfg.isi_jitter_s
        assert (gaps >= lo - 1e-3).all() and (gaps <= hi + 1e-3).all() and gaps.std() > 0.05
        assert run.n_volumes * cfg.tr_s >= onsets[-1] + cfg.stim_duration_s + cfg.rest_end_s
        assert run.series_number == cfg.first_series + run.index
    starts = [r.start_time_s for r in tiny_session.runs]
    assert all(b - a > r.n_volumes * cfg.tr_s for a, b, r in zip(starts, starts[1:], tiny_session.runs))


def _fine_response(frame_times, onsets, betas, duration, hrf):
    """Independent reference: boxcars on a 0.01 s grid convolved with the library HRF (resampled), peak-scaled."""
    library = np.loadtxt(HRF_LIBRARY_PATH, delimiter="\t")[:, hrf]
    dt = 0.01
    h = np.interp(np.arange(0, 50, dt), np.arange(len(library)) * 0.1, library)
    unit = np.convolve(h, np.ones(int(round(duration / dt))))
    t_end = frame_times[-1] + 1
    drive = np.zeros(int(t_end / dt) + 1)
    for onset, beta in zip(onsets, betas):
        start = int(round(onset / dt))
        drive[start:start + int(round(duration / dt))] += beta
    signal = np.convolve(drive, h)[:len(drive)] / unit.max()
    return np.interp(frame_times, np.arange(len(drive)) * dt, signal)


def test_true_betas_reproduce_the_noiseless_signal(tiny_session):
    session = tiny_session
    run = 1
    response = session.response_psc(run)
    frame = session.frame_times(run)
    onsets = session.runs[run].onsets
    betas = session.betas[run]
    for v in np.flatnonzero(session.subject.responsive)[:15]:
        expected = _fine_response(frame, onsets, betas[:, v], session.config.stim_duration_s,
                                  int(session.hrf_index[v]))
        # 0.1 s (GLMsingle) vs 0.01 s discretisation of the stimulus boxcar: a few % of the peak at steep flanks.
        np.testing.assert_allclose(response[:, v], expected, atol=0.035 * np.abs(expected).max())
    # A GLM with each voxel's true HRF on the noiseless series gives back the true betas exactly.
    clean = session.visual_timeseries(run, noise=False).astype(np.float64)
    for hrf in np.unique(session.hrf_index)[:4]:
        cols = np.flatnonzero(session.hrf_index == hrf)
        design = np.column_stack([response_regressors(frame, onsets, session.config.stim_duration_s, int(hrf)),
                                  np.ones(len(frame))])
        coef = np.linalg.lstsq(design, clean[:, cols], rcond=None)[0]
        recovered = coef[:-1] / coef[-1] * 100.0
        np.testing.assert_allclose(recovered, betas[:, cols], atol=1e-3)


def test_visual_timeseries_matches_the_motionless_volumes(tiny_session):
    run = 2
    volumes = np.stack(list(tiny_session.iter_volumes(run, motion=False)), axis=-1)
    series = volumes[tuple(tiny_session.voxel_indices.T)].T
    np.testing.assert_allclose(series, tiny_session.visual_timeseries(run), rtol=1e-5, atol=1e-2)
    ts = tiny_session.visual_timeseries(run)
    tsnr = ts.mean(axis=0) / ts.std(axis=0)
    assert 15 < np.median(tsnr) < 200 and tsnr.std() > 3  # realistic tSNR that varies across voxels


def test_motion_is_bounded_starts_at_zero_and_really_moves_the_head():
    cfg = phantom_config("small", n_runs=2, calibration_runs=1, trials_per_run=4, repeated_images=0,
                         thermal_noise_psc=0.0, ar_noise_psc=0.0, physio_components=0, drift_psc=0.0,
                         motion_max_mm=3.0, motion_max_deg=3.0, jerk_rate=0.1)
    session = simulate_session(cfg, subject=1, seed=3)
    np.testing.assert_array_equal(session.motion[0][0], np.zeros(6))
    for trace in session.motion:
        assert np.abs(trace[:, :3]).max() <= 3.0 + 1e-9
        assert np.abs(trace[:, 3:]).max() <= np.deg2rad(3.0) + 1e-9
    fd = session.framewise_displacement(1)
    assert fd[0] == 0 and fd.max() > 0.05
    run = 1
    displacement = np.abs(session.motion[run][:, :3]).sum(axis=1) + 50 * np.abs(session.motion[run][:, 3:]).sum(axis=1)
    t = int(np.argmax(displacement))
    assert displacement[t] > 1.0
    moved = list(session.iter_volumes(run))[t] / session.subject.coil  # the coil does not move with the head
    still = session.subject.anatomy
    interior = ndimage.binary_erosion(session.subject.brain_mask, iterations=2)
    motion = session.motion_matrix(run, t)

    def realign(world_transform):
        voxel = np.linalg.inv(session.affine) @ world_transform @ session.affine
        back = ndimage.affine_transform(moved, voxel[:3, :3], offset=voxel[:3, 3], order=1)
        return np.corrcoef(back[interior], still[interior])[0, 1]

    # Undoing the true motion aligns the head again; no correction, or the opposite one, does not.
    undone, untouched, opposite = realign(motion), realign(np.eye(4)), realign(np.linalg.inv(motion))
    assert undone > untouched + 0.02 and undone > opposite + 0.1 and undone > 0.95


def test_true_betas_and_estimates_are_decodable(tiny_session):
    session = tiny_session
    subj = session.subject
    keep = subj.responsive
    images = np.array([t.image_index for t in session.trials()])
    runs = np.array([t.run for t in session.trials()])
    same = (images[:, None] == images[None, :]) & ~np.eye(len(images), dtype=bool)
    different = images[:, None] != images[None, :]
    truth = session.all_betas()[:, keep]
    corr = np.corrcoef(truth - truth.mean(axis=0))
    # Repeats share the image-driven pattern but not the trial-to-trial (neural) variability, calibrated so that the
    # GLM betas' single-trial reliability is 3T-like (docs/phantom.md): clearly related, far from identical.
    assert 0.45 < corr[same].mean() < 0.85 and abs(corr[different].mean()) < 0.1
    # Single-trial least squares with the true HRFs on the noisy data, z-scored within run (as real-time
    # MindEye does): repeats of an image still correlate more than different images.
    estimates = []
    for run in range(session.n_runs):
        y = session.visual_timeseries(run).astype(np.float64)
        frame = session.frame_times(run)
        x = np.linspace(-1, 1, len(frame))
        drift = np.column_stack([np.ones_like(x), x, x * x])
        b = np.zeros((len(session.runs[run].trials), subj.n_voxels))
        for hrf in np.unique(session.hrf_index):
            cols = np.flatnonzero(session.hrf_index == hrf)
            design = np.column_stack([response_regressors(frame, session.runs[run].onsets,
                                                          session.config.stim_duration_s, int(hrf)), drift])
            b[:, cols] = np.linalg.lstsq(design, y[:, cols], rcond=None)[0][:-3]
        estimates.append(b)
    est = np.concatenate(estimates)[:, keep]
    for run in range(session.n_runs):
        rows = runs == run
        est[rows] = (est[rows] - est[rows].mean(axis=0)) / est[rows].std(axis=0)
    corr = np.corrcoef(est)
    assert corr[same].mean() > corr[different].mean() + 0.08


def test_resampling_matches_scipy_with_edge_extension(tiny_session):
    from rt_mindeye.phantom.session import resample_voxels

    volume = tiny_session.subject.anatomy
    np.testing.assert_allclose(resample_voxels(volume, np.eye(4)), volume, atol=1e-4)
    voxel_map = (np.linalg.inv(tiny_session.affine) @ np.linalg.inv(tiny_session.motion_matrix(1, 10))
                 @ tiny_session.affine)
    voxel_map[:3, 3] += [0.7, -1.2, 0.4]
    expected = ndimage.affine_transform(volume, voxel_map[:3, :3], offset=voxel_map[:3, 3], order=1, mode="nearest")
    np.testing.assert_allclose(resample_voxels(volume, voxel_map, 1), expected, atol=1e-2)
