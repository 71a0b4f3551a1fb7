"""A smooth synthetic head that can be sampled exactly under any rigid motion (for tests and benchmarks).

The head is an analytic function of position (an ellipsoid with a soft edge, darker ventricles and a few dozen
Gaussian blobs for texture), so a moved volume is produced by evaluating the function at the moved grid points rather
than by resampling another grid: the ground truth motion is exact and free of interpolation error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rt_mindeye.preprocess.geometry import RigidTransform, volume_center_ras
from rt_mindeye.volume import Volume


@dataclass(frozen=True)
class SyntheticHead:
    """Analytic head in its own (reference) RAS frame, centred on ``center``."""

    center: np.ndarray
    semi_axes: np.ndarray
    edge_mm: float
    blob_centers: np.ndarray
    blob_sigmas: np.ndarray
    blob_amplitudes: np.ndarray

    @classmethod
    def fitting(cls, shape, affine, fill: float = 0.8, seed: int = 0, n_blobs: int = 40) -> "SyntheticHead":
        """A head filling ``fill`` of the field of view of the grid ``(shape, affine)``."""
        rng = np.random.default_rng(seed)
        affine = np.asarray(affine, dtype=np.float64)
        voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        extent = np.abs(affine[:3, :3] @ (np.asarray(shape[:3]) - 1.0))  # world extent along RAS axes
        semi_axes = 0.5 * fill * extent
        center = volume_center_ras(shape, affine)
        # Texture on the scale of 1.5-4 voxels: fine enough to pin the position, smooth enough to sample exactly.
        direction = rng.normal(size=(n_blobs, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = rng.uniform(0.0, 0.8, size=(n_blobs, 1)) ** (1 / 3)
        blob_centers = center + direction * radius * semi_axes
        blob_sigmas = rng.uniform(1.5, 4.0, size=n_blobs) * voxel.mean()
        blob_amplitudes = rng.uniform(-0.35, 0.35, size=n_blobs)
        return cls(center, semi_axes, float(1.2 * voxel.mean()), blob_centers, blob_sigmas, blob_amplitudes)

    def intensity(self, points_ras: np.ndarray) -> np.ndarray:
        """Image intensity at ``(n, 3)`` RAS points of the head frame (about 1000 inside, 0 outside)."""
        points = np.asarray(points_ras, dtype=np.float64)
        rel = (points - self.center) / self.semi_axes
        radius = np.sqrt((rel ** 2).sum(axis=1))
        mean_axis = float(self.semi_axes.mean())
        inside = 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) * mean_axis / self.edge_mm, -50, 50)))
        # Ventricles: a darker, smaller ellipsoid a little above the centre.
        rel_v = (points - self.center - np.array([0.0, 0.0, 0.1]) * self.semi_axes) / (self.semi_axes * [0.18, 0.35,
                                                                                                          0.2])
        radius_v = np.sqrt((rel_v ** 2).sum(axis=1))
        ventricles = 1.0 / (1.0 + np.exp(np.clip((radius_v - 1.0) * mean_axis * 0.25 / self.edge_mm, -50, 50)))
        texture = np.zeros(len(points))
        for c, s, a in zip(self.blob_centers, self.blob_sigmas, self.blob_amplitudes):
            d2 = ((points - c) ** 2).sum(axis=1)
            texture += a * np.exp(-0.5 * d2 / (s * s))
        # A slow anterior-posterior gradient, as receive-coil shading gives in EPI.
        shading = 1.0 + 0.15 * rel[:, 1]
        return (1000.0 * inside * shading * (1.0 - 0.5 * ventricles + texture)).astype(np.float64)

    def sample(self, shape, affine, motion: RigidTransform | None = None) -> np.ndarray:
        """float32 volume on the grid ``(shape, affine)`` after the head moved by ``motion`` (reference -> now)."""
        affine = np.asarray(affine, dtype=np.float64)
        idx = np.indices(shape[:3], dtype=np.float64).reshape(3, -1)
        world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
        if motion is not None:
            world = motion.inverse().apply(world)
        return self.intensity(world).reshape(shape[:3]).astype(np.float32)


def make_affine(shape, voxel_mm, rotation_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A voxel->RAS+ affine centred on the scanner origin, optionally oblique (rotation in degrees about x, y, z)."""
    from rt_mindeye.preprocess.geometry import rotation_from_degrees

    voxel = np.broadcast_to(np.asarray(voxel_mm, dtype=np.float64), (3,))
    affine = np.eye(4)
    affine[:3, :3] = rotation_from_degrees(*rotation_deg) @ np.diag(voxel)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0)
    return affine


def make_volume(data: np.ndarray, affine: np.ndarray, index: int = 0, series: int = 1, tr: float = 1.5) -> Volume:
    """Wrap an array as a :class:`Volume` with plausible metadata."""
    return Volume(data=np.asarray(data, dtype=np.float32), affine=np.asarray(affine, dtype=np.float64), series=series,
                  volume=index, tr=tr, acquisition_time=index * tr, slice_times=None,
                  sop_instance_uid=f"synthetic.{series}.{index}")


def random_motions(n: int, max_translation_mm: float = 2.0, max_rotation_deg: float = 2.0, seed: int = 0,
                   step_fraction: float = 0.25) -> np.ndarray:
    """``(n, 6)`` motion parameters as a bounded random walk (first row zero), like a drifting, twitching head."""
    rng = np.random.default_rng(seed)
    limits = np.array([max_translation_mm] * 3 + [max_rotation_deg] * 3)
    params = np.zeros((n, 6))
    for t in range(1, n):
        step = rng.normal(scale=step_fraction * limits / 2.0)
        params[t] = np.clip(params[t - 1] + step, -limits, limits)
    return params
