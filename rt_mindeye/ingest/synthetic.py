"""Write Siemens-style DICOM files from arrays: for tests and benchmarks of the readers, never for clinical use.

:func:`encode_csa` is the inverse of :func:`rt_mindeye.ingest.csa.parse_csa` (both layouts). :func:`write_mosaic`
writes a VE-style mosaic (MR Image Storage, CSA image header with NumberOfImagesInMosaic, SliceNormalVector and
MosaicRefAcqTimes), :func:`write_multiframe` an XA-style Enhanced MR volume and :func:`write_slices` one classic
MR file per slice. The participant fields are filled with obviously fake values so that tests can check that no
reader ever copies them.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
FAKE_PATIENT = {"PatientName": "Synthetic^Phantom", "PatientID": "SYNTHETIC-0", "PatientBirthDate": "19000101"}



def _default_vr(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "IS"
    if isinstance(value, (int, np.integer)):
        return "IS"
    if isinstance(value, (float, np.floating)):
        return "FD"
    return "LO"


def encode_csa(tags: Mapping[str, Sequence | str | int | float], layout: int = 2, vr: Mapping[str, str] | None = None):
    """Bytes of a CSA header holding ``tags`` (name -> values) in layout 2 (``SV10``) or 1 (old).

    Values are written as text items the way Siemens does (``"%.8f"`` for floats); VRs default to IS/FD/LO by
    Python type, or come from ``vr``. In layout 1 the item length is stored as ``x0 - n_items(first tag)``.
    """
    if layout not in (1, 2):
        raise ValueError(f"CSA layout must be 1 or 2, not {layout}")
    vr = dict(vr or {})
    items_of: dict[str, list] = {}
    for name, value in tags.items():
        items_of[name] = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    first_n_items = len(next(iter(items_of.values()))) if items_of else 0
    out = bytearray()
    if layout == 2:
        out += b"SV10\x04\x03\x02\x01"
    out += struct.pack("<2I", len(items_of), 77)
    for name, items in items_of.items():
        tag_vr = vr.get(name) or _default_vr(items[0] if items else "")
        out += struct.pack("<64si4s3i", name.encode("latin-1"), len(items), tag_vr.encode(), 0, len(items), 77)
        for item in items:
            numeric = tag_vr in ("FD", "FL", "DS") and isinstance(item, (int, float, np.number))
            text = (f"{float(item):.8f}" if numeric else str(item)).encode("latin-1") + b"\0"
            if layout == 2:
                out += struct.pack("<4i", len(text), len(text), 77, len(text))
            else:
                out += struct.pack("<4i", len(text) + first_n_items, len(text), 77, len(text))
            out += text + b"\0" * ((-len(text)) % 4)
    return bytes(out)


def _base_dataset(sop_class: str, series: int, instance: int, acquisition_time_s: float, tr_s: float) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.MagneticFieldStrength = 3
    for keyword, value in FAKE_PATIENT.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.3.{series}"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4"
    ds.SeriesNumber = series
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = instance
    ds.SeriesDescription = "synthetic_bold"
    ds.ProtocolName = "synthetic_bold"
    ds.AcquisitionDate = "20260101"
    hours, rest = divmod(acquisition_time_s, 3600.0)
    minutes, seconds = divmod(rest, 60.0)
    ds.AcquisitionTime = f"{int(hours):02d}{int(minutes):02d}{seconds:09.6f}"
    ds.RepetitionTime = f"{tr_s * 1000:.1f}"
    ds.EchoTime = "30"
    ds.FlipAngle = "62"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _pixel_fields(ds: Dataset, pixels: np.ndarray) -> None:
    if pixels.dtype == np.int16:
        ds.PixelRepresentation = 1
    elif pixels.dtype == np.uint16:
        ds.PixelRepresentation = 0
    else:
        raise ValueError(f"pixels must be int16 or uint16, not {pixels.dtype}")
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()


def volume_to_lps(affine_ras: np.ndarray):
    """(orientation (6,), pixel_spacing [dy, dx], first-slice position LPS, normal, slice spacing) of a RAS affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = lps[:3, :3] / zooms
    orientation = np.concatenate([cosines[:, 0], cosines[:, 1]])
    return orientation, np.array([zooms[1], zooms[0]]), lps[:3, 3].copy(), cosines[:, 2], float(zooms[2])


