"""DICOM file(s) -> :class:`~rt_mindeye.volume.Volume`: the public entry points of the ingest readers.

* :func:`check_complete` - is this file a complete DICOM image yet? (cheap: parses the header, never the pixels)
* :func:`read_volume` - one file -> one volume: Siemens mosaic, Enhanced (multi-frame) MR, or a single slice.
* :func:`read_volumes` - one file -> all its volumes (an Enhanced MR file may hold a whole run).
* :func:`read_series` - many files -> volumes: groups single-slice files (GE, Philips, Siemens non-mosaic) into
  volumes by their position along the slice normal; mosaic and multi-frame files pass through one volume each.

A factory picks the reader as nibabel's ``wrapper_from_data`` does: first by SOPClassUID (Enhanced MR ->
:mod:`.multiframe`), then by the Siemens CSA header (mosaic -> :mod:`.mosaic`), else the single-slice reader
(:mod:`.slices`). Every failure is an :class:`~rt_mindeye.errors.RtMindEyeError` naming the file:

* :class:`~rt_mindeye.errors.IncompleteVolumeError` (and :class:`TruncatedFileError`): still being written, retry;
* :class:`~rt_mindeye.errors.DicomReadError`: not DICOM, or a required field is missing/malformed;
* :class:`CsaReadError`: the Siemens CSA header is corrupt;
* :class:`~rt_mindeye.errors.UnsupportedDicomError`: valid DICOM rt-mindeye does not convert (compressed, colour,
  no pixels, ...);
* :class:`ShortVolumeError`: a multi-frame volume with fewer slices than its protocol (interrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from rt_mindeye.errors import DicomReadError, IncompleteVolumeError, RtMindEyeError, UnsupportedDicomError
from rt_mindeye.ingest import csa as csa_module
from rt_mindeye.ingest.csa import CsaReadError
from rt_mindeye.ingest.dicomfile import (
    DicomFile,
    ShortVolumeError,
    TruncatedFileError,
    check_complete,
    malformed_values_as,
    open_dicom,
)
from rt_mindeye.ingest.headers import ENHANCED_MR_SOP_CLASSES
from rt_mindeye.volume import Volume

__all__ = [
    "CsaReadError",
    "DicomReadError",
    "IncompleteVolumeError",
    "ShortVolumeError",
    "TruncatedFileError",
    "UnsupportedDicomError",
    "check_complete",
    "read_dicom",
    "read_series",
    "read_volume",
    "read_volumes",
    "volume_kind",
]


def volume_kind(dicom: DicomFile) -> str:
    """``"multiframe"``, ``"mosaic"`` or ``"slice"``: which reader handles this (complete, parsed) file."""
    from rt_mindeye.ingest.mosaic import is_mosaic

    if str(dicom.dataset.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES:
        return "multiframe"
    if is_mosaic(dicom.dataset, csa_module.read_csa(dicom.dataset, "image", dicom.path)):
        return "mosaic"
    return "slice"


def read_dicom(dicom: DicomFile) -> Volume:
    """The volume of an already opened (complete) :class:`DicomFile`; see :func:`read_volume`."""
    from rt_mindeye.ingest import mosaic, multiframe, slices

    dataset = dicom.dataset
    with malformed_values_as(dicom.path):
        if str(dataset.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES:
            return multiframe.read_multiframe(dicom)
        csa_header = csa_module.read_csa(dataset, "image", dicom.path)
        if mosaic.is_mosaic(dataset, csa_header):
            return mosaic.read_mosaic(dicom, csa_header)
        return slices.read_slice(dicom)


def read_volume(path: str | Path) -> Volume:
    """One DICOM file -> one :class:`~rt_mindeye.volume.Volume` (float32 ``[i, j, k]``, RAS+ affine).

    Mosaic and Enhanced multi-frame files hold a whole volume; any other image file gives a one-slice volume (use
    :func:`read_series` to stack slices). Raises the errors listed in the module docstring.
    """
    return read_dicom(open_dicom(path, with_pixels=True))


def read_volumes(path: str | Path) -> list[Volume]:
    """Every volume in one file: one for mosaics and slices, one per time point for multi-volume Enhanced MR."""
    from rt_mindeye.ingest import multiframe

    dicom = open_dicom(path, with_pixels=True)
    with malformed_values_as(dicom.path):
        if volume_kind(dicom) == "multiframe":
            return multiframe.read_multiframe_volumes(dicom)
    return [read_dicom(dicom)]


def read_series(
    paths: Iterable[str | Path], on_error: Callable[[Path, RtMindEyeError], None] | None = None
) -> list[Volume]:
    """Volumes from many files, in acquisition order; single-slice files are stacked into volumes.

    Files of different series (SeriesInstanceUID, else SeriesNumber) are kept apart; the result is ordered by
    series number, then volume number. See :mod:`rt_mindeye.ingest.slices` for the stacking rule. A multi-frame
    volume with fewer slices than the rest of its series raises :class:`ShortVolumeError`. With ``on_error``, bad
    files are reported to it and skipped instead of raising.
    """
    from rt_mindeye.ingest import slices

    return slices.read_series(paths, on_error)
