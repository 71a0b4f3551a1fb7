"""One DICOM file on disk: parse the header once, check it is complete, decode its pixel bytes.

This is the layer under :mod:`rt_mindeye.ingest.dicom`. It knows nothing about mosaics or frames; it answers three
questions fast, for a file that may still be being written by the scanner:

1. *Is it a DICOM at all?* (``DICM`` marker, parsable header) -> :class:`~rt_mindeye.errors.DicomReadError` if not.
2. *Is it complete?* The header promises ``Rows * Columns * BitsAllocated/8 * NumberOfFrames * SamplesPerPixel``
   pixel bytes; a file that holds fewer (or ends inside its header) raises
   :class:`~rt_mindeye.errors.IncompleteVolumeError`, which a watcher retries for a bounded time.
3. *What are its pixels?* One ``numpy`` read of the pixel bytes at their file offset, without pydicom's pixel
   handlers: pydicom parses the header with ``defer_size`` so that the pixel bytes (and the 100+ kB CSA series header)
   are never copied through it.
"""

from __future__ import annotations

import os
import struct
import zlib
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from rt_mindeye.errors import DicomError, DicomReadError, IncompleteVolumeError, RtMindEyeError, UnsupportedDicomError
from rt_mindeye.ingest.rawsequence import RawSequenceError, parse_delimited_sequence

PIXEL_DATA_TAG = 0x7FE00010
FUNCTIONAL_GROUP_TAGS = (0x52009229, 0x52009230)
"""SharedFunctionalGroupsSequence and PerFrameFunctionalGroupsSequence."""
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_BYTES = 65536
"""Element values larger than this are not read while parsing (pixel data, the 100+ kB CSA series header, big
private blobs); the 10-20 kB CSA image header is read with the rest, so reading it never reopens the file."""
_NATIVE_SYNTAXES = {
    ImplicitVRLittleEndian: "<",
    ExplicitVRLittleEndian: "<",
    ExplicitVRBigEndian: ">",
    DeflatedExplicitVRLittleEndian: "<",
}


class TruncatedFileError(IncompleteVolumeError):
    """The file ends before its header (or its encapsulated pixel data) does: still being written, or cut.

    It is an :class:`~rt_mindeye.errors.IncompleteVolumeError`, so a watcher treats it like short pixel data: retry
    for a bounded time. ``expected_bytes`` is the pixel byte count when the header got that far, else 0.
    """

    def __init__(self, path: str | Path, problem: str, file_bytes: int, expected_bytes: int = 0):
        # Skip IncompleteVolumeError's message, which is about pixel bytes; keep its attributes.
        DicomError.__init__(self, path, f"incomplete: {problem} (file has {file_bytes} bytes)")
        self.expected_bytes = expected_bytes
        self.got_bytes = 0
        self.file_bytes = file_bytes


class ShortVolumeError(DicomReadError):
    """A complete file that holds fewer slices than its protocol: the last volume of an interrupted run.

    Not an :class:`~rt_mindeye.errors.IncompleteVolumeError`: waiting will not make it longer.
    """

    def __init__(self, path: str | Path, expected_slices: int, got_slices: int):
        self.expected_slices = expected_slices
        self.got_slices = got_slices
        super().__init__(path, f"short volume: {got_slices} of {expected_slices} slices (interrupted run?)")


@dataclass(frozen=True, eq=False)
class DicomFile:
    """A parsed header plus where its native pixel bytes are (``pixel_offset`` is None when they are in memory)."""

    path: Path
    dataset: pydicom.Dataset
    file_bytes: int
    pixel_offset: int | None
    pixel_length: int
    byte_order: str | None
    """``"<"`` or ``">"`` for native (uncompressed) transfer syntaxes, None for compressed ones."""
    expected_pixel_bytes: int
    pixel_bytes: bytes | None = None
    """The native pixel bytes, when :func:`open_dicom` was asked to read them (or had them in memory)."""
    encapsulated: bool = False
    """Compressed (encapsulated) pixel data: complete, but not decodable by rt-mindeye."""
    raw_sequences: dict = dataclasses.field(default_factory=dict)
    """``{tag: [RawItem, ...]}`` of the top-level undefined-length sequences walked without pydicom (they are then
    absent from ``dataset``): Enhanced MR functional groups, a mosaic's Source Image Sequence, ...; see
    :func:`_read_dataset`."""

    @property
    def deflated(self) -> bool:
        """Deflated transfer syntax: element offsets refer to the inflated stream, not the file."""
        return self.transfer_syntax == DeflatedExplicitVRLittleEndian

    @property
    def transfer_syntax(self) -> str:
        return str(getattr(self.dataset.file_meta, "TransferSyntaxUID", ImplicitVRLittleEndian))


