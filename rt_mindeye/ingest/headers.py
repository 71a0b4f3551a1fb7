"""DICOM header fields every reader needs: numbers with file-and-field errors, volume identity, safe metadata.

``header_fields`` copies only non-identifying acquisition fields into :attr:`rt_mindeye.volume.Volume.header`; no
patient name, ID, birth date or any other (0010,xxxx) element ever leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from rt_mindeye.errors import DicomReadError
from rt_mindeye.timing import dicom_time_to_seconds

SAFE_HEADER_FIELDS = (
    "SeriesDescription",
    "ProtocolName",
    "EchoTime",
    "FlipAngle",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "Modality",
    "SliceThickness",
    "SpacingBetweenSlices",
    "InPlanePhaseEncodingDirection",
)
"""Fields copied into ``Volume.header``: acquisition parameters only, nothing that identifies the participant."""

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage (Siemens XA, Philips, GE multi-frame)
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)


def numbers(dataset, keyword: str, count: int, path: Path, required: bool = True) -> np.ndarray | None:
    """``count`` float values of ``keyword`` as float64, raising :class:`DicomReadError` naming file and field."""
    value = dataset.get(keyword)
    if value is None or value == "":
        if required:
            raise DicomReadError(path, "required field is missing", keyword)
        return None
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    if len(values) != count:
        raise DicomReadError(path, f"expected {count} values, found {len(values)}", keyword)
    try:
        array = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomReadError(path, f"not numeric: {values!r}", keyword) from None
    if not np.all(np.isfinite(array)):
        raise DicomReadError(path, f"not finite: {values!r}", keyword)
    return array


def number(dataset, keyword: str, path: Path, default: float | None = None) -> float | None:
    """One float value of ``keyword``; ``default`` when absent or empty; :class:`DicomReadError` when malformed."""
    value = dataset.get(keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            return default
        value = value[0]
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise DicomReadError(path, f"not numeric: {value!r}", keyword) from None
    if not np.isfinite(result):
        raise DicomReadError(path, f"not finite: {value!r}", keyword)
    return result


def integer(dataset, keyword: str, default: int | None = None) -> int | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class VolumeIdentity:
    """Where a volume belongs and when it was acquired (fields of :class:`~rt_mindeye.volume.Volume`)."""

    series: int
    volume: int
    tr: float | None
    acquisition_time: float | None
    sop_instance_uid: str


def volume_identity(dataset, path: Path) -> VolumeIdentity:
    """SeriesNumber, InstanceNumber (else AcquisitionNumber), TR in s, AcquisitionTime in s since midnight, SOP UID.

    Missing series/volume numbers become 0 (some converted test files lack them; the scanner always writes them).
    AcquisitionTime falls back to the time part of AcquisitionDateTime (enhanced multi-frame files).
    """
    series = integer(dataset, "SeriesNumber", 0)
    volume = integer(dataset, "InstanceNumber")
    if volume is None:
        volume = integer(dataset, "AcquisitionNumber", 0)
    tr_ms = number(dataset, "RepetitionTime", path)
    if tr_ms is None:
        tr_ms = _enhanced_repetition_time(dataset)
    tr = tr_ms / 1000.0 if tr_ms and tr_ms > 0 else None
    return VolumeIdentity(
        series=int(series),
        volume=int(volume),
        tr=tr,
        acquisition_time=acquisition_seconds(dataset, path),
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "") or ""),
    )


def _enhanced_repetition_time(dataset) -> float | None:
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if not shared:
        return None
    timing = shared[0].get("MRTimingAndRelatedParametersSequence")
    if not timing:
        return None
    value = timing[0].get("RepetitionTime")
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def acquisition_seconds(dataset, path: Path) -> float | None:
    """Seconds since midnight of AcquisitionTime (or AcquisitionDateTime's time part); None when absent."""
    value = dataset.get("AcquisitionTime")
    field = "AcquisitionTime"
    if not value:
        date_time = str(dataset.get("AcquisitionDateTime", "") or "")
        value = date_time[8:] if len(date_time) > 8 else None
        field = "AcquisitionDateTime"
    if not value:
        return None
    try:
        return dicom_time_to_seconds(str(value))
    except ValueError:
        raise DicomReadError(path, f"not a DICOM time: {value!r}", field) from None


def datetime_seconds(value: str) -> float | None:
    """Seconds since midnight of a DICOM DT value (``YYYYMMDDHHMMSS.FFFFFF[+ZZZZ]``); None if it has no time part."""
    text = str(value or "").strip()
    for sign in "+-":
        cut = text.find(sign, 8)
        if cut > 0:
            text = text[:cut]
    if len(text) <= 8:
        return None
    return dicom_time_to_seconds(text[8:])


def header_fields(dataset, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The non-identifying acquisition fields of ``dataset`` as plain Python values (str, float, tuple)."""
    header: dict[str, Any] = {}
    for keyword in SAFE_HEADER_FIELDS:
        value = dataset.get(keyword)
        if value is None or value == "":
            continue
        header[keyword] = _plain(value)
    if extra:
        header.update(extra)
    return header


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal, float)):
        return float(value)
    if isinstance(value, (pydicom.valuerep.IS, int)):
        return int(value)
    return str(value)


def rescale_in_place(data: np.ndarray, dataset, path: Path, slope: float | None = None, intercept: float | None = None):
    """Apply RescaleSlope / RescaleIntercept (or the given values) to float ``data`` in place."""
    if slope is None:
        slope = number(dataset, "RescaleSlope", path, 1.0)
    if intercept is None:
        intercept = number(dataset, "RescaleIntercept", path, 0.0)
    if slope != 1.0:
        data *= np.float32(slope)
    if intercept != 0.0:
        data += np.float32(intercept)
