"""Volumes -> NIfTI and the `rt-mindeye convert` command."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from rt_mindeye.cli import main
from rt_mindeye.errors import GeometryMismatchError
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.nifti import save_nifti, slice_code, to_nifti
from rt_mindeye.ingest.synthetic import realistic_affine, write_mosaic

EXPORT_VOLUMES = [f"001_000013_{n:06d}.dcm" for n in range(1, 11)]


def test_slice_codes():
    assert slice_code(np.arange(5) * 0.1) == (1, pytest.approx(0.1))
    assert slice_code(np.arange(5)[::-1] * 0.1)[0] == 2
    interleaved = np.empty(5)
    interleaved[[0, 2, 4, 1, 3]] = np.arange(5) * 0.1
    assert slice_code(interleaved)[0] == 3
    interleaved_even = np.empty(6)
    interleaved_even[[1, 3, 5, 0, 2, 4]] = np.arange(6) * 0.1
    assert slice_code(interleaved_even)[0] == 5
    assert slice_code(np.array([0.0, 0.0, 0.5, 0.5])) == (0, 0.0)  # multiband: not expressible


def test_4d_nifti_of_the_real_run(siemens_export_dir):
    volumes = [read_volume(siemens_export_dir / name) for name in EXPORT_VOLUMES]
    image = to_nifti(volumes)
    assert image.shape == (64, 64, 27, 10)
    assert image.header.get_zooms()[3] == pytest.approx(1.5)
    assert image.header["slice_code"] == 3  # Siemens interleaved, odd slice count, as dcm2niix writes it
    np.testing.assert_allclose(image.affine, volumes[0].affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 6], volumes[6].data)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_geometry_mismatch_is_refused(tmp_path):
    data = np.ones((6, 6, 4), dtype=np.int16)
    first = read_volume(write_mosaic(tmp_path / "a.dcm", data, realistic_affine(data.shape)))
    moved = read_volume(write_mosaic(tmp_path / "b.dcm", data, realistic_affine(data.shape, tilt_deg=3.0)))
    with pytest.raises(GeometryMismatchError, match="affine"):
        to_nifti([first, moved])


def test_save_round_trip_with_sidecar(tmp_path, siemens_export_dir):
    volume = read_volume(siemens_export_dir / "001_000013_000003.dcm")
    path = save_nifti(volume, tmp_path / "one.nii.gz", json_sidecar=True)
    loaded = nib.load(path)
    assert loaded.shape == (64, 64, 27)
    np.testing.assert_array_equal(loaded.get_fdata(dtype=np.float32), volume.data)
    sidecar = json.loads((tmp_path / "one.json").read_text())
    assert sidecar["RepetitionTime"] == 1.5 and len(sidecar["SliceTiming"]) == 27
    assert sidecar["EchoTime"] == pytest.approx(0.028)


def test_convert_folder_needs_skip_bad_for_the_truncated_file(siemens_export_dir, tmp_path, capsys):
    out = tmp_path / "run.nii.gz"
    assert main(["convert", str(siemens_export_dir), "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert "trunc_001_000013_000005.dcm" in error and "incomplete" in error and error.count("\n") == 1
    assert main(["convert", str(siemens_export_dir), "-o", str(out), "--skip-bad"]) == 0
    image = nib.load(out)
    assert image.shape == (64, 64, 27, 10)  # 11 files, one duplicate, one truncated copy skipped
    volumes = [read_volume(siemens_export_dir / name) for name in EXPORT_VOLUMES]
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32)[..., 0], volumes[0].data)


def test_convert_several_series(tmp_path, capsys):
    data = np.arange(6 * 6 * 4, dtype=np.int16).reshape(6, 6, 4)
    source = tmp_path / "in"
    source.mkdir()
    for series in (3, 5):
        for number in (1, 2):
            write_mosaic(source / f"{series}_{number}.dcm", data + number, realistic_affine(data.shape),
                         series=series, instance=number)
    (source / "README.txt").write_text("not dicom, skipped silently inside a folder")
    assert main(["convert", str(source), "-o", str(tmp_path / "x.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert "2 series" in error and "3 (2 volumes" in error and "--series" in error
    assert main(["convert", str(source), "-o", str(tmp_path / "x.nii.gz"), "--series", "5"]) == 0
    assert nib.load(tmp_path / "x.nii.gz").shape == (6, 6, 4, 2)
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["convert", str(source), "-o", str(folder)]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["series-003_synthetic_bold.nii.gz", "series-005_synthetic_bold.nii.gz"]


def test_convert_explicit_non_dicom_file_is_an_error(tmp_path, capsys):
    bad = tmp_path / "notes.dcm"
    bad.write_text("x" * 500)
    assert main(["convert", str(bad), "-o", str(tmp_path / "o.nii.gz")]) == 2
    assert "notes.dcm" in capsys.readouterr().err


def test_convert_single_file(siemens_export_dir, tmp_path):
    shutil.copy(siemens_export_dir / "001_000013_000002.dcm", tmp_path / "v.dcm")
    assert main(["convert", str(tmp_path / "v.dcm"), "-o", str(tmp_path / "v.nii")]) == 0
    assert nib.load(tmp_path / "v.nii").shape == (64, 64, 27)
