"""Volume (RAS+) <-> SimpleITK (LPS) conversion, rigid transform parameters and framewise displacement."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from rt_mindeye.preprocess.geometry import (
    RigidTransform,
    UnsupportedGeometryError,
    array_to_sitk,
    framewise_displacement,
    rotation_from_degrees,
    sitk_to_array,
    volume_to_sitk,
)
from rt_mindeye.preprocess.synthetic import make_volume

OBLIQUE_AFFINES = {
    "axial": np.array([[2.0, 0, 0, -99], [0, 2.0, 0, -120], [0, 0, 2.5, -40], [0, 0, 0, 1]]),
    "oblique": None,  # filled below
    "flipped": np.array([[-3.0, 0, 0, 96], [0, 0, 4.0, -50], [0, 3.0, 0, -80], [0, 0, 0, 1]]),
}
_oblique = np.eye(4)
_oblique[:3, :3] = rotation_from_degrees(17.0, -8.0, 31.0) @ np.diag([2.2, 2.2, 3.1])
_oblique[:3, 3] = [-91.5, 12.25, 33.0]
OBLIQUE_AFFINES["oblique"] = _oblique


@pytest.mark.parametrize("name", sorted(OBLIQUE_AFFINES))
def test_sitk_round_trip_keeps_data_and_affine(name):
    affine = OBLIQUE_AFFINES[name]
    data = np.random.default_rng(0).normal(size=(7, 5, 4)).astype(np.float32)
    image = array_to_sitk(data, affine)
    back, back_affine = sitk_to_array(image)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-9)
    # SimpleITK indexes image[i, j, k] like the Volume array.
    assert image[3, 2, 1] == pytest.approx(float(data[3, 2, 1]))


@pytest.mark.parametrize("name", sorted(OBLIQUE_AFFINES))
def test_sitk_physical_points_are_the_lps_image_of_the_ras_affine(name):
    affine = OBLIQUE_AFFINES[name]
    image = array_to_sitk(np.zeros((7, 5, 4), np.float32), affine)
    for index in [(0, 0, 0), (6, 4, 3), (2, 1, 3)]:
        ras = affine @ np.array([*index, 1.0])
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)


def test_volume_to_sitk_uses_the_volume_geometry():
    volume = make_volume(np.ones((4, 4, 3)), OBLIQUE_AFFINES["oblique"])
    image = volume_to_sitk(volume)
    assert image.GetSize() == (4, 4, 3)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetSpacing(), [2.2, 2.2, 3.1])


def test_sheared_affine_is_refused():
    sheared = np.array([[2.0, 0.8, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    with pytest.raises(UnsupportedGeometryError, match="not orthogonal"):
        array_to_sitk(np.zeros((3, 3, 3), np.float32), sheared, "sheared.nii")


def test_params_round_trip_and_convention():
    center = np.array([1.0, -20.0, 15.0])
    params = np.array([0.7, -1.2, 0.4, 1.5, -0.8, 2.2])
    transform = RigidTransform.from_params(params, center)
    np.testing.assert_allclose(transform.params, params, atol=1e-12)
    # The centre moves by exactly the translation; rotation is about the centre.
    np.testing.assert_allclose(transform.apply(center[None])[0], center + params[:3], atol=1e-12)
    # A pure rotation of +90 degrees about z (RAS) turns +x (right) into +y (anterior).
    quarter = RigidTransform.from_params([0, 0, 0, 0, 0, 90.0], [0, 0, 0])
    np.testing.assert_allclose(quarter.apply(np.array([[1.0, 0, 0]]))[0], [0, 1.0, 0], atol=1e-12)


def test_rigid_transform_matches_its_itk_version():
    center = np.array([3.0, -4.0, 10.0])
    transform = RigidTransform.from_params([1.0, 2.0, -0.5, 3.0, -2.0, 4.0], center)
    itk = transform.to_sitk()
    for ras in ([0.0, 0.0, 0.0], [40.0, -30.0, 20.0]):
        moved_lps = itk.TransformPoint((-ras[0], -ras[1], ras[2]))
        moved_ras = transform.apply(np.array([ras]))[0]
        np.testing.assert_allclose(moved_lps, [-moved_ras[0], -moved_ras[1], moved_ras[2]], atol=1e-9)
    back = RigidTransform.from_sitk(itk, center)
    np.testing.assert_allclose(back.params, transform.params, atol=1e-9)
    # Re-expressed about another centre, the map is the same but the translation changes.
    moved = RigidTransform.from_sitk(itk, center + 10.0)
    np.testing.assert_allclose(moved.matrix, transform.matrix, atol=1e-9)


def test_inverse_and_compose():
    center = np.array([0.0, 5.0, -5.0])
    a = RigidTransform.from_params([1, 2, 3, 4, 5, 6], center)
    b = RigidTransform.from_params([-2, 0.5, 1, -3, 1, 2], center)
    np.testing.assert_allclose(a.compose(a.inverse()).matrix, np.eye(4), atol=1e-12)
    points = np.array([[10.0, 20.0, 30.0], [-5.0, 0.0, 2.0]])
    np.testing.assert_allclose(b.compose(a).apply(points), b.apply(a.apply(points)), atol=1e-12)


def test_framewise_displacement_is_power_formula():
    previous = np.array([0.1, 0.2, 0.3, 0.5, 0.0, -0.5])
    current = np.array([0.2, 0.0, 0.3, 1.5, 0.0, -0.5])
    expected = 0.1 + 0.2 + 50.0 * np.deg2rad(1.0)
    assert framewise_displacement(previous, current) == pytest.approx(expected)
    assert framewise_displacement(previous, current, radius_mm=80.0) == pytest.approx(0.3 + 80 * np.deg2rad(1.0))
    assert framewise_displacement(current, current) == 0.0
    with pytest.raises(ValueError):
        framewise_displacement(previous[:5], current)
