"""Conventions: Volume (RAS+) <-> SimpleITK image (LPS), rigid transforms and the six motion parameters.

``Volume.affine`` maps voxel indices ``(i, j, k)`` to RAS+ millimetres (NIfTI). ITK images live in LPS physical
space, described by ``origin`` (the LPS position of voxel 0), ``spacing`` and a ``direction`` matrix whose column
``a`` is the unit LPS vector of index axis ``a``: ``p_lps = origin + direction @ diag(spacing) @ index``. The two
differ by a flip of the first two world axes, ``F = diag(-1, -1, 1)``, so ``A_lps = F A_ras``. SimpleITK's numpy view
is indexed ``[k, j, i]``, hence the transposes.

Motion is a :class:`RigidTransform` ``T`` in RAS mm mapping a point of the reference head to where that point is in
the current volume, ``x_now = R (x_ref - c) + c + t``, with ``c`` the centre of the reference volume. This is the
same direction as ITK's registration result (fixed = reference, moving = current volume). Its six parameters are
``(tx, ty, tz)`` in mm along RAS x (left->right), y (posterior->anterior), z (inferior->superior), and
``(rx, ry, rz)`` in degrees about those axes, right-handed, composed as ``R = Rz(rz) @ Ry(ry) @ Rx(rx)`` (rotate about
x first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from rt_mindeye.errors import RtMindEyeError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
"""The same matrix turns LPS into RAS (it is its own inverse)."""

_ORTHOGONALITY_TOLERANCE = 1e-3


class UnsupportedGeometryError(RtMindEyeError):
    """An affine cannot be expressed as an ITK image geometry (it shears or is singular)."""

    def __init__(self, what: str, problem: str):
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}")


def affine_to_itk_geometry(affine: np.ndarray, what: str = "affine") -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in LPS, as SimpleITK wants them, for a voxel->RAS+ ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise UnsupportedGeometryError(what, f"expected a finite 4x4 affine, got shape {affine.shape}")
    linear_lps = LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.sqrt((linear_lps ** 2).sum(axis=0))
    if np.any(spacing <= 0):
        raise UnsupportedGeometryError(what, f"zero voxel size {spacing.tolist()}")
    direction = linear_lps / spacing
    gram = direction.T @ direction
    if np.abs(gram - np.eye(3)).max() > _ORTHOGONALITY_TOLERANCE:
        raise UnsupportedGeometryError(what, "voxel axes are not orthogonal (sheared affine)")
    # Snap to the nearest orthonormal matrix: ITK checks orthogonality strictly and float32 headers are noisy.
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    origin = LPS_FROM_RAS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def itk_geometry_to_affine(image: sitk.Image) -> np.ndarray:
    """The voxel->RAS+ affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return affine


def array_to_sitk(data: np.ndarray, affine: np.ndarray, what: str = "volume") -> sitk.Image:
    """A float32 SimpleITK image whose voxel ``(i, j, k)`` is ``data[i, j, k]``, placed by the RAS+ ``affine``."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise UnsupportedGeometryError(what, f"expected a 3-D array, got shape {data.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    origin, spacing, direction = affine_to_itk_geometry(affine, what)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def volume_to_sitk(volume) -> sitk.Image:
    """SimpleITK image (float32, LPS) of a :class:`~rt_mindeye.volume.Volume`."""
    return array_to_sitk(volume.data, volume.affine, str(volume.source or f"volume {volume.volume}"))


def sitk_to_array(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(data indexed ``[i, j, k]``, voxel->RAS+ affine) of a SimpleITK image; the inverse of :func:`array_to_sitk`.

    The array is a Fortran-ordered view (no copy), like the ingest readers' arrays.
    """
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return data, itk_geometry_to_affine(image)