def expected_pixel_bytes(dataset: pydicom.Dataset) -> int | None:
    """Rows * Columns * BitsAllocated/8 * NumberOfFrames * SamplesPerPixel, or None if Rows/Columns/Bits are absent."""
    rows = dataset.get("Rows")
    columns = dataset.get("Columns")
    bits = dataset.get("BitsAllocated")
    if rows is None or columns is None or bits is None:
        return None
    frames = _int_or(dataset.get("NumberOfFrames"), 1) or 1
    samples = _int_or(dataset.get("SamplesPerPixel"), 1) or 1
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and samples == 3:
        samples = 2  # chroma subsampled 2:1 horizontally: Y Y Cb Cr per two pixels
    return (int(rows) * int(columns) * frames * samples * int(bits) + 7) // 8


def _int_or(value, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def raw_element(dataset: pydicom.Dataset, tag: int):
    """The element without triggering a deferred read (pydicom >= 3), else whatever is stored."""
    try:
        return dataset.get_item(tag, keep_deferred=True)
    except TypeError:  # pydicom < 3 has no keep_deferred
        return dataset._dict.get(pydicom.tag.Tag(tag))  # noqa: SLF001 - documented fallback


def _is_image_storage(dataset: pydicom.Dataset) -> bool:
    """Whether the SOP class (data set, else file meta) is an image class; True when neither says (cut early)."""
    sop_class = dataset.get("SOPClassUID") or getattr(dataset.file_meta, "MediaStorageSOPClassUID", None)
    if sop_class is None:
        return True
    return "Image" in getattr(pydicom.uid.UID(str(sop_class)), "name", "")


def open_dicom(path: str | Path, with_pixels: bool = False) -> DicomFile:
    """Parse ``path`` and check that it is complete; with ``with_pixels``, also read the native pixel bytes.

    Header and pixels come from one open file, so a file replaced between the two reads cannot mix them.
    Raises :class:`DicomReadError` (not a DICOM / unparsable), :class:`UnsupportedDicomError` (no pixel data, e.g.
    a report or a DICOMDIR), :class:`TruncatedFileError` / :class:`IncompleteVolumeError` (still being written).
    """
    path = Path(path)
    try:
        fp = open(path, "rb")
    except FileNotFoundError:
        raise DicomReadError(path, "file not found") from None
    except IsADirectoryError:
        raise DicomReadError(path, "is a folder, not a DICOM file") from None
    except OSError as exc:
        raise DicomReadError(path, f"cannot open: {exc.strerror or exc}") from None
    with fp:
        file_bytes = os.fstat(fp.fileno()).st_size
        dataset, groups = _parse_header(fp, path, file_bytes)
        with malformed_values_as(path):
            dicom = _locate_pixels(fp, path, dataset, file_bytes)
        if groups:
            dicom = dataclasses.replace(dicom, raw_sequences=groups)
        if with_pixels and dicom.pixel_offset is not None and dicom.pixel_bytes is None:
            fp.seek(dicom.pixel_offset)
            data = fp.read(dicom.expected_pixel_bytes)
            if len(data) < dicom.expected_pixel_bytes:  # the file shrank since fstat
                raise IncompleteVolumeError(path, dicom.expected_pixel_bytes, len(data))
            dicom = dataclasses.replace(dicom, pixel_bytes=data)
        return dicom


@contextmanager
def malformed_values_as(path: Path):
    """Turn pydicom's complaints about a value it cannot convert into a DicomReadError naming the file."""
    try:
        yield
    except RtMindEyeError:
        raise
    except (BytesLengthException, struct.error, UnicodeDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise DicomReadError(path, f"malformed header value: {exc}") from None


def _parse_header(fp, path: Path, file_bytes: int) -> tuple[pydicom.Dataset, dict]:
    head = fp.read(144)
    has_marker = head[128:132] == b"DICM"
    if file_bytes < 132:
        # The preamble may hold anything, but scanners write zeros: a short all-zero file (or zeros followed by the
        # start of "DICM") is one being written; short text or binary is not DICOM.
        preamble_so_far = not head[:128].strip(b"\0")
        if preamble_so_far and (file_bytes <= 128 or b"DICM".startswith(head[128:])):
            raise TruncatedFileError(path, "file ends inside the 128-byte preamble", file_bytes)
        raise DicomReadError(path, f"not a DICOM file (only {file_bytes} bytes, no 'DICM' marker)")
    if has_marker and len(head) >= 144 and head[132:136] == b"\x02\x00\x00\x00":
        # (0002,0000) group length: the meta header must fit in the file before anything else can be parsed.
        meta_end = 144 + struct.unpack_from("<I", head, 140)[0]
        if file_bytes < meta_end:
            raise TruncatedFileError(path, "file ends inside the file meta header", file_bytes)
    elif has_marker and len(head) < 144:
        raise TruncatedFileError(path, "file ends inside the file meta header", file_bytes)
    if not has_marker and head[:2] not in (b"\x08\x00", b"\x02\x00"):
        # Files without preamble exist (old ACR-NEMA style exports) and start with a group 0002/0008 tag.
        raise DicomReadError(path, "not a DICOM file (no 'DICM' marker at byte 128)")
    fp.seek(0)
    try:
        dataset, groups = _read_dataset(fp, path, file_bytes, force=not has_marker)
    except (InvalidDicomError, EOFError, struct.error) as exc:
        raise TruncatedFileError(path, f"header cannot be parsed to its end ({exc})", file_bytes) from None
    except OSError as exc:
        # pydicom signals "ran out of bytes while reading an element header" as an OSError.
        if "No tag to read" in str(exc) or "end of file" in str(exc).lower():
            raise TruncatedFileError(path, "file ends inside an element header", file_bytes) from None
        raise DicomReadError(path, f"cannot parse DICOM header: {exc}") from None
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise DicomReadError(path, f"cannot parse DICOM header: {exc}") from None
    if not has_marker and len(dataset) == 0:
        raise DicomReadError(path, "not a DICOM file (no 'DICM' marker at byte 128)")
    if _transfer_syntax(dataset) == DeflatedExplicitVRLittleEndian:
        # Deferred values point into the inflated stream, not the file: read everything now.
        fp.seek(0)
        try:
            dataset = pydicom.dcmread(fp, force=not has_marker)
        except (zlib.error, EOFError, struct.error, InvalidDicomError) as exc:
            raise TruncatedFileError(path, f"deflated data set cannot be inflated to its end ({exc})", file_bytes)
        groups = {}
    return dataset, groups


def _stop_at_delimited_sequences(tag, vr, length) -> bool:
    return length == _UNDEFINED_LENGTH and int(tag) != PIXEL_DATA_TAG


_FIRST_CHUNK = 65536


def _read_dataset(fp, path: Path, file_bytes: int, force: bool) -> tuple[pydicom.Dataset, dict]:
    """pydicom's parse, except for top-level sequences of undefined length, which we walk ourselves.

    pydicom builds a Dataset for every nested item of an undefined-length sequence while parsing: the per-frame
    groups of an Enhanced MR volume, or the per-slice Source/Referenced Image Sequences of a Siemens mosaic, cost more
    than everything else in the header. We stop pydicom at each such sequence, walk it with
    :mod:`rt_mindeye.ingest.rawsequence` and let pydicom go on after it (pixel data deferred as usual). Returns the
    dataset (without the walked sequences) and ``{tag: [RawItem, ...]}`` for them. Big-endian files are left to
    pydicom entirely.
    """
    fp.seek(0)
    dataset = read_partial(fp, stop_when=_stop_at_delimited_sequences, defer_size=_DEFER_BYTES, force=force)
    walked: dict[int, list] = {}
    explicit: bool | None = None
    while True:
        position = fp.tell()
        head = fp.read(12)
        if len(head) < 8:
            return dataset, walked
        if explicit is None:
            syntax = _transfer_syntax(dataset)
            if syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
                fp.seek(0)
                return pydicom.dcmread(fp, defer_size=_DEFER_BYTES, force=force), {}
            explicit = syntax == ExplicitVRLittleEndian
        group, element = struct.unpack_from("<HH", head)
        tag = (group << 16) | element
        vr_bytes = head[4:6]
        if explicit and vr_bytes.isalpha() and vr_bytes.isupper():
            if vr_bytes not in (b"SQ", b"UN") or len(head) < 12:
                return dataset, walked  # pydicom stopped for a reason that is not ours
            header, length, inner_explicit = 12, struct.unpack_from("<I", head, 8)[0], vr_bytes == b"SQ"
        else:
            # Implicit VR, by transfer syntax or because pydicom found the data set implicit despite its syntax.
            header, length, inner_explicit = 8, struct.unpack_from("<I", head, 4)[0], False
        if length != _UNDEFINED_LENGTH or tag == PIXEL_DATA_TAG:
            return dataset, walked  # pydicom read to the end: nothing left to walk
        walked[tag], consumed = _walk_delimited(fp, path, file_bytes, position + header, inner_explicit, tag)
        fp.seek(position + header + consumed)
        rest = read_dataset(
            fp, is_implicit_VR=header == 8, is_little_endian=True, stop_when=_stop_at_delimited_sequences,
            defer_size=_DEFER_BYTES,
        )
        for rest_tag in rest.keys():
            dataset[rest_tag] = raw_element(rest, rest_tag)


def _walk_delimited(fp, path: Path, file_bytes: int, start: int, explicit: bool, tag: int) -> tuple[list, int]:
    """Items of the undefined-length sequence whose value starts at ``start``, and the bytes it spans."""
    chunk = _FIRST_CHUNK
    while True:
        fp.seek(start)
        buffer = fp.read(chunk)
        try:
            return parse_delimited_sequence(memoryview(buffer), 0, explicit)
        except RawSequenceError as exc:
            at_end_of_file = start + len(buffer) >= file_bytes
            if not at_end_of_file and any(word in str(exc) for word in ("past", "delimiter", "ends inside")):
                chunk *= 4  # the sequence is longer than what we read: read more
                continue
            if at_end_of_file:
                raise TruncatedFileError(
                    path, f"file ends inside sequence ({tag >> 16:04X},{tag & 0xFFFF:04X})", file_bytes
                ) from None
            raise DicomReadError(
                path, f"malformed sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}", pydicom.datadict.keyword_for_tag(tag) or None
            ) from None


def _locate_pixels(fp, path: Path, dataset: pydicom.Dataset, file_bytes: int) -> DicomFile:
    syntax = _transfer_syntax(dataset)
    if len(dataset) and syntax != DeflatedExplicitVRLittleEndian:
        # A cut inside an element value leaves a short value that pydicom only notices when converting it: check
        # before any value is looked at. (A short PixelData is the ordinary incomplete case, handled below.)
        last_tag = max(dataset.keys())
        last_end = _element_end(raw_element(dataset, last_tag))
        if last_tag != PIXEL_DATA_TAG and last_end is not None and last_end > file_bytes:
            raise TruncatedFileError(path, "file ends inside a header element", file_bytes)
    expected = expected_pixel_bytes(dataset)
    byte_order = _NATIVE_SYNTAXES.get(syntax)
    element = raw_element(dataset, PIXEL_DATA_TAG)
    if element is None:
        if _is_image_storage(dataset) or dataset.get("Rows") is not None:
            raise TruncatedFileError(path, "file ends before the pixel data element", file_bytes, expected or 0)
        sop = dataset.get("SOPClassUID") or getattr(dataset.file_meta, "MediaStorageSOPClassUID", None)
        sop_name = getattr(sop, "name", sop) if sop is not None else "unknown SOP class"
        raise UnsupportedDicomError(path, f"no pixel data ({sop_name})", "PixelData")
    offset = getattr(element, "value_tell", None)
    length = getattr(element, "length", None)
    if syntax == DeflatedExplicitVRLittleEndian or offset is None or length is None:
        # The value is in memory: pydicom inflated the whole (deflated) file, or read a small value eagerly.
        value = dataset.PixelData
        if expected is None:
            raise DicomReadError(path, "pixel data without Rows/Columns/BitsAllocated", "Rows")
        if len(value) < expected:
            raise IncompleteVolumeError(path, expected, len(value))
        return DicomFile(path, dataset, file_bytes, None, len(value), "<", expected, bytes(value[:expected]))
    length = int(length)
    if length == _UNDEFINED_LENGTH:
        if byte_order is not None:
            raise DicomReadError(path, "undefined-length pixel data in a native transfer syntax", "PixelData")
        _check_encapsulated_complete(fp, path, int(offset), file_bytes)
        return DicomFile(path, dataset, file_bytes, None, file_bytes - int(offset), None, expected or 0, encapsulated=True)
    if expected is None:
        raise DicomReadError(path, "pixel data without Rows/Columns/BitsAllocated", "Rows")
    got = max(0, min(length, file_bytes - offset))
    if got < expected:
        if length < expected:
            raise DicomReadError(
                path, f"header promises {expected} pixel bytes but PixelData is declared {length}", "PixelData"
            )
        raise IncompleteVolumeError(path, expected, got)
    return DicomFile(path, dataset, file_bytes, offset, length, byte_order, expected)


def _check_encapsulated_complete(fp, path: Path, offset: int, file_bytes: int) -> None:
    """Walk the fragment items of encapsulated pixel data up to the sequence delimiter (FFFE,E0DD)."""
    position = offset
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            raise TruncatedFileError(path, "encapsulated pixel data has no end delimiter yet", file_bytes)
        group, element, length = struct.unpack("<HHI", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000):
            raise DicomReadError(path, f"unexpected tag ({group:04X},{element:04X}) in encapsulated pixel data")
        position += 8 + length
        if position > file_bytes:
            raise TruncatedFileError(path, "file ends inside an encapsulated pixel fragment", file_bytes)


def _transfer_syntax(dataset: pydicom.Dataset) -> str:
    return str(getattr(dataset.file_meta, "TransferSyntaxUID", "") or ImplicitVRLittleEndian)


def _element_end(element) -> int | None:
    tell = getattr(element, "value_tell", None)
    length = getattr(element, "length", None)
    if tell is None or length is None or length == _UNDEFINED_LENGTH:
        return None
    return int(tell) + int(length)


def check_complete(path: str | Path) -> pydicom.Dataset:
    """The parsed header of ``path`` if the file is a complete DICOM image; raise otherwise.

    Complete means: the header parses to its end and the pixel data holds every byte the header promises
    (``Rows * Columns * BitsAllocated/8 * NumberOfFrames * SamplesPerPixel``). The pixel bytes themselves are not read
    (the returned dataset defers them). Raises :class:`~rt_mindeye.errors.IncompleteVolumeError` (or its subclass
    :class:`TruncatedFileError` when the file ends inside the header) while the file is being written,
    :class:`~rt_mindeye.errors.DicomReadError` for a file that is not DICOM, and
    :class:`~rt_mindeye.errors.UnsupportedDicomError` for a DICOM without pixel data.
    """
    return open_dicom(path).dataset


# --- pixels -------------------------------------------------------------------------------------------------------


def pixel_dtype(dicom: DicomFile) -> np.dtype:
    """The numpy dtype of the stored pixels (BitsAllocated, PixelRepresentation, byte order)."""
    ds = dicom.dataset
    if dicom.byte_order is None or dicom.encapsulated:
        raise UnsupportedDicomError(
            dicom.path, f"compressed transfer syntax {pydicom.uid.UID(dicom.transfer_syntax).name}", "TransferSyntaxUID"
        )
    samples = _int_or(ds.get("SamplesPerPixel"), 1)
    if samples != 1:
        raise UnsupportedDicomError(dicom.path, f"{samples} samples per pixel (colour image)", "SamplesPerPixel")
    bits = int(ds.BitsAllocated)
    signed = _int_or(ds.get("PixelRepresentation"), 0) == 1
    kinds = {8: "i1" if signed else "u1", 16: "i2" if signed else "u2", 32: "i4" if signed else "u4"}
    if bits not in kinds:
        raise UnsupportedDicomError(dicom.path, f"{bits} bits allocated per pixel", "BitsAllocated")
    return np.dtype(dicom.byte_order + kinds[bits])


def read_pixels(dicom: DicomFile) -> np.ndarray:
    """The stored pixels as ``(frames, rows, columns)`` integers in native byte order (no rescale applied).

    Uses the bytes :func:`open_dicom` read (``with_pixels=True``), else reads exactly the promised bytes; signed pixels with fewer stored than allocated bits
    are sign-extended so that e.g. 12-bit two's-complement values come out right.
    """
    ds = dicom.dataset
    dtype = pixel_dtype(dicom)
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = _int_or(ds.get("NumberOfFrames"), 1) or 1
    count = rows * columns * frames
    buffer = dicom.pixel_bytes
    if buffer is None:
        with open(dicom.path, "rb") as fp:
            fp.seek(dicom.pixel_offset)
            buffer = fp.read(count * dtype.itemsize)
    if len(buffer) < count * dtype.itemsize:
        # The file shrank or was replaced since the header was parsed.
        raise IncompleteVolumeError(dicom.path, count * dtype.itemsize, len(buffer))
    pixels = np.frombuffer(buffer, dtype=dtype, count=count).reshape(frames, rows, columns)
    if not dtype.isnative:
        pixels = pixels.astype(dtype.newbyteorder("="))
    stored = _int_or(ds.get("BitsStored"), dtype.itemsize * 8)
    unused = dtype.itemsize * 8 - stored
    if dtype.kind == "i" and 0 < unused < dtype.itemsize * 8:
        pixels = (pixels << unused) >> unused
    return pixels


__all__ = [
    "DicomFile",
    "ShortVolumeError",
    "TruncatedFileError",
    "check_complete",
    "expected_pixel_bytes",
    "open_dicom",
    "pixel_dtype",
    "read_pixels",
]
