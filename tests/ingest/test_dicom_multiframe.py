"""Enhanced multi-frame (Siemens XA style) and single-slice series: geometry, slice times, short volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from rt_mindeye.errors import DicomReadError, UnsupportedDicomError
from rt_mindeye.ingest.dicom import ShortVolumeError, read_series, read_volume, read_volumes
from rt_mindeye.ingest.synthetic import FAKE_PATIENT, realistic_affine, write_mosaic, write_multiframe, write_slices


@pytest.fixture()
def volume_data():
    rng = np.random.default_rng(5)
    return rng.integers(-500, 3000, size=(18, 14, 9)).astype(np.int16)


def test_multiframe_round_trip(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape, voxel_mm=2.2, tilt_deg=14.0)
    rng = np.random.default_rng(1)
    times = rng.permutation(9) * 160.0
    path = write_multiframe(
        tmp_path / "xa.dcm", volume_data, affine, slice_times_ms=times, rescale=(2.0, -1.0), series=4, instance=12
    )
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, volume_data * 2.0 - 1.0)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume.slice_times, times / 1000.0, atol=1e-6)
    assert (volume.series, volume.volume, volume.tr) == (4, 12, 1.5)
    assert volume.acquisition_time == pytest.approx(12 * 3600.0)
    assert volume.header["layout"] == "multiframe"
    assert not set(FAKE_PATIENT) & set(volume.header)


def test_multiframe_frames_in_any_order(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    path = write_multiframe(tmp_path / "xa.dcm", volume_data, affine)
    dataset = pydicom.dcmread(path)
    # Reverse the frames and their per-frame groups: the reader must sort by position, not trust frame order.
    frames = dataset.pixel_array[::-1].copy()
    dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(dataset.PerFrameFunctionalGroupsSequence)[::-1])
    dataset.PixelData = frames.tobytes()
    dataset.save_as(tmp_path / "reversed.dcm")
    volume = read_volume(tmp_path / "reversed.dcm")
    np.testing.assert_array_equal(volume.data, volume_data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)


def test_short_multiframe_volume_is_reported(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    path = write_multiframe(tmp_path / "short.dcm", volume_data[:, :, :5], affine, protocol_slices=9)
    with pytest.raises(ShortVolumeError) as info:
        read_volume(path)
    assert (info.value.expected_slices, info.value.got_slices) == (9, 5)
    assert isinstance(info.value, DicomReadError) and str(path) in str(info.value)


def test_short_volume_without_protocol_is_found_against_its_series(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    # No ASCCONV: protocol_slices equal to the frames written hides the count, so only the series can tell.
    paths = [
        write_multiframe(tmp_path / f"v{n}.dcm", volume_data, affine, instance=n, acquisition_time=43200.0 + 1.5 * n)
        for n in (1, 2)
    ]
    paths.append(write_multiframe(tmp_path / "v3.dcm", volume_data[:, :, :4], affine, instance=3))
    with pytest.raises(ShortVolumeError) as info:
        read_series(paths)
    assert info.value.path == paths[2]
    reported = []
    volumes = read_series(paths, on_error=lambda path, error: reported.append((path, type(error).__name__)))
    assert [v.volume for v in volumes] == [1, 2]
    assert reported == [(paths[2], "ShortVolumeError")]


def test_multivolume_enhanced_file(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    path = write_multiframe(tmp_path / "run.dcm", volume_data, affine)
    dataset = pydicom.dcmread(path)
    # Duplicate every frame as a second time point.
    frames = dataset.pixel_array
    second = list(dataset.PerFrameFunctionalGroupsSequence)
    duplicated = []
    for item in second:
        copy = pydicom.Dataset()
        copy.update(item)
        content = pydicom.Dataset()
        content.update(item.FrameContentSequence[0])
        content.TemporalPositionIndex = 2
        copy.FrameContentSequence = pydicom.Sequence([content])
        duplicated.append(copy)
    dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(second + duplicated)
    dataset.NumberOfFrames = 2 * len(second)
    dataset.PixelData = np.concatenate([frames, frames + 1]).tobytes()
    dataset.save_as(tmp_path / "two.dcm")
    volumes = read_volumes(tmp_path / "two.dcm")
    assert len(volumes) == 2
    np.testing.assert_array_equal(volumes[1].data - volumes[0].data, 1.0)
    with pytest.raises(UnsupportedDicomError, match="2 volumes"):
        read_volume(tmp_path / "two.dcm")


def test_single_slice_files_stack_into_volumes(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape, voxel_mm=1.5, tilt_deg=-30.0)
    paths = []
    for number in (1, 2, 3):
        paths += write_slices(
            tmp_path, volume_data + number, affine, volume=number, acquisition_time=43200.0 + 2.0 * number,
            first_instance=100 * number,
        )
    rng = np.random.default_rng(0)
    volumes = read_series([paths[i] for i in rng.permutation(len(paths))])
    assert [v.volume for v in volumes] == [1, 2, 3]
    for number, volume in zip((1, 2, 3), volumes):
        np.testing.assert_array_equal(volume.data, (volume_data + number).astype(np.float32))
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
        assert volume.slice_times is not None and volume.slice_times[0] == 0.0
        assert volume.acquisition_time == pytest.approx(43200.0 + 2.0 * number)


def test_single_slice_file_alone_is_a_one_slice_volume(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    paths = write_slices(tmp_path, volume_data, affine)
    volume = read_volume(paths[3])
    assert volume.shape == (18, 14, 1)
    np.testing.assert_array_equal(volume.data[:, :, 0], volume_data[:, :, 3])
    np.testing.assert_allclose(volume.affine[:3, 3], (affine @ [0, 0, 3, 1])[:3], atol=1e-5)


def test_missing_slice_is_named(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    paths = write_slices(tmp_path / "a", volume_data, affine, volume=1)
    paths += write_slices(tmp_path / "b", volume_data, affine, volume=2)
    del paths[4]
    with pytest.raises(DicomReadError, match="unequally often"):
        read_series(paths)


def test_mixed_series_stay_apart(tmp_path, volume_data):
    affine = realistic_affine(volume_data.shape)
    mosaic = write_mosaic(tmp_path / "m.dcm", volume_data, affine, series=9)
    slices = write_slices(tmp_path / "s", volume_data, affine, series=3)
    volumes = read_series([mosaic, *slices])
    assert [(v.series, v.shape) for v in volumes] == [(3, (18, 14, 9)), (9, (18, 14, 9))]
    np.testing.assert_allclose(volumes[0].affine, volumes[1].affine, atol=1e-5)
    np.testing.assert_array_equal(volumes[0].data, volumes[1].data)


def test_protocol_slice_count_is_found_where_siemens_xa_puts_it(tmp_path, volume_data):
    from rt_mindeye.ingest.dicomfile import open_dicom
    from rt_mindeye.ingest.multiframe import expected_slices

    path = write_multiframe(tmp_path / "xa.dcm", volume_data, realistic_affine(volume_data.shape), protocol_slices=33)
    assert expected_slices(open_dicom(path)) == 33
    # The real XA30 file from heudiconv: protocol nested in the shared group's private sequence (a 3-D MPR: lSize 1).
    real = Path(__file__).resolve().parents[1] / "data" / "dicom" / "heudiconv"
    xa30 = next(real.glob("MRI_102TD_*.dcm"))
    assert expected_slices(open_dicom(xa30)) == 1


def test_derived_or_3d_volumes_are_not_called_short(tmp_path, volume_data):
    path = write_multiframe(tmp_path / "mpr.dcm", volume_data[:, :, :3], realistic_affine(volume_data.shape), protocol_slices=9)
    dataset = pydicom.dcmread(path)
    dataset.ImageType = ["DERIVED", "PRIMARY", "MPR"]
    dataset.save_as(path)
    assert read_volume(path).shape == (18, 14, 3)
