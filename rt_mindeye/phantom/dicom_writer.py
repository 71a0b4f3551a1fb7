"""Write simulated volumes as Siemens real-time export DICOM files (VE mosaics, or XA Enhanced MR multi-frame).

Mosaic (Siemens VE, ``ideacmdtool`` real-time export): one file per volume named ``001_{series:06d}_{volume:06d}.dcm``
(volume 1-based), MR Image Storage, explicit VR little endian, 16-bit unsigned pixels with a fixed rescale slope per
series. The slices are tiled row by row into a square grid of ``ceil(sqrt(n))`` tiles per side.
ImageOrientationPatient is the slices' orientation; ImagePositionPatient describes the *mosaic* as if it were one big
image (the scanner's convention), which readers correct to the first slice:

    IPP_mosaic = IPP_slice0 - col_cos * row_spacing * (mosaic_rows - rows) / 2
                            - row_cos * col_spacing * (mosaic_cols - cols) / 2

The private CSA Image header (``SIEMENS CSA HEADER``, (0029,1010)) carries NumberOfImagesInMosaic, SliceNormalVector
and MosaicRefAcqTimes (slice times in ms), and the CSA Series header (0029,1020) a minimal ASCCONV protocol.

XA (Siemens Vida/Sola): Enhanced MR Image Storage, one multi-frame file per volume, a frame per slice, geometry per
frame in PerFrameFunctionalGroupsSequence (PlanePositionSequence), shared orientation and spacing in
SharedFunctionalGroupsSequence, frame acquisition times in FrameContentSequence.

Both flavours carry only made-up, non-identifying patient fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from rt_mindeye import __version__
from rt_mindeye.phantom import csa
from rt_mindeye.phantom.brain import LPS_TO_RAS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
FILE_PATTERN = "001_{series:06d}_{volume:06d}.dcm"
DEFAULT_SLOPE = 1.0 / 16.0  # 65535 / 16 = 4096 scanner units of range, 0.06 units of precision
UID_PREFIX = "1.2.826.0.1.3680043.10.1234."  # pydicom-style root + a phantom-specific arc


@dataclass(frozen=True)
class SeriesGeometry:
    """What every volume of a series shares: grid, affine, timing, identity."""

    affine: np.ndarray
    """RAS+ affine of the ``[i, j, k]`` = ``[column, row, slice]`` grid (see :mod:`rt_mindeye.phantom.brain`)."""
    shape: tuple[int, int, int]
    tr_s: float
    echo_time_ms: float
    slice_times_s: np.ndarray
    series_number: int
    series_description: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    date: str
    series_time_s: float
    study_time_s: float
    rescale_slope: float = DEFAULT_SLOPE

    @property
    def voxel_sizes(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def lps_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row cosine, column cosine, slice normal) in DICOM LPS, from the affine."""
        lps = LPS_TO_RAS @ self.affine[:3, :3] / self.voxel_sizes
        return lps[:, 0], lps[:, 1], lps[:, 2]

    def first_slice_position(self) -> np.ndarray:
        """LPS position (mm) of the centre of the first voxel of the first slice."""
        return LPS_TO_RAS @ self.affine[:3, 3]


