"""Volumes -> NIfTI-1: one volume gives a 3-D image, several volumes of one geometry a 4-D time series.

The image keeps the volumes' RAS+ affine as both qform and sform (code 1, "scanner"), float32 data, the TR in
``pixdim[4]`` (seconds, ``xyzt_units`` mm + s) and, when every volume has the same slice times, the slice timing
fields NIfTI can express: ``slice_duration``, ``slice_start``/``slice_end`` and ``slice_code`` for the standard
sequential and interleaved orders. The exact per-slice times go in the JSON sidecar that :func:`save_nifti` can
write (``SliceTiming``, as dcm2niix writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from rt_mindeye.errors import GeometryMismatchError, RtMindEyeError
from rt_mindeye.volume import Volume

AFFINE_TOLERANCE_MM = 1e-3

# NIfTI slice_code values and the order in which they acquire slices 0..n-1.
_SLICE_ORDERS = {
    1: lambda n: list(range(n)),  # sequential increasing
    2: lambda n: list(range(n - 1, -1, -1)),  # sequential decreasing
    3: lambda n: list(range(0, n, 2)) + list(range(1, n, 2)),  # alternating increasing
    4: lambda n: list(range(n - 1, -1, -2)) + list(range(n - 2, -1, -2)),  # alternating decreasing
    5: lambda n: list(range(1, n, 2)) + list(range(0, n, 2)),  # alternating increasing 2
    6: lambda n: list(range(n - 2, -1, -2)) + list(range(n - 1, -1, -2)),  # alternating decreasing 2
}


def common_slice_times(volumes: Sequence[Volume]) -> np.ndarray | None:
    """The slice times shared by every volume (within 1 microsecond), else None."""
    first = volumes[0].slice_times
    if first is None:
        return None
    for volume in volumes[1:]:
        if volume.slice_times is None or not np.allclose(volume.slice_times, first, atol=1e-6):
            return None
    return np.asarray(first, dtype=np.float64)


def slice_code(slice_times: np.ndarray) -> tuple[int, float]:
    """(NIfTI slice_code, slice_duration) of per-slice times; (0, 0) when no standard order fits.

    The code follows the acquisition order alone (as dcm2niix does). The duration is the mean step when the steps
    are regular within 10 % (Siemens rounds slice times to 2.5 ms, so they are never exactly equal), else 0.
    Simultaneous slices (multiband) have no NIfTI-1 code.
    """
    n = len(slice_times)
    if n < 2 or len(np.unique(np.round(slice_times, 6))) != n:
        return 0, 0.0
    acquisition_order = [int(k) for k in np.argsort(slice_times, kind="stable")]
    steps = np.diff(np.sort(slice_times))
    duration = float(steps.mean()) if np.ptp(steps) <= 0.1 * steps.mean() else 0.0
    for code, order in _SLICE_ORDERS.items():
        if acquisition_order == order(n):
            return code, duration
    return 0, 0.0


def to_nifti(volumes: Sequence[Volume] | Volume) -> nib.Nifti1Image:
    """A 3-D (one volume) or 4-D (several, in the given order) NIfTI-1 image of volumes with one geometry.

    Raises :class:`~rt_mindeye.errors.GeometryMismatchError` if shapes or affines (beyond
    :data:`AFFINE_TOLERANCE_MM`) differ, naming the first volume that does.
    """
    if isinstance(volumes, Volume):
        volumes = [volumes]
    volumes = list(volumes)
    if not volumes:
        raise RtMindEyeError("to_nifti needs at least one volume")
    first = volumes[0]
    for volume in volumes[1:]:
        if volume.shape != first.shape:
            raise GeometryMismatchError(volume.source, "shape", first.shape, volume.shape)
        if not np.allclose(volume.affine, first.affine, atol=AFFINE_TOLERANCE_MM):
            worst = float(np.abs(volume.affine - first.affine).max())
            raise GeometryMismatchError(volume.source, "affine", "the first volume's", f"off by {worst:.4g} mm")
    if len(volumes) == 1:
        data = first.data
    else:
        data = np.empty(first.shape + (len(volumes),), dtype=np.float32, order="F")
        for t, volume in enumerate(volumes):
            data[..., t] = volume.data
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), first.affine)
    header = image.header
    header.set_qform(first.affine, code=1)
    header.set_sform(first.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    tr = first.tr
    if tr:
        zooms = list(header.get_zooms())
        if len(zooms) == 4:
            zooms[3] = tr
            header.set_zooms(zooms)
        else:
            header["pixdim"][4] = tr
    header.set_dim_info(slice=2)
    slice_times = common_slice_times(volumes)
    if slice_times is not None:
        code, duration = slice_code(slice_times)
        if code:
            header["slice_code"] = code
            header["slice_start"] = 0
            header["slice_end"] = first.shape[2] - 1
            header["slice_duration"] = duration
    description = first.header.get("SeriesDescription") or "rt-mindeye"
    header["descrip"] = str(description)[:79].encode("ascii", "replace")
    return image


def sidecar(volumes: Sequence[Volume] | Volume) -> dict:
    """The BIDS-style JSON sidecar fields rt-mindeye knows: RepetitionTime, SliceTiming, acquisition fields."""
    if isinstance(volumes, Volume):
        volumes = [volumes]
    first = volumes[0]
    fields: dict = {key: value for key, value in first.header.items() if key in _SIDECAR_FIELDS}
    if "EchoTime" in fields:
        fields["EchoTime"] = float(fields["EchoTime"]) / 1000.0  # BIDS wants seconds
    if first.tr:
        fields["RepetitionTime"] = first.tr
    slice_times = common_slice_times(volumes)
    if slice_times is not None:
        fields["SliceTiming"] = [round(float(t), 6) for t in slice_times]
    fields["SeriesNumber"] = first.series
    fields["ImageType"] = list(first.header.get("ImageType", ()))
    return fields


_SIDECAR_FIELDS = (
    "SeriesDescription",
    "ProtocolName",
    "EchoTime",
    "FlipAngle",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
)


def save_nifti(volumes: Sequence[Volume] | Volume, path: str | Path, json_sidecar: bool = False) -> Path:
    """Write :func:`to_nifti` to ``path`` (``.nii`` or ``.nii.gz``); with ``json_sidecar``, also ``<stem>.json``."""
    path = Path(path)
    image = to_nifti(volumes)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    if json_sidecar:
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        (path.parent / f"{stem}.json").write_text(json.dumps(sidecar(volumes), indent=2) + "\n")
    return path
