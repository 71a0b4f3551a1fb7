"""Completeness checks: files still being written, cut anywhere, or not DICOM at all."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rt_mindeye.errors import DicomReadError, IncompleteVolumeError, RtMindEyeError
from rt_mindeye.ingest.dicom import TruncatedFileError, UnsupportedDicomError, check_complete, read_volume

REAL = "001_000013_000005.dcm"
MOSAIC_PIXEL_BYTES = 384 * 384 * 2


def test_shipped_truncated_file_is_incomplete(siemens_export_dir):
    path = siemens_export_dir / "trunc_001_000013_000005.dcm"
    for reader in (check_complete, read_volume):
        with pytest.raises(IncompleteVolumeError) as info:
            reader(path)
        error = info.value
        assert error.expected_bytes == MOSAIC_PIXEL_BYTES
        assert 0 < error.got_bytes < MOSAIC_PIXEL_BYTES
        assert error.path == path and str(path) in str(error)


def test_got_bytes_is_what_the_file_holds_after_the_header(siemens_export_dir, tmp_path):
    raw = (siemens_export_dir / REAL).read_bytes()
    header_bytes = len(raw) - MOSAIC_PIXEL_BYTES
    partial = tmp_path / "partial.dcm"
    partial.write_bytes(raw[: header_bytes + 1000])
    with pytest.raises(IncompleteVolumeError) as info:
        check_complete(partial)
    assert info.value.got_bytes == 1000 and info.value.expected_bytes == MOSAIC_PIXEL_BYTES


def test_complete_file_returns_header_without_reading_pixels(siemens_export_dir):
    dataset = check_complete(siemens_export_dir / REAL)
    assert dataset.SeriesNumber == 13 and dataset.Rows == 384
    element = dataset.get_item(0x7FE00010, keep_deferred=True)
    assert element.value is None  # deferred: the pixels were never copied


def test_every_cut_is_incomplete_or_a_read_error(siemens_export_dir, tmp_path):
    raw = (siemens_export_dir / REAL).read_bytes()
    header_end = len(raw) - MOSAIC_PIXEL_BYTES
    cuts = sorted(
        set(
            list(range(0, 400, 3))
            + list(np.linspace(400, header_end + 8, 80).astype(int))
            + list(np.linspace(header_end + 8, len(raw) - 1, 20).astype(int))
        )
    )
    partial = tmp_path / "partial.dcm"
    kinds = set()
    for cut in cuts:
        partial.write_bytes(raw[:cut])
        with pytest.raises((IncompleteVolumeError, DicomReadError)) as info:
            check_complete(partial)
        kinds.add(type(info.value).__name__)
        assert not isinstance(info.value, UnsupportedDicomError), cut  # a cut scanner image is never "unsupported"
    assert "IncompleteVolumeError" in kinds and "TruncatedFileError" in kinds


def test_header_cuts_are_retryable_incomplete(siemens_export_dir, tmp_path):
    raw = (siemens_export_dir / REAL).read_bytes()
    partial = tmp_path / "partial.dcm"
    for cut in (0, 64, 128, 131, 140, 500, 5000, 100_000):
        partial.write_bytes(raw[:cut])
        with pytest.raises(TruncatedFileError) as info:
            check_complete(partial)
        assert info.value.file_bytes == cut and isinstance(info.value, IncompleteVolumeError)


def test_file_growing_to_completion_becomes_readable(siemens_export_dir, tmp_path):
    raw = (siemens_export_dir / REAL).read_bytes()
    growing = tmp_path / "growing.dcm"
    with open(growing, "wb") as out:
        for chunk_end in range(0, len(raw), 65536):
            out.write(raw[chunk_end : chunk_end + 65536])
            out.flush()
            os.fsync(out.fileno())
            if chunk_end + 65536 < len(raw):
                with pytest.raises(IncompleteVolumeError):
                    read_volume(growing)
    assert read_volume(growing).shape == (64, 64, 27)


def test_short_text_file_is_not_dicom_not_incomplete(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello")
    with pytest.raises(DicomReadError, match="not a DICOM") as info:
        check_complete(short)
    assert not isinstance(info.value, IncompleteVolumeError)


def test_not_dicom(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("scanner log\n" * 40)
    with pytest.raises(DicomReadError, match="not a DICOM") as info:
        check_complete(text)
    assert not isinstance(info.value, IncompleteVolumeError)


def test_missing_file_and_folder_are_read_errors(tmp_path):
    with pytest.raises(DicomReadError, match="not found"):
        read_volume(tmp_path / "nope.dcm")
    with pytest.raises(DicomReadError, match="folder"):
        read_volume(tmp_path)


def test_corrupted_header_bytes_raise_only_project_errors(siemens_export_dir, tmp_path):
    raw = bytearray((siemens_export_dir / REAL).read_bytes())
    header_end = len(raw) - MOSAIC_PIXEL_BYTES
    rng = np.random.default_rng(11)
    broken = tmp_path / "broken.dcm"
    for _ in range(40):
        corrupted = bytearray(raw)
        for position in rng.integers(132, header_end, size=3):
            corrupted[position] = int(rng.integers(0, 256))
        broken.write_bytes(bytes(corrupted))
        try:
            read_volume(broken)
        except RtMindEyeError:
            pass


@pytest.mark.parametrize(
    "source",
    [
        "siemens_rt_export/001_000013_000001.dcm",  # VE mosaic: Referenced/Source Image Sequences near the start
        "dicom/heudiconv/MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm",  # XA30
    ],
)
def test_cuts_through_sequences_and_values_are_always_named(data_dir, tmp_path, source):
    # Densely through the region with nested sequences and short values (pydicom only notices a cut value when it
    # converts it), sparsely after: every outcome must be one of our errors, and cuts can never read as complete.
    raw = (data_dir / source).read_bytes()
    partial = tmp_path / "partial.dcm"
    for cut in list(range(300, 9000, 53)) + list(range(9000, len(raw), len(raw) // 25)):
        partial.write_bytes(raw[:cut])
        with pytest.raises((IncompleteVolumeError, DicomReadError)):
            read_volume(partial)
