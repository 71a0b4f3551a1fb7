"""The alternative motion engine: inverse-compositional Gauss-Newton rigid registration and trilinear reslice in numba.

Same objective as the tuned SimpleITK setting (mean squared difference between the reference at a fixed random
sample of in-head voxels and the moving volume, trilinearly interpolated, at the transformed points), solved by
Gauss-Newton in the inverse-compositional form (Baker & Matthews 2004): the Jacobian of the reference at the sample
points is computed once in :meth:`GaussNewtonRegistration.prepare`, so an iteration is one pass over the samples
(interpolate, accumulate ``J^T e`` and ``J^T J`` over the points that land inside the moving grid) and a 6x6 solve,
and the update is composed as ``T <- T o W(dp)^-1``.

The kernels are pure, serial functions (``nogil``, so a caller may run them beside other threads): the whole
correction is a few milliseconds, threads would not pay for their start-up (with another process busy on a 2-core
machine one thread beat two in the brief's SimpleITK measurements), and parallel kernels take much longer to compile.
"""

from __future__ import annotations

import numba
import numpy as np

from rt_mindeye.preprocess.geometry import _orthonormalize


#: How far (voxels) beyond the outermost voxel centres a resliced point still takes the edge voxel's value: half a
#: voxel, the edge voxel's own extent. An edge slice images a slab as thick as the slice, so a point up to half a
#: slice past its centre lies inside the acquired volume; with a strict bound the whole edge slice of the mask read
#: 0 (and went missing) whenever the head moved a fraction of a millimetre toward it.
EDGE_REACH = 0.5
#: The registration's bound: a 1e-3 voxel rounding slack only (extrapolated values would bias the metric).
METRIC_REACH = 1e-3


@numba.njit(cache=True, nogil=True)
def _trilinear(volume, x, y, z, reach=METRIC_REACH):
    """Trilinear value at voxel coordinates (x, y, z); NaN more than ``reach`` voxels outside the grid (points
    within it take the value at the nearest point of the grid)."""
    nx, ny, nz = volume.shape
    if x < -reach or y < -reach or z < -reach or x > nx - 1 + reach or y > ny - 1 + reach or z > nz - 1 + reach:
        return np.nan
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    i = min(int(x), nx - 2)
    j = min(int(y), ny - 2)
    k = min(int(z), nz - 2)
    fx, fy, fz = x - i, y - j, z - k
    c00 = volume[i, j, k] * (1 - fx) + volume[i + 1, j, k] * fx
    c10 = volume[i, j + 1, k] * (1 - fx) + volume[i + 1, j + 1, k] * fx
    c01 = volume[i, j, k + 1] * (1 - fx) + volume[i + 1, j, k + 1] * fx
    c11 = volume[i, j + 1, k + 1] * (1 - fx) + volume[i + 1, j + 1, k + 1] * fx
    c0 = c00 * (1 - fy) + c10 * fy
    c1 = c01 * (1 - fy) + c11 * fy
    return c0 * (1 - fz) + c1 * fz


@numba.njit(cache=True, nogil=True)
def _sample_trilinear(volume, positions):
    """Trilinear values of ``volume`` at ``(n, 3)`` voxel positions (NaN outside)."""
    out = np.empty(positions.shape[0])
    for n in range(positions.shape[0]):
        out[n] = _trilinear(volume, positions[n, 0], positions[n, 1], positions[n, 2])
    return out


@numba.njit(cache=True, nogil=True)
def _accumulate(moving, voxel_map, points, fixed_values, jacobian):
    """One Gauss-Newton pass: (J^T e, J^T J over valid points, sum of squared errors, number of valid points).

    ``voxel_map`` (3x4) maps reference-world points to moving voxel coordinates; ``e = moving(T x) - fixed(x)``.
    """
    b = np.zeros(6)
    hessian = np.zeros((6, 6))
    sse = 0.0
    n_valid = 0
    for n in range(points.shape[0]):
        px, py, pz = points[n, 0], points[n, 1], points[n, 2]
        x = voxel_map[0, 0] * px + voxel_map[0, 1] * py + voxel_map[0, 2] * pz + voxel_map[0, 3]
        y = voxel_map[1, 0] * px + voxel_map[1, 1] * py + voxel_map[1, 2] * pz + voxel_map[1, 3]
        z = voxel_map[2, 0] * px + voxel_map[2, 1] * py + voxel_map[2, 2] * pz + voxel_map[2, 3]
        value = _trilinear(moving, x, y, z)
        if np.isnan(value):
            continue
        error = value - fixed_values[n]
        sse += error * error
        n_valid += 1
        for a in range(6):
            b[a] += jacobian[n, a] * error
            for c in range(a, 6):
                hessian[a, c] += jacobian[n, a] * jacobian[n, c]
    for a in range(6):
        for c in range(a):
            hessian[a, c] = hessian[c, a]
    return b, hessian, sse, n_valid


