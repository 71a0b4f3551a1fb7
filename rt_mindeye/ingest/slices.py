"""Single-slice DICOM files (GE, Philips classic, Siemens non-mosaic, CT) and the stacking of slices into volumes.

:func:`read_slice` turns one file into a one-slice :class:`~rt_mindeye.volume.Volume`. :func:`read_series` reads
many files and stacks slices:

1. files are grouped by series (SeriesInstanceUID, else SeriesNumber), image orientation and matrix size, so a
   three-plane localizer gives three groups instead of a nonsense stack;
2. inside a group each slice's position along the slice normal (``normal . ImagePositionPatient``) is computed and
   equal positions (within :data:`POSITION_TOLERANCE_MM`) are one slice location;
3. every location must occur equally often (``T`` times, ``T`` = number of volumes); the ``t``-th volume takes the
   ``t``-th file of each location in acquisition order (TemporalPositionIdentifier, AcquisitionNumber,
   AcquisitionTime, InstanceNumber);
4. locations must be equally spaced (within :data:`SPACING_TOLERANCE_MM`); the affine's third column is the normal
   times that spacing, starting at the lowest location.

Mosaic and Enhanced multi-frame files are whole volumes and pass through :func:`rt_mindeye.ingest.dicom.read_dicom`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from rt_mindeye.errors import DicomReadError, RtMindEyeError, UnsupportedDicomError
from rt_mindeye.ingest import geometry
from rt_mindeye.ingest.dicomfile import DicomFile, ShortVolumeError, open_dicom, pixel_dtype, read_pixels
from rt_mindeye.ingest.headers import (
    acquisition_seconds,
    header_fields,
    integer,
    number,
    numbers,
    rescale_in_place,
    volume_identity,
)
from rt_mindeye.volume import Volume

POSITION_TOLERANCE_MM = 0.01
"""Two slices whose positions along the normal differ by less than this are the same location."""
SPACING_TOLERANCE_MM = 0.01
"""Largest allowed difference between consecutive slice gaps (dcm2niix warns on unequal spacing; we refuse)."""


@dataclass(frozen=True, eq=False)
class SliceGeometry:
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    position: np.ndarray
    normal: np.ndarray


def slice_geometry(dicom: DicomFile) -> SliceGeometry:
    """Orientation, spacing and position of a one-frame image; UnsupportedDicomError when it has no geometry."""
    ds, path = dicom.dataset, dicom.path
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if ds.get(keyword) in (None, ""):
            raise UnsupportedDicomError(path, "image without patient geometry", keyword)
    orientation = numbers(ds, "ImageOrientationPatient", 6, path)
    if not geometry.orientation_is_valid(orientation):
        raise DicomReadError(path, f"direction cosines are not orthonormal: {orientation}", "ImageOrientationPatient")
    return SliceGeometry(
        orientation=orientation,
        pixel_spacing=numbers(ds, "PixelSpacing", 2, path),
        position=numbers(ds, "ImagePositionPatient", 3, path),
        normal=geometry.slice_normal_from_orientation(orientation),
    )


def _slice_pixels(dicom: DicomFile) -> np.ndarray:
    """float32 ``[i=column, j=row]`` of a one-frame file, rescaled."""
    frames = integer(dicom.dataset, "NumberOfFrames", 1) or 1
    if frames != 1:
        raise UnsupportedDicomError(
            dicom.path, f"{frames}-frame image of a non-enhanced SOP class", "NumberOfFrames"
        )
    pixels = read_pixels(dicom)[0]
    data = pixels.T.astype(np.float32)  # Fortran-ordered, like the other readers
    rescale_in_place(data, dicom.dataset, dicom.path)
    return data


def _slice_spacing(dicom: DicomFile) -> float:
    spacing = number(dicom.dataset, "SpacingBetweenSlices", dicom.path) or number(
        dicom.dataset, "SliceThickness", dicom.path
    )
    return float(spacing) if spacing and spacing > 0 else 1.0


def read_slice(dicom: DicomFile) -> Volume:
    """A one-slice volume; the slice axis gets SpacingBetweenSlices (else SliceThickness, else 1 mm)."""
    geo = slice_geometry(dicom)
    data = _slice_pixels(dicom)[:, :, np.newaxis]
    identity = volume_identity(dicom.dataset, dicom.path)
    return Volume(
        data=data,
        affine=geometry.ras_affine(geo.position, geo.orientation, geo.pixel_spacing, geo.normal, _slice_spacing(dicom)),
        series=identity.series,
        volume=identity.volume,
        tr=identity.tr,
        acquisition_time=identity.acquisition_time,
        slice_times=None,
        sop_instance_uid=identity.sop_instance_uid,
        source=dicom.path,
        header=header_fields(dicom.dataset, {"layout": "slice"}),
    )


def _temporal_key(dicom: DicomFile) -> tuple:
    ds = dicom.dataset
    time = acquisition_seconds(ds, dicom.path)
    return (
        integer(ds, "TemporalPositionIdentifier", 0),
        integer(ds, "AcquisitionNumber", 0),
        time if time is not None else 0.0,
        integer(ds, "InstanceNumber", 0),
        str(dicom.path),
    )


def _series_key(dicom: DicomFile) -> str:
    ds = dicom.dataset
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else f"series {integer(ds, 'SeriesNumber', 0)}"


def stack_slices(files: list[DicomFile]) -> list[Volume]:
    """Volumes from the one-frame files of one series, orientation and matrix (see the module docstring)."""
    first = files[0]
    geometries = [slice_geometry(f) for f in files]
    normal = geometries[0].normal
    distances = np.array([float(normal @ g.position) for g in geometries])
    order = np.argsort(distances, kind="stable")
    locations: list[list[int]] = []
    for index in order:
        if locations and abs(distances[index] - distances[locations[-1][0]]) < POSITION_TOLERANCE_MM:
            locations[-1].append(int(index))
        else:
            locations.append([int(index)])
    counts = {len(members) for members in locations}
    if len(counts) != 1:
        raise DicomReadError(
            first.path,
            f"series {_series_key(first)}: slice locations occur unequally often ({sorted(counts)}): missing files?",
            "ImagePositionPatient",
        )
    n_volumes = counts.pop()
    n_slices = len(locations)
    location_distances = np.array([distances[members[0]] for members in locations])
    if n_slices > 1:
        gaps = np.diff(location_distances)
        if np.ptp(gaps) > SPACING_TOLERANCE_MM:
            raise DicomReadError(
                first.path,
                f"series {_series_key(first)}: unequal slice spacing ({gaps.min():.3f}..{gaps.max():.3f} mm)",
                "ImagePositionPatient",
            )
        spacing = float(gaps.mean())
    else:
        spacing = _slice_spacing(first)
    for members in locations:
        members.sort(key=lambda index: _temporal_key(files[index]))

    volumes = []
    for t in range(n_volumes):
        members = [locations[k][t] for k in range(n_slices)]
        base = files[members[0]]
        geo = geometries[members[0]]
        data = np.empty((int(base.dataset.Columns), int(base.dataset.Rows), n_slices), dtype=np.float32, order="F")
        for k, index in enumerate(members):
            data[:, :, k] = _slice_pixels(files[index])
        times = [acquisition_seconds(files[index].dataset, files[index].path) for index in members]
        slice_times = None
        if all(time is not None for time in times) and n_slices > 1 and np.ptp(times) > 0:
            slice_times = np.array(times, dtype=np.float64) - min(times)
        identity = volume_identity(base.dataset, base.path)
        acquisition_number = integer(base.dataset, "AcquisitionNumber")
        volumes.append(
            Volume(
                data=data,
                affine=geometry.ras_affine(geo.position, geo.orientation, geo.pixel_spacing, normal, spacing),
                series=identity.series,
                volume=acquisition_number if acquisition_number is not None and n_volumes > 1 else t + 1,
                tr=identity.tr,
                acquisition_time=min(times) if all(time is not None for time in times) else None,
                slice_times=slice_times,
                sop_instance_uid=identity.sop_instance_uid,
                source=base.path,
                header=header_fields(base.dataset, {"layout": "slices", "files": n_slices}),
            )
        )
    return volumes


def read_series(
    paths: Iterable[str | Path], on_error: Callable[[Path, RtMindEyeError], None] | None = None
) -> list[Volume]:
    """Volumes from many files; see the module docstring. Ordered by series number, then volume number.

    Without ``on_error`` the first bad file raises. With it, each file that raises an
    :class:`~rt_mindeye.errors.RtMindEyeError` (incomplete, unsupported, short volume, ...) is passed to
    ``on_error(path, error)`` and left out, and the rest is still read.
    """
    from rt_mindeye.ingest.dicom import read_dicom, volume_kind
    from rt_mindeye.ingest.multiframe import read_multiframe_volumes

    def fail(path: Path, error: RtMindEyeError) -> None:
        if on_error is None:
            raise error
        on_error(path, error)

    volumes: list[Volume] = []
    groups: dict[tuple, list[DicomFile]] = defaultdict(list)
    for path in paths:
        path = Path(path)
        try:
            dicom = open_dicom(path, with_pixels=True)
            kind = volume_kind(dicom)
            if kind == "multiframe":
                volumes.extend(read_multiframe_volumes(dicom))
                continue
            if kind == "mosaic":
                volumes.append(read_dicom(dicom))
                continue
            geo = slice_geometry(dicom)
            pixel_dtype(dicom)  # unsupported pixel formats fail here, per file, not later in the stack
        except RtMindEyeError as error:
            fail(path, error)
            continue
        key = (
            _series_key(dicom),
            tuple(np.round(geo.orientation, 4)),
            int(dicom.dataset.Rows),
            int(dicom.dataset.Columns),
        )
        groups[key].append(dicom)
    for files in groups.values():
        try:
            volumes.extend(stack_slices(files))
        except RtMindEyeError as error:
            fail(files[0].path, error)
    for short in _short_volumes(volumes):
        fail(short.source, ShortVolumeError(short.source, short.expected_slices, short.got_slices))
        volumes = [volume for volume in volumes if volume is not short.volume]
    volumes.sort(key=lambda v: (v.series, v.volume, v.acquisition_time or 0.0))
    return volumes


@dataclass(frozen=True, eq=False)
class _Short:
    volume: Volume
    source: Path
    expected_slices: int
    got_slices: int


def _short_volumes(volumes: list[Volume]) -> list[_Short]:
    """Multi-frame volumes with fewer slices than the rest of their series: an interrupted run's last volume."""
    most_slices: dict[int, int] = defaultdict(int)
    for volume in volumes:
        if volume.header.get("layout") == "multiframe":
            most_slices[volume.series] = max(most_slices[volume.series], volume.shape[2])
    return [
        _Short(volume, volume.source, most_slices[volume.series], volume.shape[2])
        for volume in volumes
        if volume.header.get("layout") == "multiframe" and volume.shape[2] < most_slices[volume.series]
    ]
