"""MotionCorrector: recovery of known rigid motions, identity, reslice, FD, and the session-start alignment."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from rt_mindeye.errors import GeometryMismatchError, NotFittedError
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.geometry import RigidTransform, framewise_displacement, volume_center_ras, volume_to_sitk
from rt_mindeye.preprocess.motion import (
    MotionCorrector,
    RegistrationError,
    align_reference,
    head_mask,
    resample_to_target,
)
from rt_mindeye.preprocess.synthetic import SyntheticHead, make_affine, make_volume

TRUE_MOTIONS = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.3, -0.2, 0.1, 0.2, -0.1, 0.3],
    [0.8, -0.5, 0.4, 0.6, -0.4, 0.7],
    [1.2, -0.9, 0.9, 1.0, -0.8, 1.1],
    [1.5, -1.3, 1.2, 1.4, -1.1, 1.5],
])


def _errors(estimated, truth):
    err = np.abs(np.asarray(estimated) - np.asarray(truth))
    return err[..., :3], err[..., 3:]


@pytest.fixture(scope="module")
def moved_series(small_grid, small_head):
    shape, affine = small_grid
    center = volume_center_ras(shape, affine)
    return [make_volume(small_head.sample(shape, affine, RigidTransform.from_params(p, center)), affine, index=i)
            for i, p in enumerate(TRUE_MOTIONS)]


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_recovers_known_motions_within_a_tenth(moved_series, engine):
    corrector = MotionCorrector(MotionConfig(engine=engine)).fit(moved_series[0])
    results = [corrector.update(volume) for volume in moved_series]
    trans_err, rot_err = _errors([r.params for r in results], TRUE_MOTIONS)
    assert trans_err.max() <= 0.1, trans_err
    assert rot_err.max() <= 0.1, rot_err
    assert np.median(trans_err) <= 0.02 and np.median(rot_err) <= 0.03
    assert [r.fd_mm for r in results][0] == 0.0
    for prev, cur, truth_prev, truth in zip(results, results[1:], TRUE_MOTIONS, TRUE_MOTIONS[1:]):
        assert cur.fd_mm == pytest.approx(framewise_displacement(prev.params, cur.params))
        assert cur.fd_mm == pytest.approx(framewise_displacement(truth_prev, truth), abs=0.15)
    assert np.array_equal(np.array(corrector.history_), np.array([r.params for r in results]))


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_identity_gives_zero_motion(moved_series, engine):
    reference = moved_series[0]
    corrector = MotionCorrector(MotionConfig(engine=engine)).fit(reference)
    result = corrector.update(reference)
    assert np.abs(result.params[:3]).max() < 0.01
    assert np.abs(result.params[3:]).max() < 0.01
    assert result.fd_level == 0
    inside = corrector.mask_
    np.testing.assert_allclose(result.volume.data[inside], reference.data[inside], rtol=0, atol=1.0)


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_resliced_volume_is_in_reference_space(moved_series, engine):
    reference, moved = moved_series[0], moved_series[-1]
    corrector = MotionCorrector(MotionConfig(engine=engine)).fit(reference)
    result = corrector.update(moved)
    out = result.volume
    assert out.data.dtype == np.float32 and out.data.shape == reference.data.shape
    np.testing.assert_array_equal(out.affine, reference.affine)
    assert out.volume == moved.volume and out.sop_instance_uid == moved.sop_instance_uid
    inner = corrector.mask_ & (reference.data > 300)
    before = np.abs(moved.data[inner] - reference.data[inner]).mean()
    after = np.abs(out.data[inner] - reference.data[inner]).mean()
    assert after < 0.25 * before
    assert result.elapsed_s >= result.registration_s > 0


def test_fd_levels_follow_thresholds(small_grid, small_head, moved_series):
    shape, affine = small_grid
    center = volume_center_ras(shape, affine)
    corrector = MotionCorrector().fit(moved_series[0])
    corrector.update(moved_series[0])
    jump = make_volume(small_head.sample(shape, affine, RigidTransform.from_params([0.35, 0, 0, 0, 0, 0], center)),
                       affine)
    result = corrector.update(jump)
    assert 0.3 < result.fd_mm < 0.4
    assert result.fd_level == 2


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_real_epi_known_shift_is_recovered(real_epi, engine):
    center = volume_center_ras(real_epi.shape, real_epi.affine)
    truth = np.array([0.8, -0.6, 0.5, 0.7, 0.4, -0.6])
    motion = RigidTransform.from_params(truth, center)
    image = volume_to_sitk(real_epi)
    # Each output voxel y shows the reference head at motion^-1(y): resample through the inverse map.
    moved = sitk.Resample(image, image, motion.inverse().to_sitk(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    moved_volume = make_volume(sitk.GetArrayFromImage(moved).transpose(2, 1, 0), real_epi.affine, index=2)
    corrector = MotionCorrector(MotionConfig(n_iterations=30, engine=engine)).fit(real_epi)
    result = corrector.update(moved_volume)
    trans_err, rot_err = _errors(result.params, truth)
    assert trans_err.max() <= 0.1, result.params
    assert rot_err.max() <= 0.1, result.params


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_same_inputs_give_identical_results(moved_series, engine):
    a = MotionCorrector(MotionConfig(engine=engine)).fit(moved_series[0]).update(moved_series[2])
    b = MotionCorrector(MotionConfig(engine=engine)).fit(moved_series[0]).update(moved_series[2])
    np.testing.assert_array_equal(a.params, b.params)


def test_reset_forgets_history(moved_series):
    corrector = MotionCorrector().fit(moved_series[0])
    corrector.update(moved_series[1])
    corrector.reset()
    assert corrector.history_ == []
    assert corrector.update(moved_series[2]).fd_mm == 0.0


def test_use_before_fit_raises():
    with pytest.raises(NotFittedError):
        MotionCorrector().update(make_volume(np.zeros((4, 4, 4)), np.eye(4)))


def test_empty_reference_is_refused():
    with pytest.raises(RegistrationError, match="head mask"):
        MotionCorrector().fit(make_volume(np.zeros((8, 8, 8)), np.eye(4)))


def test_head_mask_keeps_the_head_and_fills_holes(small_grid, small_head, moved_series):
    mask = head_mask(moved_series[0].data)
    data = moved_series[0].data
    assert mask[tuple(np.array(data.shape) // 2)]  # the dark ventricles at the centre are filled in
    assert not mask[0, 0, 0]
    assert 0.1 < mask.mean() < 0.6


def test_align_reference_recovers_a_between_session_shift(small_grid, small_head):
    shape, affine = small_grid
    center = volume_center_ras(shape, affine)
    calibration = make_volume(small_head.sample(shape, affine), affine)
    truth = np.array([4.0, -3.0, 2.5, 3.0, -2.0, 4.0])
    motion = RigidTransform.from_params(truth, center)
    # Today: another scanner gain, and a slightly different slice prescription (world-space registration copes).
    today_affine = make_affine(shape, 4.0, rotation_deg=(10.0, 1.0, -5.0))
    today = make_volume(0.8 * small_head.sample(shape, today_affine, motion), today_affine)
    found = align_reference(calibration, today)
    trans_err, rot_err = _errors(found.params, truth)
    assert trans_err.max() <= 0.3, found.params
    assert rot_err.max() <= 0.3, found.params

    # A calibration-space mask carried into today's grid lands on today's head.
    carried = resample_to_target(head_mask(calibration.data), affine, shape, today_affine, found, order=0)
    assert carried.dtype == bool
    todays_mask = head_mask(today.data)
    dice = 2 * (carried & todays_mask).sum() / (carried.sum() + todays_mask.sum())
    unaligned = resample_to_target(head_mask(calibration.data), affine, shape, today_affine, None, order=0)
    dice_unaligned = 2 * (unaligned & todays_mask).sum() / (unaligned.sum() + todays_mask.sum())
    assert dice > 0.97 and dice > dice_unaligned + 0.02


def test_numba_engine_recovers_a_large_jump_from_identity(small_grid, small_head):
    """Gauss-Newton converges from identity for a 3 mm / 3 degree jump (the sitk setting needs more steps)."""
    shape, affine = small_grid
    center = volume_center_ras(shape, affine)
    truth = np.array([3.0, -3.0, 3.0, -3.0, 3.0, 3.0])
    reference = make_volume(small_head.sample(shape, affine), affine)
    moved = make_volume(small_head.sample(shape, affine, RigidTransform.from_params(truth, center)), affine)
    result = MotionCorrector(MotionConfig(engine="numba")).fit(reference).update(moved)
    trans_err, rot_err = _errors(result.params, truth)
    assert trans_err.max() <= 0.1 and rot_err.max() <= 0.1, result.params


@pytest.mark.parametrize("interpolation", ["nearest", "bspline"])
def test_other_reslice_interpolators(moved_series, interpolation):
    reference = moved_series[0]
    corrector = MotionCorrector(MotionConfig(reslice_interpolation=interpolation)).fit(reference)
    out = corrector.update(reference).volume.data
    inside = corrector.mask_
    assert np.median(np.abs(out[inside] - reference.data[inside])) < 5.0


def test_voxel_mask_only_reslice_matches_full_reslice(moved_series):
    reference, moved = moved_series[0], moved_series[3]
    voxel_mask = np.zeros(reference.shape, dtype=bool)
    voxel_mask[10:25, 12:20, 8:20] = True
    full = MotionCorrector().fit(reference, voxel_mask=voxel_mask).update(moved)
    fast = MotionCorrector(MotionConfig(full_reslice=False)).fit(reference, voxel_mask=voxel_mask).update(moved)
    assert fast.volume is None and fast.voxels.shape == (int(voxel_mask.sum()),)
    np.testing.assert_allclose(fast.voxels, full.volume.data[voxel_mask], rtol=0, atol=1e-2)
    np.testing.assert_allclose(full.voxels, full.volume.data[voxel_mask])
    with pytest.raises(GeometryMismatchError, match="voxel_mask"):
        MotionCorrector().fit(reference, voxel_mask=voxel_mask[:, :, :5])


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_fortran_and_c_ordered_volumes_give_the_same_result(moved_series, engine):
    """The ingest readers hand over Fortran-ordered arrays; the result must not depend on memory layout."""
    reference, moved = moved_series[0], moved_series[2]
    fortran = make_volume(np.asfortranarray(moved.data), moved.affine)
    corrector = MotionCorrector(MotionConfig(engine=engine)).fit(make_volume(np.asfortranarray(reference.data),
                                                                            reference.affine))
    a = corrector.update(moved)
    corrector.reset()
    b = corrector.update(fortran)
    np.testing.assert_allclose(a.params, b.params, atol=1e-9)
    np.testing.assert_array_equal(a.volume.data, b.volume.data)


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_volumes_on_another_grid_are_resliced_into_the_reference_grid(small_grid, small_head, engine):
    """Today's prescription differs from the calibration reference's: registration works in world space."""
    shape, affine = small_grid
    center = volume_center_ras(shape, affine)
    calibration = make_volume(small_head.sample(shape, affine), affine)
    truth = np.array([2.0, -1.5, 1.0, 1.5, -1.0, 2.0])
    today_affine = make_affine(shape, 4.0, rotation_deg=(4.0, 2.0, -3.0))
    today = make_volume(small_head.sample(shape, today_affine, RigidTransform.from_params(truth, center)),
                        today_affine)
    # Seeded near the answer, as align_reference would leave it.
    seed = RigidTransform.from_params(truth + np.array([0.3, 0.3, -0.3, 0.3, -0.3, 0.3]), center)
    corrector = MotionCorrector(MotionConfig(engine=engine, n_iterations=40)).fit(calibration, initial=seed)
    result = corrector.update(today)
    trans_err, rot_err = _errors(result.params, truth)
    assert trans_err.max() <= 0.1 and rot_err.max() <= 0.1, result.params
    np.testing.assert_array_equal(result.volume.affine, calibration.affine)
    inner = corrector.mask_ & (calibration.data > 300)
    assert np.median(np.abs(result.volume.data[inner] - calibration.data[inner])) < 10.0


@pytest.mark.parametrize("engine", ["numba", "sitk"])
def test_voxels_moved_out_of_the_slab_are_not_acquired(moved_series, engine):
    """A head shift along the slice axis: the edge slice still lies inside the slab (its slices are as thick as
    their spacing) until it moves half a slice, and beyond that the mask's voxels say NaN (not acquired) while
    the resliced picture shows 0."""
    reference = moved_series[0]
    n_slices = reference.shape[2]
    mask = np.zeros(reference.shape, dtype=bool)
    mask[8:-8, 8:-8, :] = True  # every slice, the edge ones included
    corrector = MotionCorrector(MotionConfig(engine=engine)).fit(reference, voxel_mask=mask)
    slice_index = np.argwhere(mask)[:, 2]
    for fraction in (0.3, 1.6):
        shift = np.eye(4)
        shift[:3, 3] = fraction * reference.affine[:3, 2]  # reference slice k now images slice k + fraction
        transform = RigidTransform.from_matrix(shift, corrector.center_)
        voxels = corrector.reslice(reference, transform, fill=np.nan)[mask]
        outside = slice_index + fraction > n_slices - 0.5
        assert np.isnan(voxels[outside]).all()
        assert (corrector.reslice(reference, transform)[mask][outside] == 0).all()
        if engine == "numba":  # ITK's own bound is a rounding slack: it drops the edge slice from any shift
            assert not np.isnan(voxels[~outside]).any()
            np.testing.assert_array_equal(voxels, corrector.reslice_voxels(reference, transform, fill=np.nan))
    # update() reports them as NaN in MotionResult.voxels, 0 in the resliced volume.
    moved = corrector.reslice(reference, transform.inverse())
    result = corrector.update(make_volume(moved, reference.affine, index=1))
    assert np.isnan(result.voxels).any() and np.isfinite(result.volume.data).all()
