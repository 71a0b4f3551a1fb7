"""Siemens mosaic (VB/VD/VE EPI): one 2-D DICOM image that holds every slice of a volume as tiles.

The CSA image header gives the number of slices (``NumberOfImagesInMosaic``), the slice normal
(``SliceNormalVector``) and the slice acquisition times (``MosaicRefAcqTimes``, ms). Tiles are laid out row by row
on a square grid of ``ceil(sqrt(n))`` tiles per side; slice ``k`` sits at tile row ``k // grid``, tile column
``k % grid``; unused tiles at the end are blank. ImagePositionPatient describes the whole mosaic and is moved to
the first slice (:func:`~rt_mindeye.ingest.geometry.mosaic_first_slice_position`).

When the CSA header is missing (some anonymisers strip it), the same facts are read from the ``SIEMENS MR HEADER``
private block ((0019,xx0A) slices, (0019,xx29) slice times) and the normal is the cross product of the cosines.
"""

from __future__ import annotations

import math

import numpy as np

from rt_mindeye.errors import DicomReadError, UnsupportedDicomError
from rt_mindeye.ingest import csa as csa_module
from rt_mindeye.ingest import geometry
from rt_mindeye.ingest.dicomfile import DicomFile, read_pixels
from rt_mindeye.ingest.headers import header_fields, number, numbers, rescale_in_place, volume_identity
from rt_mindeye.volume import Volume

SIEMENS_MR_CREATOR = "SIEMENS MR HEADER"
_MR_N_MOSAIC = 0x0A
_MR_SLICE_TIMES = 0x29


def mosaic_slice_count(dataset, csa_header) -> int | None:
    """Slices in the mosaic, from the CSA header or the SIEMENS MR private block; None if this is no mosaic."""
    n = csa_header.scalar("NumberOfImagesInMosaic") if csa_header is not None else None
    if n is None:
        element = csa_module.private_element(dataset, 0x0019, SIEMENS_MR_CREATOR, _MR_N_MOSAIC)
        if element is not None and element.value not in (None, b"", ""):
            n = _private_number(element.value, "<H")
    if n is None:
        return None
    return int(n)


def is_mosaic(dataset, csa_header) -> bool:
    """A mosaic declares its slice count, or says MOSAIC in ImageType."""
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    return "MOSAIC" in image_type or (mosaic_slice_count(dataset, csa_header) or 0) > 1


