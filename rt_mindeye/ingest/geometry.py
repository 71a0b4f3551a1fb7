"""DICOM patient geometry -> the NIfTI-style voxel-to-RAS+ affine of :class:`~rt_mindeye.volume.Volume`.

DICOM positions are in the patient's LPS+ frame (x to the patient's left, y to posterior, z to head). A slice is
described by ImagePositionPatient (centre of the first transmitted pixel), ImageOrientationPatient (two unit vectors:
the direction in which the *column* index grows, i.e. along a row, then the direction in which the *row* index
grows) and PixelSpacing (``[row spacing, column spacing]``, i.e. ``[dy, dx]``: mind the order).

rt-mindeye indexes data ``[i, j, k]`` with ``i`` = DICOM column, ``j`` = DICOM row, ``k`` = slice, as NIfTI
converters do, so voxel ``(i, j, k)`` sits at::

    IPP_first_slice + i * dx * row_cosine + j * dy * column_cosine + k * dz * slice_normal      (LPS)

and the RAS+ affine is that matrix with its first two rows negated.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine(
    position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: np.ndarray,
    slice_normal: np.ndarray,
    slice_spacing: float,
) -> np.ndarray:
    """4x4 voxel ``(i=column, j=row, k=slice)`` -> LPS mm affine."""
    row_cosine = np.asarray(orientation[:3], dtype=np.float64)
    column_cosine = np.asarray(orientation[3:6], dtype=np.float64)
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * dx
    affine[:3, 1] = column_cosine * dy
    affine[:3, 2] = np.asarray(slice_normal, dtype=np.float64) * float(slice_spacing)
    affine[:3, 3] = np.asarray(position, dtype=np.float64)
    return affine


def ras_affine(
    position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: np.ndarray,
    slice_normal: np.ndarray,
    slice_spacing: float,
) -> np.ndarray:
    """4x4 voxel ``(i=column, j=row, k=slice)`` -> RAS+ mm affine (the convention of ``Volume.affine``)."""
    return LPS_TO_RAS @ lps_affine(position, orientation, pixel_spacing, slice_normal, slice_spacing)


def slice_normal_from_orientation(orientation: np.ndarray) -> np.ndarray:
    """Unit normal ``row_cosine x column_cosine`` (the direction DICOM slice stacks usually grow in)."""
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:6], dtype=np.float64))
    return normal / np.linalg.norm(normal)


def orientation_is_valid(orientation: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Both cosines unit length and orthogonal (within ``tolerance``)."""
    row_cosine, column_cosine = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    return (
        abs(np.linalg.norm(row_cosine) - 1.0) < tolerance
        and abs(np.linalg.norm(column_cosine) - 1.0) < tolerance
        and abs(float(np.dot(row_cosine, column_cosine))) < tolerance
    )


def mosaic_first_slice_position(
    mosaic_position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: np.ndarray,
    mosaic_shape: tuple[int, int],
    tile_shape: tuple[int, int],
) -> np.ndarray:
    """Position (LPS) of the first slice's first voxel, from the ImagePositionPatient of a whole mosaic.

    Siemens writes the mosaic's ImagePositionPatient as if the big mosaic image were one slice centred where the
    real slices are centred, so its corner lies half the extra width/height away from a tile's corner:
    ``(mosaic_columns - tile_columns) / 2`` pixels along the row cosine and ``(mosaic_rows - tile_rows) / 2``
    pixels along the column cosine.
    """
    row_cosine = np.asarray(orientation[:3], dtype=np.float64)
    column_cosine = np.asarray(orientation[3:6], dtype=np.float64)
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    mosaic_rows, mosaic_columns = mosaic_shape
    tile_rows, tile_columns = tile_shape
    return (
        np.asarray(mosaic_position, dtype=np.float64)
        + row_cosine * dx * (mosaic_columns - tile_columns) / 2.0
        + column_cosine * dy * (mosaic_rows - tile_rows) / 2.0
    )
