"""The data model every stage shares: one fMRI volume = array + affine + header (as in nibabel).

``data`` is indexed ``[i, j, k]`` (k = slice index, in acquisition geometry) and ``affine`` maps voxel indices
``(i, j, k, 1)`` to RAS+ world millimetres, the NIfTI convention. ``header`` holds only non-identifying acquisition
fields (never patient name, ID or birth date).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    data: np.ndarray
    """float32 array ``(i, j, k)``."""
    affine: np.ndarray
    """4x4 float64 voxel-to-RAS+ (mm)."""
    series: int
    """DICOM SeriesNumber; a new series is a new run."""
    volume: int
    """Volume number inside the series as the scanner counts it (InstanceNumber / AcquisitionNumber)."""
    tr: float | None
    """Repetition time in seconds, if known."""
    acquisition_time: float | None
    """Seconds since midnight of the volume's acquisition (AcquisitionTime), if known."""
    slice_times: np.ndarray | None
    """Per-slice acquisition offsets in seconds relative to the earliest slice, length ``data.shape[2]``."""
    sop_instance_uid: str
    """SOPInstanceUID: the identity used to drop duplicates."""
    source: Path | None = None
    """The file the volume was read from."""
    header: Mapping[str, Any] = field(default_factory=dict)
    """Non-identifying acquisition fields (SeriesDescription, EchoTime, ...)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])  # type: ignore[return-value]

    @property
    def voxel_sizes(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def geometry(self) -> tuple[tuple[int, ...], np.ndarray]:
        """(shape, affine): what must stay the same across a series."""
        return self.shape, self.affine
