"""Enhanced (multi-frame) MR: one file per volume with geometry per frame (Siemens XA real-time export).

Each frame is one slice. Its attributes live in functional groups: first the frame's own item of
``PerFrameFunctionalGroupsSequence``, else the single item of ``SharedFunctionalGroupsSequence``:

* ``PlanePositionSequence[0].ImagePositionPatient`` and ``PlaneOrientationSequence[0].ImageOrientationPatient``;
* ``PixelMeasuresSequence[0]``: PixelSpacing, SliceThickness, SpacingBetweenSlices;
* ``PixelValueTransformationSequence[0]``: RescaleSlope / RescaleIntercept (per frame where they vary);
* ``FrameContentSequence[0]``: FrameAcquisitionDateTime (else FrameReferenceDateTime) -> slice times.

Frames are sorted by their position along the slice normal (``row_cosine x column_cosine``); a location that occurs
``T`` times means the file holds ``T`` volumes (ordered by TemporalPositionIndex, then frame time, then frame
number). A volume with fewer slices than the protocol's ``sSliceArray.lSize`` (Siemens ASCCONV, in the
``SIEMENS MR SDS 01`` private block) is the short last volume of an interrupted run: :class:`ShortVolumeError`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from pydicom.multival import MultiValue

from rt_mindeye.errors import DicomReadError, UnsupportedDicomError
from rt_mindeye.ingest import csa as csa_module
from rt_mindeye.ingest import geometry
from rt_mindeye.ingest.dicomfile import DicomFile, ShortVolumeError, raw_element, read_pixels
from rt_mindeye.ingest.rawsequence import RawSequenceError, parse_sequence
from rt_mindeye.ingest.headers import (
    datetime_seconds,
    header_fields,
    integer,
    number,
    numbers,
    volume_identity,
)
from rt_mindeye.volume import Volume

POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_MM = 0.01
_SLICE_COUNT = re.compile(rb"sSliceArray\.lSize\s*=\s*(\d+)")


_PER_FRAME_TAG = 0x52009230
_SHARED_TAG = 0x52009229


def _functional_group_items(dicom: DicomFile, tag: int, keyword: str) -> list:
    """Items of a functional group sequence: walked from raw bytes when possible (fast), else via pydicom."""
    if tag in dicom.raw_sequences:
        return dicom.raw_sequences[tag]
    element = raw_element(dicom.dataset, tag)
    if element is None:
        return []
    explicit = not getattr(element, "is_implicit_VR", True)
    length = getattr(element, "length", None)
    if getattr(element, "is_little_endian", False) and length not in (None, 0xFFFFFFFF) and not dicom.deflated:
        raw = element.value
        if raw is None and getattr(element, "value_tell", None) is not None:
            with open(dicom.path, "rb") as fp:
                fp.seek(element.value_tell)
                raw = fp.read(length)
        if isinstance(raw, bytes) and len(raw) == length:
            try:
                return parse_sequence(raw, explicit=explicit)
            except RawSequenceError:
                pass  # unusual encoding: let pydicom decide
    return list(dicom.dataset.get(keyword) or [])


class _Groups:
    """Per-frame-then-shared lookup of functional group attributes."""

    def __init__(self, dicom: DicomFile):
        self.path = dicom.path
        shared = _functional_group_items(dicom, _SHARED_TAG, "SharedFunctionalGroupsSequence")
        self.shared = shared[0] if shared else None
        self.per_frame = _functional_group_items(dicom, _PER_FRAME_TAG, "PerFrameFunctionalGroupsSequence")

    def item(self, frame: int, sequence: str):
        """The first item of ``sequence`` for ``frame`` (per-frame first, then shared), or None."""
        if frame < len(self.per_frame):
            found = self.per_frame[frame].get(sequence)
            if found:
                return found[0]
        if self.shared is not None:
            found = self.shared.get(sequence)
            if found:
                return found[0]
        return None

    def all_frames(self, sequence: str, keyword: str, count: int, n_frames: int) -> np.ndarray:
        """``(n_frames, count)`` float64 values of ``keyword`` for every frame, validated in one go."""
        rows = []
        for frame in range(n_frames):
            item = self.item(frame, sequence)
            value = item.get(keyword) if item is not None else None
            if value is None or value == "":
                raise DicomReadError(self.path, f"frame {frame + 1} has no {sequence}", keyword)
            rows.append(list(value) if isinstance(value, (list, tuple, MultiValue)) else [value])
        if any(len(row) != count for row in rows):
            bad = next(frame for frame, row in enumerate(rows) if len(row) != count)
            raise DicomReadError(self.path, f"frame {bad + 1}: expected {count} values, found {len(rows[bad])}", keyword)
        try:
            values = np.array(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise DicomReadError(self.path, "a frame has non-numeric values", keyword) from None
        if not np.isfinite(values).all():
            raise DicomReadError(self.path, "a frame has non-finite values", keyword)
        return values

    def numbers(self, frame: int, sequence: str, keyword: str, count: int) -> np.ndarray:
        item = self.item(frame, sequence)
        if item is None:
            raise DicomReadError(self.path, f"frame {frame + 1} has no {sequence}", keyword)
        return numbers(item, keyword, count, self.path)


_SDS_CREATOR = "SIEMENS MR SDS 01"


def _protocol_elements(dicom: DicomFile) -> list:
    """Candidate MrPhoenixProtocol elements: (0021,xx19) at the top level, in the shared functional group item, and
    inside its (0021,xxFE) private sequence (where Siemens XA puts it)."""
    ds = dicom.dataset
    found = [csa_module.private_element(ds, 0x0021, _SDS_CREATOR, 0x19)]
    shared = _functional_group_items(dicom, _SHARED_TAG, "SharedFunctionalGroupsSequence")
    if shared:
        found.append(csa_module.private_element(shared[0], 0x0021, _SDS_CREATOR, 0x19))
        nested = csa_module.private_element(shared[0], 0x0021, _SDS_CREATOR, 0xFE)
        items = nested.value if nested is not None else None
        if items is not None and not isinstance(items, (bytes, bytearray, str)):
            for item in list(items)[:1]:
                found.append(csa_module.private_element(item, 0x0021, _SDS_CREATOR, 0x19))
    return [element for element in found if element is not None and element.value is not None]


def expected_slices(dicom: DicomFile) -> int | None:
    """``sSliceArray.lSize`` of the Siemens protocol (ASCCONV text) in the file, if present."""
    for element in _protocol_elements(dicom):
        value = element.value
        text = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        match = _SLICE_COUNT.search(text)
        if match:
            return int(match.group(1))
    return None


def _is_original_2d(dataset) -> bool:
    """Short-volume detection applies to original 2-D acquisitions: for 3-D ones lSize counts slabs, and derived
    images (MPR, ...) carry their source's protocol."""
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    if image_type and image_type[0] != "ORIGINAL":
        return False
    return str(dataset.get("MRAcquisitionType", "2D") or "2D").upper() != "3D"