def dicom_time(seconds: float) -> str:
    """Seconds since midnight as DICOM TM ``HHMMSS.ffffff``."""
    seconds = seconds % 86400
    h = int(seconds // 3600)
    m = int(seconds % 3600 // 60)
    s = seconds - 3600 * h - 60 * m
    return f"{h:02d}{m:02d}{s:09.6f}"


def _ds(values) -> list[str]:
    """Decimal strings at most 16 characters long (DICOM DS)."""
    return [_ds1(v) for v in values]


def _ds1(v: float) -> str:
    for digits in range(10, 0, -1):
        text = f"{float(v):.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{float(v):.6e}"


def quantise(volume: np.ndarray, slope: float) -> np.ndarray:
    """Stored uint16 values of a float volume for a rescale slope (intercept 0), clipped to the uint16 range."""
    return np.clip(np.rint(volume / slope), 0, 65535).astype(np.uint16)


def to_mosaic(volume: np.ndarray) -> np.ndarray:
    """Tile ``[i, j, k]`` (column, row, slice) into a square mosaic: slice k, as a (rows, columns) image
    ``volume[:, :, k].T``, goes to tile (k // m, k % m); unused tiles stay zero."""
    cols, rows, n = volume.shape
    m = int(math.ceil(math.sqrt(n)))
    mosaic = np.zeros((m * rows, m * cols), volume.dtype)
    for k in range(n):
        r, c = divmod(k, m)
        mosaic[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] = volume[:, :, k].T
    return mosaic


def _common(ds: Dataset, geo: SeriesGeometry, volume_number: int, acquisition_time_s: float, sop_uid: str,
            sop_class: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        setattr(ds, tag, geo.date)
    ds.StudyTime = dicom_time(geo.study_time_s)
    ds.SeriesTime = dicom_time(geo.series_time_s)
    ds.AcquisitionTime = dicom_time(acquisition_time_s)
    # Content is written just after the volume's acquisition ends.
    ds.ContentTime = dicom_time(acquisition_time_s + geo.tr_s)
    ds.InstanceCreationTime = ds.ContentTime
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "rt-mindeye phantom"
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "rt-mindeye^phantom"
    ds.SeriesDescription = geo.series_description
    ds.ProtocolName = geo.series_description
    ds.PatientName = "Phantom^" + geo.patient_id
    ds.PatientID = geo.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "BRAIN"
    ds.MagneticFieldStrength = "3"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = geo.study_uid
    ds.SeriesInstanceUID = geo.series_uid
    ds.FrameOfReferenceUID = geo.frame_of_reference_uid
    ds.StudyID = "1"
    ds.SeriesNumber = geo.series_number
    ds.AcquisitionNumber = volume_number
    ds.InstanceNumber = volume_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if sop_class == MR_IMAGE_STORAGE:  # Enhanced MR carries the rescale in its functional groups instead
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = _ds1(geo.rescale_slope)
        ds.RescaleType = "US"


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    meta.ImplementationVersionName = f"RTMINDEYE_{__version__}"[:16]
    return meta


def mosaic_dataset(volume: np.ndarray, geo: SeriesGeometry, volume_number: int, acquisition_time_s: float,
                   sop_uid: str) -> Dataset:
    """A Siemens VE mosaic dataset for one float volume ``[i, j, k]``."""
    cols, rows, n_slices = volume.shape
    m = int(math.ceil(math.sqrt(n_slices)))
    dc, dr, dz = geo.voxel_sizes
    row_cos, col_cos, normal = geo.lps_axes()
    first = geo.first_slice_position()
    mosaic_ipp = first - col_cos * dr * (m * rows - rows) / 2 - row_cos * dc * (m * cols - cols) / 2

    ds = Dataset()
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid)
    _common(ds, geo, volume_number, acquisition_time_s, sop_uid, MR_IMAGE_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM", "MOSAIC"]
    ds.ManufacturerModelName = "Prisma_fit"
    ds.SoftwareVersions = "syngo MR E11"
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"*epfid2d1_{cols}"
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds1(dz)
    ds.RepetitionTime = _ds1(geo.tr_s * 1000)
    ds.EchoTime = _ds1(geo.echo_time_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.SpacingBetweenSlices = _ds1(dz)
    ds.NumberOfPhaseEncodingSteps = str(rows)
    ds.EchoTrainLength = str(rows)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "2290"
    ds.AcquisitionMatrix = [cols, 0, 0, rows]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = "52"
    ds.ImagePositionPatient = _ds(mosaic_ipp)
    ds.ImageOrientationPatient = _ds(np.concatenate([row_cos, col_cos]))
    ds.SliceLocation = _ds1(float(first @ normal))
    ds.Rows = m * rows
    ds.Columns = m * cols
    ds.PixelSpacing = _ds([dr, dc])
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    times_ms = np.asarray(geo.slice_times_s) * 1000.0
    image_tags = csa.image_header_tags(
        n_slices=n_slices, slice_normal=normal, slice_times_ms=times_ms, matrix_rows=rows, matrix_cols=cols,
        first_slice_position=first, time_after_start_s=acquisition_time_s - geo.series_time_s)
    block.add_new(0x08, "CS", "IMAGE NUM 4")
    block.add_new(0x09, "LO", geo.date)
    block.add_new(0x10, "OB", csa.encode(image_tags))
    block.add_new(0x18, "CS", "MR")
    block.add_new(0x19, "LO", geo.date)
    block.add_new(0x20, "OB", csa.encode(csa.series_header_tags(
        n_slices=n_slices, tr_us=int(round(geo.tr_s * 1e6)), te_us=int(round(geo.echo_time_ms * 1000)))))
    stored = quantise(volume, geo.rescale_slope)
    mosaic = to_mosaic(stored)
    ds.SmallestImagePixelValue = int(mosaic.min())
    ds.LargestImagePixelValue = int(mosaic.max())
    ds["SmallestImagePixelValue"].VR = "US"
    ds["LargestImagePixelValue"].VR = "US"
    center = float(stored.mean()) * geo.rescale_slope
    ds.WindowCenter = _ds1(center)
    ds.WindowWidth = _ds1(max(2 * center, 1.0))
    ds.PixelData = mosaic.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def xa_dataset(volume: np.ndarray, geo: SeriesGeometry, volume_number: int, acquisition_time_s: float,
               sop_uid: str) -> Dataset:
    """A Siemens XA Enhanced MR multi-frame dataset for one float volume ``[i, j, k]``: one frame per slice."""
    cols, rows, n_slices = volume.shape
    dc, dr, dz = geo.voxel_sizes
    row_cos, col_cos, normal = geo.lps_axes()
    first = geo.first_slice_position()
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    _common(ds, geo, volume_number, acquisition_time_s, sop_uid, ENHANCED_MR_IMAGE_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ManufacturerModelName = "MAGNETOM Vida"
    ds.SoftwareVersions = "syngo MR XA30"
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = ""
    ds.AcquisitionDateTime = geo.date + dicom_time(acquisition_time_s)
    ds.Rows = rows
    ds.Columns = cols
    ds.NumberOfFrames = n_slices

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds([dr, dc])
    measures.SliceThickness = _ds1(dz)
    measures.SpacingBetweenSlices = _ds1(dz)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds(np.concatenate([row_cos, col_cos]))
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    transform = Dataset()
    transform.RescaleIntercept = "0"
    transform.RescaleSlope = _ds1(geo.rescale_slope)
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    timing = Dataset()
    timing.RepetitionTime = geo.tr_s * 1000
    timing.FlipAngle = 52.0
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = geo.echo_time_ms
    shared.MREchoSequence = DicomSequence([echo])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    # Frames are indexed by (stack, position in stack), as the scanner's DimensionIndexValues say.
    dimensions = []
    for pointer in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        dim = Dataset()
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        dimensions.append(dim)
    ds.DimensionIndexSequence = DicomSequence(dimensions)

    frames = []
    for k in range(n_slices):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _ds(first + normal * dz * k)
        frame.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.FrameAcquisitionDateTime = geo.date + dicom_time(acquisition_time_s + geo.slice_times_s[k])
        content.FrameReferenceDateTime = content.FrameAcquisitionDateTime
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = volume_number
        content.DimensionIndexValues = [1, k + 1]
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    stored = quantise(volume, geo.rescale_slope)
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()  # frames, rows, columns
    ds["PixelData"].VR = "OW"
    return ds


def _update_volume(ds: Dataset, volume: np.ndarray, geo: SeriesGeometry, volume_number: int,
                   acquisition_time_s: float, sop_uid: str, xa: bool) -> None:
    """Change what differs between volumes of a series in a dataset built for another volume of it."""
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.AcquisitionNumber = volume_number
    ds.InstanceNumber = volume_number
    ds.AcquisitionTime = dicom_time(acquisition_time_s)
    ds.ContentTime = dicom_time(acquisition_time_s + geo.tr_s)
    ds.InstanceCreationTime = ds.ContentTime
    stored = quantise(volume, geo.rescale_slope)
    if xa:
        ds.AcquisitionDateTime = geo.date + dicom_time(acquisition_time_s)
        for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            content = frame.FrameContentSequence[0]
            content.FrameAcquisitionDateTime = geo.date + dicom_time(acquisition_time_s + geo.slice_times_s[k])
            content.FrameReferenceDateTime = content.FrameAcquisitionDateTime
            content.TemporalPositionIndex = volume_number
        ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()
        return
    cols, rows, n_slices = volume.shape
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER")
    block[0x10].value = csa.encode(csa.image_header_tags(
        n_slices=n_slices, slice_normal=geo.lps_axes()[2], slice_times_ms=np.asarray(geo.slice_times_s) * 1000.0,
        matrix_rows=rows, matrix_cols=cols, first_slice_position=geo.first_slice_position(),
        time_after_start_s=acquisition_time_s - geo.series_time_s))
    mosaic = to_mosaic(stored)
    ds.SmallestImagePixelValue = int(mosaic.min())
    ds.LargestImagePixelValue = int(mosaic.max())
    center = float(stored.mean()) * geo.rescale_slope
    ds.WindowCenter = _ds1(center)
    ds.WindowWidth = _ds1(max(2 * center, 1.0))
    ds.PixelData = mosaic.tobytes()


class SeriesWriter:
    """Writes the volumes of one series, reusing one dataset (only per-volume fields change), which keeps writing a
    realistic session to minutes rather than tens of minutes."""

    def __init__(self, geo: SeriesGeometry, xa: bool = False):
        self.geo = geo
        self.xa = xa
        self._template: Dataset | None = None

    def dataset(self, volume: np.ndarray, volume_number: int, acquisition_time_s: float, sop_uid: str) -> Dataset:
        volume = np.asarray(volume, np.float32)
        if volume.shape != tuple(self.geo.shape):
            raise ValueError(f"volume shape {volume.shape} differs from the series shape {tuple(self.geo.shape)}")
        if self._template is None:
            builder = xa_dataset if self.xa else mosaic_dataset
            self._template = builder(volume, self.geo, volume_number, acquisition_time_s, sop_uid)
        else:
            _update_volume(self._template, volume, self.geo, volume_number, acquisition_time_s, sop_uid, self.xa)
        return self._template

    def write(self, path: str | Path, volume: np.ndarray, volume_number: int, acquisition_time_s: float,
              sop_uid: str | None = None) -> Path:
        """Write one volume; it is written under a temporary name and renamed, so a watcher never sees it half
        written (the replay tools simulate partial writes on purpose)."""
        path = Path(path)
        ds = self.dataset(volume, volume_number, acquisition_time_s, sop_uid or generate_uid(prefix=UID_PREFIX))
        tmp = path.with_name("." + path.name + ".part")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        return path


def write_volume(path: str | Path, volume: np.ndarray, geo: SeriesGeometry, volume_number: int,
                 acquisition_time_s: float, sop_uid: str | None = None, xa: bool = False) -> Path:
    """Write a single volume (see :class:`SeriesWriter` for a whole series)."""
    return SeriesWriter(geo, xa).write(path, volume, volume_number, acquisition_time_s, sop_uid)


def series_uids(seed: int, subject: int, series: int) -> dict[str, str]:
    """Deterministic UIDs of a phantom session/series (same inputs -> same UIDs; distinct across inputs)."""
    def uid(*parts):
        return generate_uid(prefix=UID_PREFIX, entropy_srcs=["rt-mindeye-phantom", *map(str, parts)])

    return {"study": uid("study", seed, subject), "frame": uid("frame", seed, subject),
            "series": uid("series", seed, subject, series)}


def volume_uid(seed: int, subject: int, series: int, volume: int) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["rt-mindeye-phantom", "sop", str(seed), str(subject),
                                                         str(series), str(volume)])


def read_back_mosaic(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Independent reader for checks: (data ``[i, j, k]`` float32, RAS affine) via nibabel.nicom (which returns
    ``[row, column, slice]``; swapped here to the phantom's order)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel.nicom warns on import that it is experimental
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_file(str(path))
        data = wrapper.get_data().astype(np.float32)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ wrapper.affine
    return np.ascontiguousarray(data.transpose(1, 0, 2)), affine[:, [1, 0, 2, 3]]


__all__ = ["SeriesGeometry", "SeriesWriter", "write_volume", "mosaic_dataset", "xa_dataset", "to_mosaic", "quantise",
           "dicom_time",
           "series_uids", "volume_uid", "FILE_PATTERN", "read_back_mosaic"]
