"""Siemens mosaic reading on the real real-time export and on synthetic mosaics; nibabel.nicom as the oracle."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.synthetic import FAKE_PATIENT, realistic_affine, write_mosaic
from rt_mindeye.timing import dicom_time_to_seconds

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nibabel.nicom import dicomwrappers

import pydicom

EXPORT_FILES = [f"001_000013_{n:06d}.dcm" for n in range(11)]
# nibabel indexes [row, column, slice] in LPS; ours is [column, row, slice] in RAS.
SWAP_IJ = np.eye(4)[[1, 0, 2, 3]]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nibabel_volume(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = dicomwrappers.wrapper_from_file(str(path))
        return wrapper.get_data(), wrapper.affine


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_real_export_matches_nibabel_mosaic_reader(siemens_export_dir, name):
    path = siemens_export_dir / name
    volume = read_volume(path)
    reference_data, reference_affine = nibabel_volume(path)
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data.transpose(1, 0, 2), reference_data)
    np.testing.assert_allclose(volume.affine @ SWAP_IJ, LPS_TO_RAS @ reference_affine, atol=1e-4)


def test_real_export_volume_fields(siemens_export_dir):
    path = siemens_export_dir / "001_000013_000004.dcm"
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    volume = read_volume(path)
    assert volume.shape == (64, 64, 27)
    assert volume.series == 13 and volume.volume == 4
    assert volume.tr == pytest.approx(1.5)
    assert volume.acquisition_time == pytest.approx(dicom_time_to_seconds(dataset.AcquisitionTime))
    assert volume.sop_instance_uid == dataset.SOPInstanceUID
    assert volume.source == path
    np.testing.assert_allclose(volume.voxel_sizes, [3.0, 3.0, 4.0], atol=1e-5)
    # slice times: ms -> s, relative to the earliest slice, inside one TR, all distinct (interleaved acquisition)
    assert volume.slice_times.shape == (27,)
    assert volume.slice_times.min() == 0.0 and volume.slice_times.max() < volume.tr
    assert len(set(np.round(volume.slice_times, 6))) == 27
    assert volume.header["SeriesDescription"] == "func_ses-01_task-faces_run-01"
    assert volume.header["EchoTime"] == pytest.approx(28.0)
    assert volume.header["MagneticFieldStrength"] == pytest.approx(3.0)
    assert "MOSAIC" in volume.header["ImageType"]


def test_header_never_carries_participant_fields(siemens_export_dir):
    volume = read_volume(siemens_export_dir / "001_000013_000001.dcm")
    dataset = pydicom.dcmread(siemens_export_dir / "001_000013_000001.dcm", stop_before_pixels=True)
    text = repr(dict(volume.header))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        assert keyword not in volume.header
        assert str(dataset.get(keyword)) not in text


def test_duplicate_export_file_has_same_uid_and_data(siemens_export_dir):
    # The export folder holds volume 10 twice (000000 and 000010): identical SOPInstanceUID and pixels.
    first = read_volume(siemens_export_dir / "001_000013_000000.dcm")
    second = read_volume(siemens_export_dir / "001_000013_000010.dcm")
    assert first.sop_instance_uid == second.sop_instance_uid
    np.testing.assert_array_equal(first.data, second.data)


@pytest.mark.parametrize("layout", [1, 2])
def test_synthetic_mosaic_round_trip(tmp_path, layout):
    rng = np.random.default_rng(layout)
    data = rng.integers(-2000, 3000, size=(20, 16, 11)).astype(np.int16)
    affine = realistic_affine(data.shape, voxel_mm=2.5, tilt_deg=-17.0)
    times = rng.permutation(11) * 100.0 + 40.0
    path = write_mosaic(
        tmp_path / "m.dcm", data, affine, csa_layout=layout, slice_times_ms=times, rescale=(0.5, 10.0), series=7
    )
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data.astype(np.float32) * 0.5 + 10.0)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume.slice_times, (times - times.min()) / 1000.0, atol=1e-9)
    assert volume.series == 7
    assert not set(FAKE_PATIENT) & set(volume.header)


def test_synthetic_mosaic_matches_nibabel(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, size=(24, 24, 14)).astype(np.uint16)
    affine = realistic_affine(data.shape, voxel_mm=2.0, tilt_deg=25.0)
    path = write_mosaic(tmp_path / "m.dcm", data, affine)
    volume = read_volume(path)
    reference_data, reference_affine = nibabel_volume(path)
    np.testing.assert_array_equal(volume.data.transpose(1, 0, 2), reference_data)
    np.testing.assert_allclose(volume.affine @ SWAP_IJ, LPS_TO_RAS @ reference_affine, atol=1e-5)


def test_mosaic_without_csa_header_needs_slice_count(tmp_path):
    from rt_mindeye.errors import DicomReadError

    data = np.ones((8, 8, 4), dtype=np.int16)
    path = write_mosaic(tmp_path / "m.dcm", data, realistic_affine(data.shape), with_csa=False)
    with pytest.raises(DicomReadError, match="NumberOfImagesInMosaic"):
        read_volume(path)


def test_data_layout_is_fortran_so_transpose_is_free(siemens_export_dir):
    volume = read_volume(siemens_export_dir / "001_000013_000002.dcm")
    assert volume.data.flags.f_contiguous
    assert volume.data.T.flags.c_contiguous


def test_reversed_slice_order_mosaic_is_refused(tmp_path):
    from rt_mindeye.errors import UnsupportedDicomError

    data = np.ones((8, 8, 4), dtype=np.int16)
    path = write_mosaic(
        tmp_path / "m.dcm", data, realistic_affine(data.shape), extra_csa={"ProtocolSliceNumber": [3]}
    )
    with pytest.raises(UnsupportedDicomError, match="ProtocolSliceNumber"):
        read_volume(path)
    ordinary = write_mosaic(tmp_path / "o.dcm", data, realistic_affine(data.shape), extra_csa={"ProtocolSliceNumber": [0]})
    assert read_volume(ordinary).shape == (8, 8, 4)