@numba.njit(cache=True, nogil=True)
def reslice_trilinear(moving, voxel_map, shape, fill):
    """Output grid ``shape``: voxel (i, j, k) takes ``moving`` at ``voxel_map @ (i, j, k, 1)`` (trilinear); points
    more than :data:`EDGE_REACH` voxels outside ``moving`` take ``fill``."""
    out = np.empty((shape[0], shape[1], shape[2]), dtype=np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            bx = voxel_map[0, 0] * i + voxel_map[0, 1] * j + voxel_map[0, 3]
            by = voxel_map[1, 0] * i + voxel_map[1, 1] * j + voxel_map[1, 3]
            bz = voxel_map[2, 0] * i + voxel_map[2, 1] * j + voxel_map[2, 3]
            for k in range(shape[2]):
                value = _trilinear(moving, bx + voxel_map[0, 2] * k, by + voxel_map[1, 2] * k,
                                   bz + voxel_map[2, 2] * k, EDGE_REACH)
                out[i, j, k] = fill if np.isnan(value) else value
    return out


@numba.njit(cache=True, nogil=True)
def reslice_points_trilinear(moving, voxel_map, indices, fill):
    """Like :func:`reslice_trilinear` but only at the ``(V, 3)`` output voxel ``indices``: a ``(V,)`` float32."""
    out = np.empty(indices.shape[0], dtype=np.float32)
    for n in range(indices.shape[0]):
        i, j, k = indices[n, 0], indices[n, 1], indices[n, 2]
        value = _trilinear(moving,
                           voxel_map[0, 0] * i + voxel_map[0, 1] * j + voxel_map[0, 2] * k + voxel_map[0, 3],
                           voxel_map[1, 0] * i + voxel_map[1, 1] * j + voxel_map[1, 2] * k + voxel_map[1, 3],
                           voxel_map[2, 0] * i + voxel_map[2, 1] * j + voxel_map[2, 2] * k + voxel_map[2, 3],
                           EDGE_REACH)
        out[n] = fill if np.isnan(value) else value
    return out


@numba.njit(cache=True, nogil=True)
def reslice_nearest(moving, voxel_map, shape, fill):
    """Nearest-neighbour version of :func:`reslice_trilinear`."""
    out = np.empty((shape[0], shape[1], shape[2]), dtype=np.float32)
    nx, ny, nz = moving.shape
    for i in range(shape[0]):
        for j in range(shape[1]):
            for k in range(shape[2]):
                x = int(np.floor(voxel_map[0, 0] * i + voxel_map[0, 1] * j + voxel_map[0, 2] * k + voxel_map[0, 3]
                                 + 0.5))
                y = int(np.floor(voxel_map[1, 0] * i + voxel_map[1, 1] * j + voxel_map[1, 2] * k + voxel_map[1, 3]
                                 + 0.5))
                z = int(np.floor(voxel_map[2, 0] * i + voxel_map[2, 1] * j + voxel_map[2, 2] * k + voxel_map[2, 3]
                                 + 0.5))
                if 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
                    out[i, j, k] = moving[x, y, z]
                else:
                    out[i, j, k] = fill
    return out


def as_kernel_array(data: np.ndarray) -> np.ndarray:
    """float32 array for the kernels without copying C- or Fortran-ordered input (the readers give Fortran order)."""
    data = np.asarray(data, dtype=np.float32)
    if data.flags.c_contiguous or data.flags.f_contiguous:
        return data
    return np.ascontiguousarray(data)


def _rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by ``|omega|`` radians about ``omega``."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-15:
        return np.eye(3)
    axis = omega / angle
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


class GaussNewtonRegistration:
    """Reference-side state of the inverse-compositional solver; :meth:`register` runs per volume."""

    def __init__(self, n_points: int, n_iterations: int, seed: int, tolerance_mm: float = 1e-4):
        self.n_points = n_points
        self.n_iterations = n_iterations
        self.seed = seed
        self.tolerance_mm = tolerance_mm

    def prepare(self, reference: np.ndarray, affine: np.ndarray, mask: np.ndarray, center: np.ndarray,
                radius_mm: float) -> "GaussNewtonRegistration":
        reference = np.asarray(reference, dtype=np.float64)
        affine = np.asarray(affine, dtype=np.float64)
        # Keep the samples (and their central-difference gradients) away from the grid border.
        inner = np.zeros_like(mask, dtype=bool)
        inner[1:-1, 1:-1, 1:-1] = mask[1:-1, 1:-1, 1:-1]
        candidates = np.argwhere(inner)
        rng = np.random.default_rng(self.seed)
        if len(candidates) > self.n_points:
            candidates = candidates[np.sort(rng.choice(len(candidates), self.n_points, replace=False))]
        # Jitter the samples inside their voxels (as ITK's random sampling does): at exact voxel centres the
        # trilinear smoothing of the moving image depends on the sub-voxel shift, which biases the estimate.
        positions = candidates + rng.uniform(-0.5, 0.5, size=candidates.shape)
        gradients_voxel = np.gradient(reference)
        fixed_values = _sample_trilinear(reference.astype(np.float32), positions)
        gradient_voxel = np.stack([_sample_trilinear(g.astype(np.float32), positions) for g in gradients_voxel],
                                  axis=1)
        # f(world) = f_voxel(A^-1 (world - t)), so the world gradient is A^-T times the voxel gradient.
        gradient_world = gradient_voxel @ np.linalg.inv(affine[:3, :3])
        points = positions @ affine[:3, :3].T + affine[:3, 3]
        relative = points - center
        # d/d(omega) of f(x + omega x (x - c)) = (x - c) x grad f; d/dt = grad f.
        jacobian = np.concatenate([np.cross(relative, gradient_world), gradient_world], axis=1)
        self.points_ = np.ascontiguousarray(points)
        self.fixed_values_ = np.ascontiguousarray(fixed_values)
        self.jacobian_ = np.ascontiguousarray(jacobian)
        self.center_ = np.asarray(center, dtype=np.float64)
        self.radius_mm_ = float(radius_mm)
        return self

    def register(self, moving: np.ndarray, moving_affine: np.ndarray, initial: np.ndarray
                 ) -> tuple[np.ndarray, int, float]:
        """(4x4 RAS matrix reference->moving, iterations, mean squared error) starting from ``initial``."""
        moving = as_kernel_array(moving)
        moving_from_world = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64))
        matrix = np.array(initial, dtype=np.float64)
        center = self.center_
        mse = np.nan
        iteration = 0
        for iteration in range(1, self.n_iterations + 1):
            voxel_map = np.ascontiguousarray((moving_from_world @ matrix)[:3])
            b, hessian, sse, n_valid = _accumulate(moving, voxel_map, self.points_, self.fixed_values_,
                                                   self.jacobian_)
            if n_valid < 6:
                raise ValueError(f"only {n_valid} sample points fall inside the moving volume")
            mse = sse / n_valid
            try:
                step = np.linalg.solve(hessian, b)
            except np.linalg.LinAlgError as exc:
                raise ValueError("singular Gauss-Newton system (no image structure at the sample points)") from exc
            warp = np.eye(4)
            warp[:3, :3] = _rotation_from_vector(step[:3])
            warp[:3, 3] = center + step[3:] - warp[:3, :3] @ center
            matrix = matrix @ np.linalg.inv(warp)
            matrix[:3, :3] = _orthonormalize(matrix[:3, :3])
            moved_mm = float(np.abs(step[3:]).max() + np.abs(step[:3]).max() * self.radius_mm_)
            if moved_mm < self.tolerance_mm:
                break
        return matrix, iteration, float(mse)
