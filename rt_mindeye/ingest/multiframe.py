"""Enhanced (multi-frame) MR: one file per volume, geometry per frame (Siemens XA real-time export)."""

from __future__ import annotations

from rt_mindeye.errors import UnsupportedDicomError
from rt_mindeye.ingest.dicomfile import DicomFile
from rt_mindeye.volume import Volume


def read_multiframe(dicom: DicomFile) -> Volume:
    raise UnsupportedDicomError(dicom.path, "Enhanced multi-frame reading is not implemented yet", "SOPClassUID")
