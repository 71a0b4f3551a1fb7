"""The raw functional-group walker against pydicom, on a real Philips Enhanced MR file and synthetic XA files."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import nibabel.nicom
import numpy as np
import pydicom
import pytest

from rt_mindeye.ingest import multiframe
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.dicomfile import open_dicom
from rt_mindeye.ingest.rawsequence import RawSequenceError, parse_sequence
from rt_mindeye.ingest.synthetic import realistic_affine, write_multiframe

PHILIPS = Path(nibabel.nicom.__file__).parent / "tests" / "data" / "philips_mprage.dcm.gz"
PER_FRAME = 0x52009230


def _raw_sequence_bytes(path: Path, tag: int) -> tuple[bytes, bool]:
    dataset = pydicom.dcmread(path, defer_size=1024)
    element = dataset.get_item(tag, keep_deferred=True)
    with open(path, "rb") as fp:
        fp.seek(element.value_tell)
        return fp.read(element.length), not element.is_implicit_VR


FRAMES_KEPT = 12


@pytest.fixture(scope="module")
def philips(tmp_path_factory) -> Path:
    """nibabel's real Philips Enhanced MR file cut to its first frames (real per-frame items, undefined lengths)."""
    dataset = pydicom.dcmread(io.BytesIO(gzip.decompress(PHILIPS.read_bytes())))
    frames = list(dataset.PerFrameFunctionalGroupsSequence)[:FRAMES_KEPT]
    dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(frames)
    dataset.NumberOfFrames = FRAMES_KEPT
    dataset.PixelData = dataset.PixelData[: FRAMES_KEPT * dataset.Rows * dataset.Columns * 2]
    path = tmp_path_factory.mktemp("philips") / "mprage_12.dcm"
    dataset.save_as(path)  # pydicom writes sequences with undefined length, as Philips does
    return path


def test_walker_agrees_with_pydicom_on_a_real_enhanced_file(philips):
    # Philips writes the groups with undefined length: open_dicom walks them instead of pydicom.
    dicom = open_dicom(philips)
    ours = dicom.raw_sequences[PER_FRAME]
    assert "PerFrameFunctionalGroupsSequence" not in dicom.dataset and "PixelData" in dicom.dataset
    reference = pydicom.dcmread(philips, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    assert len(ours) == len(reference) == FRAMES_KEPT
    for mine, theirs in zip(ours, reference):
        position = mine.get("PlanePositionSequence")[0].get("ImagePositionPatient")
        assert [float(v) for v in position] == [float(v) for v in theirs.PlanePositionSequence[0].ImagePositionPatient]
        content, their_content = mine.get("FrameContentSequence")[0], theirs.FrameContentSequence[0]
        assert content.get("InStackPositionNumber") == their_content.InStackPositionNumber
        assert list(content.get("DimensionIndexValues")) == list(their_content.DimensionIndexValues)
        assert content.get("FrameAcquisitionDateTime") == str(their_content.FrameAcquisitionDateTime)
        transform = mine.get("PixelValueTransformationSequence")[0]
        assert float(transform.get("RescaleSlope")) == float(theirs.PixelValueTransformationSequence[0].RescaleSlope)


def test_fast_and_pydicom_paths_give_the_same_volume(philips, monkeypatch):
    from rt_mindeye.ingest import dicomfile

    fast = read_volume(philips)
    # pydicom parses everything (no stop at the groups) and the groups are read from its Dataset.
    monkeypatch.setattr(dicomfile, "_stop_at_delimited_sequences", lambda tag, vr, length: False)
    monkeypatch.setattr(multiframe, "parse_sequence", lambda *args, **kwargs: (_ for _ in ()).throw(RawSequenceError()))
    assert open_dicom(philips).raw_sequences == {}
    slow = read_volume(philips)
    np.testing.assert_array_equal(fast.data, slow.data)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    assert fast.acquisition_time == slow.acquisition_time
    assert (fast.slice_times is None) == (slow.slice_times is None)


def test_walker_reads_the_synthetic_xa_private_ascconv(tmp_path):
    data = np.zeros((6, 5, 4), dtype=np.int16)
    path = write_multiframe(tmp_path / "xa.dcm", data, realistic_affine(data.shape), protocol_slices=4)
    dicom = open_dicom(path)
    assert multiframe.expected_slices(dicom) == 4


@pytest.fixture()
def xa_file(tmp_path) -> Path:
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    return write_multiframe(tmp_path / "xa.dcm", data, realistic_affine(data.shape))


def test_defined_length_groups_are_walked_from_their_bytes(xa_file):
    raw, explicit = _raw_sequence_bytes(xa_file, PER_FRAME)
    ours = parse_sequence(raw, explicit=explicit)
    reference = pydicom.dcmread(xa_file).PerFrameFunctionalGroupsSequence
    assert [list(map(float, item.get("PlanePositionSequence")[0].get("ImagePositionPatient"))) for item in ours] == [
        list(map(float, item.PlanePositionSequence[0].ImagePositionPatient)) for item in reference
    ]


def test_file_cut_inside_delimited_groups_is_truncated(philips, tmp_path):
    from rt_mindeye.ingest.dicom import TruncatedFileError

    raw = philips.read_bytes()
    start = raw.find(b"\x00\x52\x30\x92")  # (5200,9230) little endian
    assert start > 0
    partial = tmp_path / "partial.dcm"
    for cut in (start + 20, start + 700, start + 3000):
        partial.write_bytes(raw[:cut])
        with pytest.raises(TruncatedFileError):
            open_dicom(partial)


def test_truncated_or_garbled_bytes_raise_walker_errors(xa_file):
    raw, explicit = _raw_sequence_bytes(xa_file, PER_FRAME)
    for cut in (5, 100, len(raw) // 2, len(raw) - 3):
        with pytest.raises(RawSequenceError):
            parse_sequence(raw[:cut], explicit=explicit)
    garbled = b"\x08\x00\x10\x00" + raw[4:]  # first item tag replaced by an element tag
    with pytest.raises(RawSequenceError, match="item tag"):
        parse_sequence(garbled, explicit=explicit)


def test_undefined_length_items_and_un_sequences():
    # item of undefined length holding an implicit-VR private sequence encoded as UN with undefined length
    inner_item = struct.pack("<HHI", 0x0020, 0x0013, 2) + b"7 "
    un_sequence = (
        struct.pack("<HH2sHI", 0x0021, 0x1001, b"UN", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(inner_item))
        + inner_item
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    number = struct.pack("<HH2sH", 0x0020, 0x9128, b"UL", 4) + struct.pack("<I", 3)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + number + un_sequence + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    items = parse_sequence(item)
    assert len(items) == 1
    assert items[0].get("TemporalPositionIndex") == 3
    private = items[0].get((0x0021, 0x1001))
    assert private.vr == "SQ" and private.value[0].get("InstanceNumber") == 7
    with pytest.raises(RawSequenceError, match="end delimiter"):
        parse_sequence(item[:-8])


def test_enhanced_acquisition_fields_come_from_functional_groups(philips):
    volume = read_volume(philips)
    assert volume.tr == pytest.approx(0.0075693, rel=1e-4)  # MRTimingAndRelatedParametersSequence, in s
    assert volume.header["EchoTime"] == pytest.approx(3.513)  # MREchoSequence EffectiveEchoTime, in ms
    assert volume.header["FlipAngle"] == pytest.approx(7.0)
