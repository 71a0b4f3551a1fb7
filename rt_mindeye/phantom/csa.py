"""Encoder for Siemens CSA headers in the "SV10" (CSA2) format, as found in (0029,xx10) and (0029,xx20).

Layout (all integers little-endian int32)::

    b"SV10" b"\\x04\\x03\\x02\\x01"  n_tags  77
    per tag:  name (64 bytes, NUL-padded)  vm  vr (4 bytes, NUL-padded)  syngodt  n_items  77|205
    per item: item_len  item_len  77|205  item_len   then item_len bytes (a NUL-terminated string) padded to 4

Every value is stored as text; numbers are written the way the scanner writes them (``%.8f`` for floats). Tags with no
value have ``n_items`` 0 and the marker 205, empty trailing items are ``(0, 0, 205, 0)``. ``nibabel.nicom.csareader``
and dcm2niix read this layout; :func:`encode` is checked against both in the tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

# Siemens "syngo data type" code for each value representation, as seen in real headers.
SYNGO_DT = {"IS": 6, "UL": 9, "UT": 27, "LO": 19, "UN": 0, "DS": 3, "SH": 22, "FD": 4, "US": 10, "CS": 16,
            "LT": 20, "SL": 7, "ST": 23}
_FILLED = 77
_EMPTY = 205
NAME_BYTES = 64


@dataclass(frozen=True)
class CsaTag:
    name: str
    vr: str
    values: tuple = ()
    """The values (numbers or strings); empty for a declared tag without value."""
    vm: int | None = None
    """Value multiplicity written in the header; ``None`` = number of values (0 = variable, as MosaicRefAcqTimes)."""


def _format(value, vr: str) -> bytes:
    if isinstance(value, bytes):
        text = value
    elif vr in ("FD", "FL", "DS") and not isinstance(value, str):
        text = f"{float(value):.8f}".encode("ascii")
    elif vr in ("IS", "SL", "US", "UL", "SS") and not isinstance(value, str):
        text = f"{int(value):<8d}".encode("ascii") if vr == "IS" else str(int(value)).encode("ascii")
    else:
        text = str(value).encode("latin-1")
    return text + b"\x00"


def encode(tags: Iterable[CsaTag]) -> bytes:
    """Bytes of a CSA2 ("SV10") header holding ``tags`` in order."""
    tags = list(tags)
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<2i", len(tags), _FILLED)
    for tag in tags:
        name = tag.name.encode("ascii")
        if len(name) >= NAME_BYTES:
            raise ValueError(f"CSA tag name too long ({len(name)} bytes): {tag.name!r}")
        if tag.vr not in SYNGO_DT:
            raise ValueError(f"CSA tag {tag.name!r}: unknown VR {tag.vr!r}")
        values = list(tag.values)
        vm = len(values) if tag.vm is None else tag.vm
        # Siemens pads filled tags to at least 6 items; a variable-length tag (vm 0) keeps its own count.
        n_items = 0 if not values else (max(len(values), 6) if vm else len(values) + 3)
        out += name.ljust(NAME_BYTES, b"\x00")
        out += struct.pack("<i4s3i", vm, tag.vr.encode("ascii").ljust(4, b"\x00"), SYNGO_DT[tag.vr], n_items,
                           _FILLED if values else _EMPTY)
        for k in range(n_items):
            if k < len(values):
                item = _format(values[k], tag.vr)
                out += struct.pack("<4i", len(item), len(item), _FILLED, len(item))
                out += item + b"\x00" * (-len(item) % 4)
            else:
                out += struct.pack("<4i", 0, 0, _EMPTY, 0)
    out += b"\x00" * 4  # the scanner ends the header with a zero word
    return bytes(out)


def image_header_tags(*, n_slices: int, slice_normal: Sequence[float], slice_times_ms: Sequence[float],
                      matrix_rows: int, matrix_cols: int, first_slice_position: Sequence[float],
                      time_after_start_s: float,
                      phase_bandwidth_hz: float = 30.0) -> list[CsaTag]:
    """The CSA Image header of an EPI mosaic (the tags readers use, plus common ones left empty as the scanner does)."""
    return [
        CsaTag("EchoLinePosition", "IS", (matrix_rows // 2,)),
        CsaTag("EchoColumnPosition", "IS", (matrix_cols // 2,)),
        CsaTag("EchoPartitionPosition", "IS", (32,)),
        CsaTag("UsedChannelMask", "UL"),
        CsaTag("ICE_Dims", "LO", ("X_1_1_1_1_1_1_1_1_1_1_1_1",)),
        CsaTag("B_value", "IS"),
        CsaTag("ProtocolSliceNumber", "IS", (0,)),
        CsaTag("RealDwellTime", "IS", (2600,)),
        CsaTag("SliceMeasurementDuration", "DS", (60000.0,)),
        CsaTag("SequenceMask", "UL", (134217728,)),
        CsaTag("AcquisitionMatrixText", "SH", (f"{matrix_rows}p*{matrix_cols}",)),
        CsaTag("MeasuredFourierLines", "IS", (0,)),
        CsaTag("PhaseEncodingDirectionPositive", "IS", (1,)),
        CsaTag("NumberOfImagesInMosaic", "US", (n_slices,)),
        CsaTag("DiffusionGradientDirection", "FD", vm=3),
        CsaTag("SliceNormalVector", "FD", tuple(slice_normal)),
        CsaTag("TimeAfterStart", "DS", (time_after_start_s,)),
        CsaTag("ImagePositionPatient", "DS", vm=3),
        CsaTag("ImaAbsTablePosition", "SL", (0, 0, -1200)),
        CsaTag("NonPlanarImage", "US", (0,)),
        CsaTag("SlicePosition_PCS", "FD", tuple(first_slice_position)),
        CsaTag("MultistepIndex", "IS", (0,)),
        CsaTag("ImaRelTablePosition", "IS", (0, 0, 0)),
        CsaTag("ImaCoilString", "LO", ("HC1-7",)),
        CsaTag("BandwidthPerPixelPhaseEncode", "FD", (phase_bandwidth_hz,)),
        CsaTag("MosaicRefAcqTimes", "FD", tuple(slice_times_ms), vm=0),
        CsaTag("ImageHistory", "LO", ("ChannelMixing:ND=true_CMM=1_CDM=1",), vm=0),
    ]


def series_header_tags(*, n_slices: int, tr_us: int, te_us: int, interleaved: bool = True) -> list[CsaTag]:
    """A minimal CSA Series header: the ASCCONV protocol block converters parse for slice order and timing."""
    protocol = "\n".join([
        "### ASCCONV BEGIN ###",
        "ulVersion\t = \t0x14b44b6",
        'tSequenceFileName\t = \t""%SiemensSeq%\\ep2d_bold""',
        f"alTR[0]\t = \t{tr_us}",
        f"alTE[0]\t = \t{te_us}",
        f"sSliceArray.lSize\t = \t{n_slices}",
        f"sSliceArray.ucMode\t = \t{'0x4' if interleaved else '0x1'}",
        f"sKSpace.ucMultiSliceMode\t = \t{'0x2' if interleaved else '0x1'}",
        "sPat.lAccelFactPE\t = \t1",
        "sPat.lAccelFact3D\t = \t1",
        "sSliceAcceleration.lMultiBandFactor\t = \t1",
        "### ASCCONV END ###",
    ])
    return [
        CsaTag("UsedPatientWeight", "IS", (70,)),
        CsaTag("NumberOfPrescans", "IS", (0,)),
        CsaTag("SliceArrayConcatenations", "IS", (1,)),
        CsaTag("PositivePCSDirections", "SH", ("+LPH",)),
        CsaTag("MrPhoenixProtocol", "UN", (protocol,)),
    ]
