"""Every real DICOM we can find, file by file: our reader against dcm2niix (and nibabel.nicom for mosaics).

Sources: the test data nibabel and pydicom install with themselves, heudiconv's test DICOMs (copied into
``tests/data/dicom/heudiconv``, Apache-2.0) and the real Siemens real-time export in ``tests/data/siemens_rt_export``.

For each file:

* if it is listed in :data:`EXPECTED_ERRORS`, our reader must raise exactly that named error (the reason is
  written next to it) and the error must name the file;
* otherwise our reader must convert it, and if dcm2niix converts it too, the two must agree in world space: same
  voxel values after reorientation of both to the closest canonical (RAS) orientation, affines within 1e-3 mm,
  and, where dcm2niix writes SliceTiming, the same slice times. Files dcm2niix does not convert are skipped with
  dcm2niix's own last message as the reason.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rt_mindeye.errors import DicomReadError, IncompleteVolumeError, RtMindEyeError, UnsupportedDicomError
from rt_mindeye.ingest.dicom import TruncatedFileError, read_volumes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import nibabel.nicom
    from nibabel.nicom import dicomwrappers

TESTS_DIR = Path(__file__).resolve().parents[1]
NIBABEL_DIRS = [Path(nib.__file__).parent / "tests" / "data", Path(nibabel.nicom.__file__).parent / "tests" / "data"]
PYDICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
HEUDICONV_DIR = TESTS_DIR / "data" / "dicom" / "heudiconv"
EXPORT_DIR = TESTS_DIR / "data" / "siemens_rt_export"
NOT_DICOM_SUFFIXES = {".dump", ".icc", ".json", ".txt", ".py", ".pyc", ".md", ".rst"}
AFFINE_TOLERANCE_MM = 1e-3


def _dcm2niix_binary() -> str | None:
    # The PyPI package's console script is a Python wrapper (~0.5 s to start under pyenv); call its binary directly.
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except (ImportError, AttributeError):
        return shutil.which("dcm2niix")


DCM2NIIX = _dcm2niix_binary()

# (glob on "<source>/<relative path>", expected error, why). First match wins.
EXPECTED_ERRORS: list[tuple[str, type, str]] = [
    ("nibabel/0.dcm", DicomReadError, "test fixture with decimated pixels: 256x256 cannot hold 48 tiles of 128x128"),
    ("nibabel/1.dcm", DicomReadError, "same decimated mosaic fixture"),
    ("nibabel/csa_slice_norm.dcm", TruncatedFileError, "MR image whose pixel data was stripped"),
    ("nibabel/slicethickness_empty_string.dcm", UnsupportedDicomError, "JPEG 2000 compressed"),
    ("pydicom/693_J2KI.dcm", UnsupportedDicomError, "JPEG 2000 compressed"),
    ("pydicom/J2K_pixelrep_mismatch.dcm", UnsupportedDicomError, "JPEG 2000 compressed"),
    ("pydicom/MR_small_RLE.dcm", UnsupportedDicomError, "RLE compressed"),
    ("pydicom/MR_small_jp2klossless.dcm", UnsupportedDicomError, "JPEG 2000 compressed"),
    ("pydicom/MR_small_jpeg_ls_lossless.dcm", UnsupportedDicomError, "JPEG-LS compressed"),
    ("pydicom/rtdose_rle_1frame.dcm", UnsupportedDicomError, "RLE compressed"),
    ("pydicom/rtdose.dcm", UnsupportedDicomError, "multi-frame RT dose (GridFrameOffsetVector geometry)"),
    ("pydicom/rtdose_expb.dcm", UnsupportedDicomError, "multi-frame RT dose"),
    ("pydicom/rtdose_rle.dcm", UnsupportedDicomError, "multi-frame RT dose"),
    ("pydicom/MR_truncated.dcm", IncompleteVolumeError, "pixel data cut short on purpose"),
    ("pydicom/rtplan_truncated.dcm", TruncatedFileError, "header cut on purpose"),
    ("pydicom/ExplVR_BigEndNoMeta.dcm", DicomReadError, "no preamble and a big-endian first tag: not recognised"),
    ("pydicom/no_meta.dcm", DicomReadError, "no preamble, no file meta: not recognised"),
    ("pydicom/SC_ybr_full_422_uncompressed.dcm", UnsupportedDicomError, "colour secondary capture, no geometry"),
    ("pydicom/meta_missing_tsyntax.dcm", DicomReadError, "pixel data without Rows/Columns"),
    ("pydicom/nested_priv_SQ.dcm", DicomReadError, "pixel data without Rows/Columns"),
    ("pydicom/UN_sequence.dcm", TruncatedFileError, "no pixel data and no SOP class: looks cut"),
    ("pydicom/empty_charset_LEI.dcm", TruncatedFileError, "no pixel data and no SOP class: looks cut"),
    ("pydicom/no_meta_group_length.dcm", TruncatedFileError, "no pixel data and no SOP class: looks cut"),
    ("pydicom/priv_SQ.dcm", TruncatedFileError, "no pixel data and no SOP class: looks cut"),
    ("pydicom/ExplVR_LitEndNoMeta.dcm", UnsupportedDicomError, "RT Ion Plan: no pixel data"),
    ("pydicom/reportsi*.dcm", UnsupportedDicomError, "structured report: no pixel data"),
    ("pydicom/test-SR.dcm", UnsupportedDicomError, "structured report: no pixel data"),
    ("pydicom/rtplan.dcm", UnsupportedDicomError, "RT plan: no pixel data"),
    ("pydicom/rtstruct.dcm", UnsupportedDicomError, "RT structure set: no pixel data"),
    ("pydicom/waveform_ecg.dcm", UnsupportedDicomError, "ECG waveform: no pixel data"),
    ("pydicom/dicomdirtests/*DICOMDIR*", UnsupportedDicomError, "DICOMDIR: no pixel data"),
    ("pydicom/dicomdirtests/TINY_ALPHA/*/IM*", TruncatedFileError, "CT headers stripped of Rows and pixels"),
    ("pydicom/dicomdirtests/77654033/CR*", UnsupportedDicomError, "computed radiograph: no patient geometry"),
    # Secondary captures and other images without ImagePositionPatient/ImageOrientationPatient: no world space.
    ("pydicom/SC_*", UnsupportedDicomError, "secondary capture: no patient geometry"),
    ("pydicom/ExplVR_BigEnd.dcm", UnsupportedDicomError, "no patient geometry"),
    ("pydicom/GDCMJ2K_TextGBR.dcm", UnsupportedDicomError, "no patient geometry (and JPEG 2000)"),
    ("pydicom/JPEG*", UnsupportedDicomError, "no patient geometry (and JPEG compressed)"),
    ("pydicom/JPGExtended.dcm", UnsupportedDicomError, "no patient geometry (and JPEG compressed)"),
    ("pydicom/examples_jpeg2k.dcm", UnsupportedDicomError, "no patient geometry"),
    ("pydicom/examples_palette.dcm", UnsupportedDicomError, "no patient geometry (palette colour)"),
    ("pydicom/examples_rgb_color.dcm", UnsupportedDicomError, "no patient geometry (RGB)"),
    ("pydicom/examples_ybr_color.dcm", UnsupportedDicomError, "no patient geometry (YBR)"),
    ("pydicom/image_dfl.dcm", UnsupportedDicomError, "deflated secondary capture without patient geometry"),
    ("pydicom/liver*_1frame.dcm", UnsupportedDicomError, "no patient geometry"),
    ("heudiconv/MRI_102TD_*", UnsupportedDicomError, "XA30 MPR whose 3 frames have 3 orientations"),
    ("heudiconv/Phoenix_99+PhoenixDocument*", UnsupportedDicomError, "Siemens protocol report: no pixel data"),
    ("export/trunc_001_000013_000005.dcm", IncompleteVolumeError, "truncated copy of volume 5"),
]


def _candidates() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for folder in NIBABEL_DIRS:
        for path in sorted(folder.glob("*")):
            if path.name.endswith((".dcm", ".dcm.gz")):
                found.append((f"nibabel/{path.name}", path))
    if PYDICOM_DIR.is_dir():
        for path in sorted(PYDICOM_DIR.rglob("*")):
            if path.is_file() and path.suffix not in NOT_DICOM_SUFFIXES and path.name != "README":
                if "__pycache__" not in path.parts:
                    found.append((f"pydicom/{path.relative_to(PYDICOM_DIR).as_posix()}", path))
    for path in sorted(HEUDICONV_DIR.glob("*.dcm")):
        found.append((f"heudiconv/{path.name}", path))
    for path in sorted(EXPORT_DIR.glob("*.dcm")):
        found.append((f"export/{path.name}", path))
    return found


CANDIDATES = _candidates()


def expected_error(name: str) -> tuple[type, str] | None:
    for pattern, error, reason in EXPECTED_ERRORS:
        if fnmatch.fnmatchcase(name, pattern):
            return error, reason
    return None


def _plain_copy(path: Path, folder: Path) -> Path:
    """An uncompressed copy (``.dcm.gz`` fixtures are gunzipped) alone in its folder, for dcm2niix -s y."""
    folder.mkdir()
    target = folder / "input.dcm"
    if path.name.endswith(".gz"):
        target.write_bytes(gzip.decompress(path.read_bytes()))
    else:
        shutil.copyfile(path, target)
    return target


def run_dcm2niix(dicom: Path, out: Path) -> tuple[list[Path], str]:
    out.mkdir()
    result = subprocess.run(
        [DCM2NIIX, "-s", "y", "-b", "y", "-z", "n", "-f", "x", "-o", str(out), str(dicom)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    return sorted(out.glob("*.nii")), (lines[-1] if lines else "no output")


def canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine))


def assert_same_values(ours: np.ndarray, reference: np.ndarray) -> None:
    """Equal within 1e-3 + 1e-5 * |reference| (dcm2niix may store rescaled values as scaled integers)."""
    if np.array_equal(ours, reference):
        return
    excess = np.abs(ours - reference) - (1e-3 + 1e-5 * np.abs(reference))
    assert excess.max() <= 0, f"values differ by up to {np.abs(ours - reference).max():.4g}"


@pytest.mark.parametrize("name,path", CANDIDATES, ids=[name for name, _ in CANDIDATES])
def test_reader_against_dcm2niix(name, path, tmp_path):
    local = _plain_copy(path, tmp_path / "in")
    expected = expected_error(name)
    if expected is not None:
        error_type, reason = expected
        with pytest.raises(RtMindEyeError) as info:
            read_volumes(local)
        assert type(info.value) is error_type, f"{name}: expected {error_type.__name__} ({reason}), got {info.value!r}"
        assert str(local) in str(info.value)
        return
    volumes = read_volumes(local)
    assert volumes and all(v.data.dtype == np.float32 for v in volumes)
    if DCM2NIIX is None:
        pytest.skip("dcm2niix is not installed")
    outputs, last_line = run_dcm2niix(local, tmp_path / "out")
    if not outputs:
        pytest.skip(f"dcm2niix does not convert it: {last_line}")
    ours = volumes[0]
    mine = canonical(ours.data, ours.affine)
    candidates = [nib.load(output) for output in outputs]
    matching = [image for image in candidates if image.shape[:3] == ours.shape or sorted(image.shape[:3]) == sorted(ours.shape)]
    assert matching, f"{name}: dcm2niix shapes {[c.shape for c in candidates]} vs ours {ours.shape}"
    reference_image = matching[0]
    reference = nib.as_closest_canonical(reference_image)
    reference_data = reference.get_fdata(dtype=np.float32)
    if reference_data.ndim == 4:
        reference_data = reference_data[..., 0]
    assert reference_data.shape == mine.shape
    np.testing.assert_allclose(mine.affine, reference.affine, atol=AFFINE_TOLERANCE_MM)
    assert_same_values(mine.get_fdata(dtype=np.float32), reference_data)

    sidecar = Path(str(outputs[outputs.index(Path(reference_image.get_filename()))])[: -len(".nii")] + ".json")
    timing = json.loads(sidecar.read_text()).get("SliceTiming") if sidecar.exists() else None
    if timing is not None and ours.slice_times is not None:
        # dcm2niix lists times in its own slice order; it may have flipped the slice axis relative to ours.
        same_direction = float(reference_image.affine[:3, 2] @ ours.affine[:3, 2]) > 0
        ours_in_their_order = ours.slice_times if same_direction else ours.slice_times[::-1]
        np.testing.assert_allclose(ours_in_their_order, np.asarray(timing) - min(timing), atol=1e-4)


MOSAICS = [
    (name, path)
    for name, path in CANDIDATES
    if name.startswith(("export/001", "heudiconv/axasc35", "heudiconv/b0dwi", "nibabel/siemens_dwi"))
]


@pytest.mark.parametrize("name,path", MOSAICS, ids=[name for name, _ in MOSAICS])
def test_mosaics_match_nibabel(name, path, tmp_path):
    local = _plain_copy(path, tmp_path / "in")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = dicomwrappers.wrapper_from_file(str(local))
        reference_data, reference_affine = wrapper.get_data(), wrapper.affine
    ours = read_volumes(local)[0]
    # nibabel: [row, column, slice] in LPS; ours: [column, row, slice] in RAS.
    np.testing.assert_allclose(ours.data.transpose(1, 0, 2), reference_data, rtol=1e-6)
    swap = np.eye(4)[[1, 0, 2, 3]]
    np.testing.assert_allclose(ours.affine @ swap, np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference_affine, atol=1e-4)


def test_the_oracle_covers_enough_files():
    converted = [name for name, _ in CANDIDATES if expected_error(name) is None]
    assert len(CANDIDATES) > 100 and len(converted) > 40
    assert {name.split("/")[0] for name in converted} == {"nibabel", "pydicom", "heudiconv", "export"}


@pytest.mark.parametrize("xa", [False, True], ids=["VE-mosaic", "XA-enhanced"])
def test_phantom_files_against_dcm2niix(tmp_path, xa):
    """The phantom's scanner-style files (rt_mindeye.phantom) read the same here and in dcm2niix."""
    writer_module = pytest.importorskip("rt_mindeye.phantom.dicom_writer")
    from rt_mindeye.ingest.synthetic import realistic_affine

    shape = (20, 18, 9)
    slice_times = np.empty(shape[2])
    slice_times[list(range(0, 9, 2)) + list(range(1, 9, 2))] = np.arange(9) * 1.5 / 9
    geometry = writer_module.SeriesGeometry(
        affine=realistic_affine(shape, voxel_mm=2.5, tilt_deg=-9.0), shape=shape, tr_s=1.5, echo_time_ms=30.0,
        slice_times_s=slice_times, series_number=5, series_description="phantom", study_uid="1.2.826.0.1.3680043.8.498.20",
        series_uid="1.2.826.0.1.3680043.8.498.21", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.22",
        patient_id="PHANTOM", date="20260101", series_time_s=43000.0, study_time_s=42000.0,
    )
    truth = (np.random.default_rng(2).random(shape) * 900.0 + 100.0).astype(np.float32)
    path = writer_module.SeriesWriter(geometry, xa=xa).write(tmp_path / "001_000005_000001.dcm", truth, 1, 43210.0)
    ours = read_volumes(path)[0]
    np.testing.assert_allclose(ours.affine, geometry.affine, atol=1e-4)
    np.testing.assert_allclose(ours.data, truth, atol=geometry.rescale_slope)  # quantised by the writer
    np.testing.assert_allclose(ours.slice_times, slice_times, atol=1e-4)
    if DCM2NIIX is None:
        pytest.skip("dcm2niix is not installed")
    outputs, last_line = run_dcm2niix(path, tmp_path / "out")
    assert outputs, last_line
    reference = nib.as_closest_canonical(nib.load(outputs[0]))
    mine = canonical(ours.data, ours.affine)
    np.testing.assert_allclose(mine.affine, reference.affine, atol=AFFINE_TOLERANCE_MM)
    reference_data = reference.get_fdata(dtype=np.float32)
    assert_same_values(mine.get_fdata(dtype=np.float32), reference_data[..., 0] if reference_data.ndim == 4 else reference_data)