def volume_center_ras(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """RAS+ position of the centre of the voxel grid (the rotation centre of the motion parameters)."""
    center_index = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return affine[:3, :3] @ center_index + affine[:3, 3]


# --- rigid transforms and parameters ----------------------------------------------------------------------------


def rotation_from_degrees(rx: float, ry: float, rz: float) -> np.ndarray:
    """``R = Rz(rz) @ Ry(ry) @ Rx(rx)``, angles in degrees, right-handed about the RAS axes."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def degrees_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_from_degrees` (valid for |ry| < 90 degrees)."""
    r = np.asarray(rotation, dtype=np.float64)
    ry = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    rx = np.arctan2(r[2, 1], r[2, 2])
    rz = np.arctan2(r[1, 0], r[0, 0])
    return np.rad2deg([rx, ry, rz])


@dataclass(frozen=True)
class RigidTransform:
    """A rigid map in RAS+ mm: ``x_now = rotation @ (x_ref - center) + center + translation``.

    It maps a point of the reference (fixed) head to the same anatomical point in the moving volume, the direction of
    ITK's registration output; resampling the moving volume through it puts it into the reference space.
    """

    rotation: np.ndarray
    translation: np.ndarray
    center: np.ndarray

    @classmethod
    def identity(cls, center=(0.0, 0.0, 0.0)) -> "RigidTransform":
        return cls(np.eye(3), np.zeros(3), np.asarray(center, dtype=np.float64))

    @classmethod
    def from_params(cls, params, center) -> "RigidTransform":
        """From ``(tx, ty, tz [mm], rx, ry, rz [deg])`` about ``center`` (RAS mm)."""
        params = np.asarray(params, dtype=np.float64)
        return cls(rotation_from_degrees(*params[3:6]), params[:3].copy(), np.asarray(center, dtype=np.float64))

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, center) -> "RigidTransform":
        """From a 4x4 RAS matrix ``x_now = M x_ref``, re-expressed about ``center``."""
        matrix = np.asarray(matrix, dtype=np.float64)
        center = np.asarray(center, dtype=np.float64)
        rotation = matrix[:3, :3]
        translation = matrix[:3, :3] @ center + matrix[:3, 3] - center
        return cls(rotation.copy(), translation, center)

    @property
    def params(self) -> np.ndarray:
        """``(tx, ty, tz)`` mm and ``(rx, ry, rz)`` degrees (see the module docstring)."""
        return np.concatenate([self.translation, degrees_from_rotation(self.rotation)])

    @property
    def matrix(self) -> np.ndarray:
        """4x4 RAS matrix: ``x_now = M @ [x_ref, 1]``."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.center + self.translation - self.rotation @ self.center
        return out

    def apply(self, points_ras: np.ndarray) -> np.ndarray:
        """Map ``(n, 3)`` RAS points of the reference head to where they are now."""
        points = np.asarray(points_ras, dtype=np.float64)
        return (points - self.center) @ self.rotation.T + self.center + self.translation

    def inverse(self) -> "RigidTransform":
        return RigidTransform.from_matrix(np.linalg.inv(self.matrix), self.center)

    def compose(self, first: "RigidTransform") -> "RigidTransform":
        """``self`` after ``first`` (apply ``first``, then ``self``), about ``first``'s centre."""
        return RigidTransform.from_matrix(self.matrix @ first.matrix, first.center)

    # --- ITK ----------------------------------------------------------------------------------------------------

    def to_sitk(self) -> sitk.VersorRigid3DTransform:
        """The same map as an ITK transform in LPS (fixed -> moving)."""
        transform = sitk.VersorRigid3DTransform()
        transform.SetCenter(tuple((LPS_FROM_RAS @ self.center).tolist()))
        rotation_lps = LPS_FROM_RAS @ self.rotation @ LPS_FROM_RAS
        transform.SetMatrix(tuple(_orthonormalize(rotation_lps).ravel().tolist()))
        transform.SetTranslation(tuple((LPS_FROM_RAS @ self.translation).tolist()))
        return transform

    @classmethod
    def from_sitk(cls, transform: sitk.Transform, center=None) -> "RigidTransform":
        """From an ITK rigid (versor, Euler or similar) transform, re-expressed about ``center`` (RAS) if given."""
        matrix_lps = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
        itk_center = np.asarray(transform.GetCenter(), dtype=np.float64)
        offset_lps = np.asarray(transform.GetTranslation(), dtype=np.float64) + itk_center - matrix_lps @ itk_center
        matrix = np.eye(4)
        matrix[:3, :3] = LPS_FROM_RAS @ matrix_lps @ LPS_FROM_RAS
        matrix[:3, 3] = LPS_FROM_RAS @ offset_lps
        if center is None:
            center = LPS_FROM_RAS @ itk_center
        return cls.from_matrix(matrix, center)


def _orthonormalize(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def framewise_displacement(params_prev, params, radius_mm: float = 50.0) -> float:
    """Power et al. framewise displacement: ``sum |d translation| + radius * sum |d rotation (rad)|``.

    ``params`` are ``(tx, ty, tz [mm], rx, ry, rz [deg])`` as :attr:`RigidTransform.params` gives them.
    """
    params_prev = np.asarray(params_prev, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    if params_prev.shape != (6,) or params.shape != (6,):
        raise ValueError(f"expected two 6-parameter vectors, got shapes {params_prev.shape} and {params.shape}")
    delta = np.abs(params - params_prev)
    return float(delta[:3].sum() + radius_mm * np.deg2rad(delta[3:]).sum())
