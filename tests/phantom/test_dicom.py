"""The written session: DICOM files checked with nibabel, dcm2niix and the product reader; events, truth, manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform

from rt_mindeye.phantom import read_events
from rt_mindeye.phantom.dicom_writer import DEFAULT_SLOPE, SeriesWriter, read_back_mosaic
from rt_mindeye.phantom.export import series_geometry

pytestmark = pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental:UserWarning")

QUANTUM = DEFAULT_SLOPE / 2 + 1e-4  # largest rounding error of the stored 16-bit values


@pytest.fixture(scope="module")
def run0_volumes(tiny_session):
    return np.stack(list(tiny_session.iter_volumes(0)), axis=-1)


def _in_session_orientation(image: nib.Nifti1Image, affine: np.ndarray) -> nib.Nifti1Image:
    return image.as_reoriented(ornt_transform(io_orientation(image.affine), io_orientation(affine)))


def test_files_names_and_headers(written_session, tiny_session):
    run = tiny_session.runs[0]
    files = sorted((written_session / "dicom").glob("*.dcm"))
    assert [f.name for f in files] == [f"001_{run.series_number:06d}_{v:06d}.dcm" for v in range(1, run.n_volumes + 1)]
    uids, times = set(), []
    for v, path in enumerate(files[:6], start=1):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and "MOSAIC" in ds.ImageType
        assert ds.SeriesNumber == run.series_number and ds.InstanceNumber == v
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Rows == ds.Columns == 4 * 32 and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert float(ds.RepetitionTime) == pytest.approx(1500.0) and float(ds.RescaleSlope) == DEFAULT_SLOPE
        assert ds.PatientBirthDate == "" and ds.PatientID.startswith("sub-")
        uids.add(ds.SOPInstanceUID)
        t = ds.AcquisitionTime
        times.append(int(t[:2]) * 3600 + int(t[2:4]) * 60 + float(t[4:]))
    assert len(uids) == 6
    np.testing.assert_allclose(np.diff(times), tiny_session.tr, atol=1e-5)
    np.testing.assert_allclose(times[0], run.start_time_s, atol=1e-5)


def test_csa_header_read_by_nibabel(written_session, tiny_session):
    from nibabel.nicom import csareader

    ds = pydicom.dcmread(next((written_session / "dicom").glob("*.dcm")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        header = csareader.get_csa_header(ds, "image")
    assert csareader.get_n_mosaic(header) == tiny_session.shape[2]
    normal = tiny_session.affine[:3, 2] / np.linalg.norm(tiny_session.affine[:3, 2])
    np.testing.assert_allclose(csareader.get_slice_normal(header), normal * [-1, -1, 1], atol=1e-7)
    times = np.array(header["tags"]["MosaicRefAcqTimes"]["items"], float)
    np.testing.assert_allclose(times / 1000.0, tiny_session.slice_times(), atol=1e-6)


def test_mosaic_read_back_by_nibabel_equals_simulation(written_session, tiny_session, run0_volumes):
    for v in (1, 7, tiny_session.runs[0].n_volumes):
        data, affine = read_back_mosaic(written_session / "dicom" / f"001_000005_{v:06d}.dcm")
        np.testing.assert_allclose(data, run0_volumes[..., v - 1], atol=QUANTUM, rtol=0)
        np.testing.assert_allclose(affine, tiny_session.affine, atol=1e-4)


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
def test_dcm2niix_converts_the_run(written_session, tiny_session, run0_volumes, tmp_path):
    result = subprocess.run(["dcm2niix", "-z", "n", "-b", "y", "-f", "run1", "-o", str(tmp_path),
                             str(written_session / "dicom")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    image = _in_session_orientation(nib.load(tmp_path / "run1.nii"), tiny_session.affine)
    np.testing.assert_allclose(image.affine, tiny_session.affine, atol=1e-3)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), run0_volumes, atol=QUANTUM, rtol=0)
    sidecar = json.loads((tmp_path / "run1.json").read_text())
    assert sidecar["RepetitionTime"] == pytest.approx(tiny_session.tr)
    np.testing.assert_allclose(sidecar["SliceTiming"], tiny_session.slice_times(), atol=1e-3)


def test_product_reader_round_trip(written_session, tiny_session, run0_volumes):
    dicom = pytest.importorskip("rt_mindeye.ingest.dicom")
    path = written_session / "dicom" / "001_000005_000004.dcm"
    volume = dicom.read_volume(path)
    np.testing.assert_allclose(volume.data, run0_volumes[..., 3], atol=QUANTUM, rtol=0)
    np.testing.assert_allclose(volume.affine, tiny_session.affine, atol=1e-4)
    assert volume.series == 5 and volume.volume == 4 and volume.tr == pytest.approx(1.5)
    assert volume.acquisition_time == pytest.approx(tiny_session.acquisition_times(0)[3], abs=1e-5)
    np.testing.assert_allclose(volume.slice_times, tiny_session.slice_times(), atol=1e-6)


def test_xa_enhanced_files(tiny_session, run0_volumes, tmp_path):
    from nibabel.nicom import dicomwrappers

    writer = SeriesWriter(series_geometry(tiny_session, 0), xa=True)
    times = tiny_session.acquisition_times(0)
    paths = [writer.write(tmp_path / f"001_000005_{v + 1:06d}.dcm", run0_volumes[..., v], v + 1, times[v])
             for v in range(3)]
    ds = pydicom.dcmread(paths[1])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and ds.NumberOfFrames == tiny_session.shape[2]
    assert "CSA" not in str(ds.get((0x0029, 0x0010), ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapper = dicomwrappers.wrapper_from_file(str(paths[1]))
        image = nib.Nifti1Image(wrapper.get_data().astype(np.float32), np.diag([-1, -1, 1, 1]) @ wrapper.affine)
    image = _in_session_orientation(image, tiny_session.affine)
    np.testing.assert_allclose(image.affine, tiny_session.affine, atol=1e-4)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), run0_volumes[..., 1], atol=QUANTUM, rtol=0)
    try:
        from rt_mindeye.ingest.dicom import read_volume
    except ImportError:
        return
    volume = read_volume(paths[2])
    image = _in_session_orientation(nib.Nifti1Image(volume.data, volume.affine), tiny_session.affine)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), run0_volumes[..., 2], atol=QUANTUM, rtol=0)


def test_events_truth_and_manifest(written_session, tiny_session):
    events = read_events(written_session / "events" / "run-01_events.tsv")
    expected = tiny_session.events(0)
    assert len(events) == len(expected)
    for got, want in zip(events, expected):
        assert got["onset"] == pytest.approx(want["onset"], abs=5e-4)
        assert got["duration"] == pytest.approx(want["duration"])
        for key in ("trial_type", "stim_file", "image_index", "stimulus_index", "trial", "session_trial", "repeat",
                    "n_presentations"):
            assert got[key] == want[key], key
        assert (written_session / got["stim_file"]).is_file()
    truth = written_session / "truth"
    np.testing.assert_array_equal(np.load(truth / "run-01_betas.npy"), tiny_session.betas[0])
    np.testing.assert_array_equal(np.load(truth / "hrf_index.npy"), tiny_session.hrf_index)
    indices = np.load(truth / "voxel_indices.npy")
    mask = nib.load(truth / "visual_mask.nii.gz")
    np.testing.assert_allclose(mask.affine, tiny_session.affine, atol=1e-5)
    assert np.array_equal(np.argwhere(np.asarray(mask.dataobj) > 0), indices)
    motion = np.loadtxt(truth / "run-01_motion.tsv", skiprows=1)
    np.testing.assert_allclose(motion[:, :6], tiny_session.motion[0], atol=1e-7)
    manifest = json.loads((written_session / "session.json").read_text())
    assert manifest["tr"] == 1.5 and manifest["subject"] == 1 and manifest["seed"] == 0
    assert [r["series_number"] for r in manifest["runs"]] == [r.series_number for r in tiny_session.runs]
    assert manifest["calibration_runs"] == [0, 1]
    assert manifest["runs"][0]["n_volumes"] == len(list((written_session / "dicom").glob("*.dcm")))


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
def test_odd_geometry_round_trips(tmp_path):
    """Non-square matrix, anisotropic voxels, a slice count that leaves empty mosaic tiles, a negative tilt."""
    from rt_mindeye.phantom import phantom_config, simulate_session, write_session

    cfg = phantom_config("small", matrix=(28, 36, 27), voxel_size_mm=(4.0, 3.5, 3.0), slice_tilt_deg=-12.0,
                         n_runs=1, calibration_runs=1, trials_per_run=2, repeated_images=0, rest_end_s=3.0)
    session = simulate_session(cfg, subject=2, seed=5)
    write_session(session, tmp_path / "out")
    volumes = np.stack(list(session.iter_volumes(0)), axis=-1)
    ds = pydicom.dcmread(tmp_path / "out" / "dicom" / "001_000005_000001.dcm")
    assert (ds.Rows, ds.Columns) == (6 * 36, 6 * 28)
    data, affine = read_back_mosaic(tmp_path / "out" / "dicom" / "001_000005_000002.dcm")
    np.testing.assert_allclose(data, volumes[..., 1], atol=QUANTUM, rtol=0)
    np.testing.assert_allclose(affine, session.affine, atol=1e-4)
    result = subprocess.run(["dcm2niix", "-z", "n", "-f", "odd", "-o", str(tmp_path), str(tmp_path / "out" / "dicom")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    image = _in_session_orientation(nib.load(tmp_path / "odd.nii"), session.affine)
    np.testing.assert_allclose(image.affine, session.affine, atol=1e-3)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), volumes, atol=QUANTUM, rtol=0)