def _private_number(value, fmt: str) -> float | None:
    """A private value as pydicom found it: already a number, a numeric string, or raw little-endian bytes."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, bytes):
        size = np.dtype(fmt).itemsize
        if len(value) < size:
            return None
        return np.frombuffer(value[:size], dtype=fmt)[0].item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mosaic_slice_times(dataset, csa_header, n_slices: int) -> np.ndarray | None:
    """Slice times in s relative to the earliest slice, or None when the file does not say."""
    times_ms = None
    if csa_header is not None:
        tag = csa_header.get("MosaicRefAcqTimes")
        if tag is not None and len(tag.values) >= n_slices:
            times_ms = np.array(tag.values[:n_slices], dtype=np.float64)
    if times_ms is None:
        element = csa_module.private_element(dataset, 0x0019, SIEMENS_MR_CREATOR, _MR_SLICE_TIMES)
        value = element.value if element is not None else None
        if isinstance(value, bytes) and len(value) >= 8 * n_slices:
            times_ms = np.frombuffer(value[: 8 * n_slices], dtype="<f8").astype(np.float64)
        elif value is not None and not isinstance(value, bytes):
            values = list(value) if hasattr(value, "__len__") else [value]
            if len(values) >= n_slices:
                times_ms = np.array([float(v) for v in values[:n_slices]], dtype=np.float64)
    if times_ms is None or not np.all(np.isfinite(times_ms)):
        return None
    return (times_ms - times_ms.min()) / 1000.0


def unpack_tiles(mosaic: np.ndarray, n_slices: int, tile_shape: tuple[int, int]) -> np.ndarray:
    """float32 ``[i=column, j=row, k=slice]`` from a ``(rows, columns)`` mosaic, in one converting copy.

    The result is Fortran-ordered (``i`` fastest, like nibabel's arrays): each slice is one contiguous block, and
    ``data.T`` is a zero-copy C-ordered ``[k, j, i]`` array (the layout SimpleITK and PyTorch expect).
    """
    tile_rows, tile_columns = tile_shape
    grid_rows = mosaic.shape[0] // tile_rows
    grid_columns = mosaic.shape[1] // tile_columns
    # [tile row, row in tile, tile column, column in tile] -> [tile row, tile column, row, column]
    tiles = mosaic.reshape(grid_rows, tile_rows, grid_columns, tile_columns).transpose(0, 2, 1, 3)
    stacked = np.empty((grid_rows, grid_columns, tile_rows, tile_columns), dtype=np.float32)
    stacked[...] = tiles
    return stacked.reshape(grid_rows * grid_columns, tile_rows, tile_columns)[:n_slices].T


def read_mosaic(dicom: DicomFile, csa_header) -> Volume:
    """The :class:`~rt_mindeye.volume.Volume` of a complete Siemens mosaic file."""
    ds, path = dicom.dataset, dicom.path
    n_slices = mosaic_slice_count(ds, csa_header)
    if n_slices is None or n_slices < 1:
        raise DicomReadError(path, "mosaic without a slice count (no CSA header?)", "NumberOfImagesInMosaic")
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise DicomReadError(path, f"a mosaic must have one frame, found {frames}", "NumberOfFrames")
    first_protocol_slice = csa_header.scalar("ProtocolSliceNumber") if csa_header is not None else None
    if first_protocol_slice is not None and first_protocol_slice > 1:
        # The tiles are stored in reversed slice order; dcm2niix flips them but calls the result untested
        # (rordenlab/dcm2niix issue 40). A wrong slice direction is worse than no volume: refuse.
        raise UnsupportedDicomError(
            path, f"mosaic with reversed slice order (CSA ProtocolSliceNumber {first_protocol_slice})",
            "ProtocolSliceNumber",
        )
    grid = math.ceil(math.sqrt(n_slices))
    if rows % grid or columns % grid:
        raise DicomReadError(
            path, f"{rows}x{columns} mosaic does not split into a {grid}x{grid} grid of tiles", "NumberOfImagesInMosaic"
        )
    tile_shape = (rows // grid, columns // grid)

    orientation = numbers(ds, "ImageOrientationPatient", 6, path)
    if not geometry.orientation_is_valid(orientation):
        raise DicomReadError(path, f"direction cosines are not orthonormal: {orientation}", "ImageOrientationPatient")
    pixel_spacing = numbers(ds, "PixelSpacing", 2, path)
    mosaic_position = numbers(ds, "ImagePositionPatient", 3, path)
    normal = csa_header.vector("SliceNormalVector", 3) if csa_header is not None else None
    if normal is None or not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        normal = geometry.slice_normal_from_orientation(orientation)
    normal = normal / np.linalg.norm(normal)
    slice_spacing = number(ds, "SpacingBetweenSlices", path) or number(ds, "SliceThickness", path)
    if not slice_spacing or slice_spacing <= 0:
        raise DicomReadError(path, "no positive SpacingBetweenSlices or SliceThickness", "SliceThickness")
    first_position = geometry.mosaic_first_slice_position(
        mosaic_position, orientation, pixel_spacing, (rows, columns), tile_shape
    )
    affine = geometry.ras_affine(first_position, orientation, pixel_spacing, normal, slice_spacing)

    data = unpack_tiles(read_pixels(dicom)[0], n_slices, tile_shape)
    rescale_in_place(data, ds, path)

    identity = volume_identity(ds, path)
    return Volume(
        data=data,
        affine=affine,
        series=identity.series,
        volume=identity.volume,
        tr=identity.tr,
        acquisition_time=identity.acquisition_time,
        slice_times=mosaic_slice_times(ds, csa_header, n_slices),
        sop_instance_uid=identity.sop_instance_uid,
        source=path,
        header=header_fields(ds, {"layout": "mosaic", "mosaic_grid": grid}),
    )