def read_multiframe_volumes(dicom: DicomFile) -> list[Volume]:
    """Every volume in an Enhanced MR file, in temporal order."""
    ds, path = dicom.dataset, dicom.path
    n_frames = integer(ds, "NumberOfFrames", 1) or 1
    groups = _Groups(dicom)
    if groups.per_frame and len(groups.per_frame) != n_frames:
        raise DicomReadError(
            path, f"{len(groups.per_frame)} per-frame groups for {n_frames} frames", "PerFrameFunctionalGroupsSequence"
        )
    orientation = groups.numbers(0, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
    if not geometry.orientation_is_valid(orientation):
        raise DicomReadError(path, f"direction cosines are not orthonormal: {orientation}", "ImageOrientationPatient")
    pixel_spacing = groups.numbers(0, "PixelMeasuresSequence", "PixelSpacing", 2)
    normal = geometry.slice_normal_from_orientation(orientation)
    positions = groups.all_frames("PlanePositionSequence", "ImagePositionPatient", 3, n_frames)
    orientations = groups.all_frames("PlaneOrientationSequence", "ImageOrientationPatient", 6, n_frames)
    deviating = np.flatnonzero(np.abs(orientations - orientation).max(axis=1) > 1e-4)
    if deviating.size:
        frame = int(deviating[0])
        raise UnsupportedDicomError(path, f"frame {frame + 1} has another orientation", "ImageOrientationPatient")
    frame_times = np.array([_frame_time(groups, frame) for frame in range(n_frames)], dtype=np.float64)
    temporal = np.array([_temporal_index(groups, frame) for frame in range(n_frames)])

    distances = positions @ normal
    order = np.lexsort((np.arange(n_frames), np.nan_to_num(frame_times), temporal, np.round(distances, 2)))
    locations: list[list[int]] = []
    for frame in order:
        if locations and abs(distances[frame] - distances[locations[-1][0]]) < POSITION_TOLERANCE_MM:
            locations[-1].append(int(frame))
        else:
            locations.append([int(frame)])
    counts = sorted({len(members) for members in locations})
    if len(counts) != 1:
        raise DicomReadError(path, f"slice locations occur unequally often ({counts})", "PlanePositionSequence")
    n_volumes, n_slices = counts[0], len(locations)
    protocol_slices = expected_slices(dicom) if _is_original_2d(ds) else None
    if protocol_slices is not None and n_slices < protocol_slices:
        raise ShortVolumeError(path, protocol_slices, n_slices)

    location_distances = np.array([distances[members[0]] for members in locations])
    if n_slices > 1:
        gaps = np.diff(location_distances)
        if np.ptp(gaps) > SPACING_TOLERANCE_MM:
            raise DicomReadError(
                path, f"unequal slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm)", "PlanePositionSequence"
            )
        spacing = float(gaps.mean())
    else:
        measures = groups.item(0, "PixelMeasuresSequence")
        spacing = (number(measures, "SpacingBetweenSlices", path) or number(measures, "SliceThickness", path)) or 1.0

    pixels = read_pixels(dicom)
    identity = volume_identity(ds, path)
    if identity.tr is None:
        timing = groups.item(0, "MRTimingAndRelatedParametersSequence")
        repetition_ms = number(timing, "RepetitionTime", path) if timing is not None else None
        if repetition_ms:
            identity = dataclasses.replace(identity, tr=repetition_ms / 1000.0)
    enhanced_fields = _enhanced_acquisition_fields(groups, ds)
    volumes = []
    for t in range(n_volumes):
        frames = [members[t] for members in locations]
        stacked = np.empty((n_slices,) + pixels.shape[1:], dtype=np.float32)
        stacked[...] = pixels[frames]
        for k, frame in enumerate(frames):
            slope, intercept = _rescale(groups, frame, ds)
            if slope != 1.0:
                stacked[k] *= np.float32(slope)
            if intercept != 0.0:
                stacked[k] += np.float32(intercept)
        times = frame_times[frames]
        slice_times = None
        if n_slices > 1 and np.all(np.isfinite(times)) and np.ptp(times) > 0:
            slice_times = times - times.min()
        acquisition_time = identity.acquisition_time
        if n_volumes > 1 or acquisition_time is None:
            acquisition_time = float(np.nanmin(times)) if np.any(np.isfinite(times)) else acquisition_time
        first = frames[0]
        volumes.append(
            Volume(
                data=stacked.T,  # [column, row, slice], Fortran-ordered like the other readers
                affine=geometry.ras_affine(positions[first], orientation, pixel_spacing, normal, spacing),
                series=identity.series,
                volume=identity.volume if n_volumes == 1 else int(temporal[first]) or t + 1,
                tr=identity.tr,
                acquisition_time=acquisition_time,
                slice_times=slice_times,
                sop_instance_uid=identity.sop_instance_uid if n_volumes == 1 else f"{identity.sop_instance_uid}#{t + 1}",
                source=path,
                header=header_fields(ds, {"layout": "multiframe", "frames": n_frames, **enhanced_fields}),
            )
        )
    return volumes


def read_multiframe(dicom: DicomFile) -> Volume:
    """The single volume of an Enhanced MR file (the Siemens XA real-time export writes one per file)."""
    volumes = read_multiframe_volumes(dicom)
    if len(volumes) != 1:
        raise UnsupportedDicomError(
            dicom.path, f"file holds {len(volumes)} volumes; use read_volumes() for multi-volume files", "NumberOfFrames"
        )
    return volumes[0]


def _enhanced_acquisition_fields(groups: _Groups, dataset) -> dict:
    """EchoTime and FlipAngle, which Enhanced MR keeps in functional groups rather than at the top level."""
    fields = {}
    echo = groups.item(0, "MREchoSequence")
    if dataset.get("EchoTime") in (None, "") and echo is not None:
        value = number(echo, "EffectiveEchoTime", groups.path)
        if value is not None:
            fields["EchoTime"] = value
    timing = groups.item(0, "MRTimingAndRelatedParametersSequence")
    if dataset.get("FlipAngle") in (None, "") and timing is not None:
        value = number(timing, "FlipAngle", groups.path)
        if value is not None:
            fields["FlipAngle"] = value
    return fields


def _frame_time(groups: _Groups, frame: int) -> float:
    content = groups.item(frame, "FrameContentSequence")
    if content is None:
        return np.nan
    for keyword in ("FrameAcquisitionDateTime", "FrameReferenceDateTime"):
        value = content.get(keyword)
        if value:
            try:
                seconds = datetime_seconds(str(value))
            except ValueError:
                raise DicomReadError(groups.path, f"frame {frame + 1}: not a DICOM date-time: {value!r}", keyword)
            if seconds is not None:
                return seconds
    return np.nan


def _temporal_index(groups: _Groups, frame: int) -> int:
    content = groups.item(frame, "FrameContentSequence")
    if content is None:
        return 0
    return integer(content, "TemporalPositionIndex", 0) or 0


def _rescale(groups: _Groups, frame: int, dataset) -> tuple[float, float]:
    transform = groups.item(frame, "PixelValueTransformationSequence")
    source = transform if transform is not None else dataset
    slope = number(source, "RescaleSlope", groups.path, 1.0)
    intercept = number(source, "RescaleIntercept", groups.path, 0.0)
    return slope, intercept