def write_mosaic(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    series: int = 1,
    instance: int = 1,
    tr: float = 1.5,
    acquisition_time: float = 12 * 3600.0,
    slice_times_ms: Sequence[float] | None = None,
    rescale: tuple[float, float] | None = None,
    csa_layout: int = 2,
    with_csa: bool = True,
    extra_csa: Mapping[str, Sequence] | None = None,
) -> Path:
    """Write integer ``data[i, j, k]`` (int16/uint16) with RAS ``affine`` as a Siemens mosaic DICOM."""
    path = Path(path)
    columns, rows, n_slices = data.shape
    grid = math.ceil(math.sqrt(n_slices))
    mosaic = np.zeros((grid * rows, grid * columns), dtype=data.dtype)
    for k in range(n_slices):
        r, c = divmod(k, grid)
        mosaic[r * rows : (r + 1) * rows, c * columns : (c + 1) * columns] = data[:, :, k].T
    orientation, pixel_spacing, first_position, normal, slice_spacing = volume_to_lps(affine)
    dy, dx = pixel_spacing
    mosaic_position = (
        first_position
        - orientation[:3] * dx * (grid * columns - columns) / 2.0
        - orientation[3:] * dy * (grid * rows - rows) / 2.0
    )
    if slice_times_ms is None:
        # interleaved ascending, as Siemens does for odd slice counts
        order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
        slice_times_ms = np.empty(n_slices)
        slice_times_ms[order] = np.arange(n_slices) * (tr * 1000.0 / n_slices)
    ds = _base_dataset(MR_IMAGE_STORAGE, series, instance, acquisition_time, tr)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Rows, ds.Columns = mosaic.shape
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
    ds.SliceThickness = f"{slice_spacing:.6f}"
    ds.SpacingBetweenSlices = f"{slice_spacing:.6f}"
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in mosaic_position]
    ds.AcquisitionMatrix = [columns, 0, 0, rows]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    if with_csa:
        csa = encode_csa(
            {
                "NumberOfImagesInMosaic": [n_slices],
                "SliceNormalVector": [float(v) for v in normal],
                "MosaicRefAcqTimes": [float(t) for t in slice_times_ms],
                "AcquisitionMatrixText": [f"{rows}*{columns}"],
                **dict(extra_csa or {}),
            },
            layout=csa_layout,
            vr={"NumberOfImagesInMosaic": "US", "SliceNormalVector": "FD", "MosaicRefAcqTimes": "FD", "AcquisitionMatrixText": "SH"},
        )
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        block.add_new(0x08, "CS", "IMAGE NUM 4")
        block.add_new(0x10, "OB", csa)
    _pixel_fields(ds, mosaic)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_slices(
    folder: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    series: int = 1,
    volume: int = 1,
    tr: float = 1.5,
    acquisition_time: float = 12 * 3600.0,
    first_instance: int = 1,
) -> list[Path]:
    """One classic MR file per slice of ``data[i, j, k]`` (int16/uint16), named ``s{series}_v{volume}_k{k}.dcm``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    orientation, pixel_spacing, first_position, normal, slice_spacing = volume_to_lps(affine)
    paths = []
    for k in range(data.shape[2]):
        slice_time = acquisition_time + k * tr / data.shape[2]
        ds = _base_dataset(MR_IMAGE_STORAGE, series, first_instance + k, slice_time, tr)
        ds.AcquisitionNumber = volume
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
        ds.SliceThickness = f"{slice_spacing:.6f}"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in first_position + k * slice_spacing * normal]
        _pixel_fields(ds, data[:, :, k].T)
        path = folder / f"s{series}_v{volume}_k{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    series: int = 1,
    instance: int = 1,
    tr: float = 1.5,
    acquisition_time: float = 12 * 3600.0,
    slice_times_ms: Sequence[float] | None = None,
    protocol_slices: int | None = None,
    rescale: tuple[float, float] | None = None,
) -> Path:
    """An XA-style Enhanced MR file holding ``data[i, j, k]`` (int16/uint16), one frame per slice.

    Per-frame groups carry position and FrameAcquisitionDateTime; orientation, pixel measures and rescale are
    shared. ``protocol_slices`` (default: the frames written) goes into a Siemens ASCCONV ``sSliceArray.lSize``,
    so writing fewer frames than that makes a short volume.
    """
    path = Path(path)
    columns, rows, n_slices = data.shape
    orientation, pixel_spacing, first_position, normal, slice_spacing = volume_to_lps(affine)
    if slice_times_ms is None:
        slice_times_ms = np.arange(n_slices) * (tr * 1000.0 / max(n_slices, 1))
    ds = _base_dataset(ENHANCED_MR_IMAGE_STORAGE, series, instance, acquisition_time, tr)
    del ds.AcquisitionTime
    ds.AcquisitionDateTime = "20260101" + _time_text(acquisition_time)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.MRAcquisitionType = "2D"
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = n_slices
    del ds.RepetitionTime
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
    measures.SliceThickness = f"{slice_spacing:.6f}"
    measures.SpacingBetweenSlices = f"{slice_spacing:.6f}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([plane])
    timing = Dataset()
    timing.RepetitionTime = tr * 1000.0
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    if rescale is not None:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
        transform.RescaleType = "US"
        shared.PixelValueTransformationSequence = DicomSequence([transform])
    ascconv = f"### ASCCONV BEGIN ###\nsSliceArray.lSize\t = \t{protocol_slices or n_slices}\n### ASCCONV END ###"
    # As Siemens XA: shared item -> (0021,10FE) private sequence -> item -> (0021,1019) MrPhoenixProtocol.
    protocol_item = Dataset()
    protocol_block = protocol_item.private_block(0x0021, "SIEMENS MR SDS 01", create=True)
    protocol_block.add_new(0x19, "OB", ascconv.encode("latin-1") + b"\0" * (len(ascconv) % 2))
    shared_block = shared.private_block(0x0021, "SIEMENS MR SDS 01", create=True)
    shared_block.add_new(0xFE, "SQ", DicomSequence([protocol_item]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n_slices):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in first_position + k * slice_spacing * normal]
        frame.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.FrameAcquisitionDateTime = "20260101" + _time_text(acquisition_time + slice_times_ms[k] / 1000.0)
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = 1
        content.StackID = "1"
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _pixel_fields(ds, np.ascontiguousarray(data.transpose(2, 1, 0)))
    ds.save_as(path, enforce_file_format=True)
    return path


def _time_text(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    return f"{int(hours):02d}{int(minutes):02d}{secs:09.6f}"


def realistic_affine(shape=(100, 100, 70), voxel_mm: float = 2.0, tilt_deg: float = 12.0) -> np.ndarray:
    """A RAS affine like a tilted oblique-axial 2 mm EPI: centred on the origin, rotated about x by ``tilt_deg``."""
    angle = math.radians(tilt_deg)
    rotation = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * voxel_mm
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


__all__ = [
    "FAKE_PATIENT",
    "encode_csa",
    "realistic_affine",
    "volume_to_lps",
    "write_mosaic",
    "write_multiframe",
    "write_slices",
]
