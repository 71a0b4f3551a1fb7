"""Voxels a volume did not acquire.

After motion correction a voxel of the reference grid has no data in a volume when the head moved it out of the
imaged slab (:class:`~rt_mindeye.preprocess.motion.MotionResult` marks it NaN). A GLM cannot take NaN, and a 0 in
its place is a step of -100 % signal that no trial regressor can absorb: end-of-run betas of such voxels reached
thousands of z units. Filling with the voxel's own level (its mean over the volumes that did acquire it) leaves a
flat stretch instead, which the baseline absorbs and which adds no response.
"""

from __future__ import annotations

import numpy as np


def fill_not_acquired(series: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``series`` (T, V) with every NaN replaced by that voxel's mean over the run's acquired volumes, or by
    ``fallback`` (V,) (e.g. the reference volume's intensity) for a voxel no volume of the run acquired.

    Returns the filled float32 series and, per voxel, how many volumes lacked it (V,)."""
    series = np.asarray(series, dtype=np.float32)
    missing = ~np.isfinite(series)
    n_missing = missing.sum(axis=0)
    if not n_missing.any():
        return series, n_missing
    acquired = series.shape[0] - n_missing
    total = np.where(missing, 0.0, series).sum(axis=0, dtype=np.float64)
    level = np.where(acquired > 0, total / np.maximum(acquired, 1), np.asarray(fallback, dtype=np.float64))
    return np.where(missing, level[None, :], series).astype(np.float32), n_missing


class RunningLevel:
    """The causal version for live runs: each voxel's mean over the volumes of the run so far that acquired it
    (``initial`` (V,) before any did), used in place of the voxels a new volume lacks."""

    def __init__(self, initial: np.ndarray):
        self.initial = np.asarray(initial, dtype=np.float64)
        self.total = np.zeros(self.initial.size)
        self.count = np.zeros(self.initial.size, dtype=np.int64)

    def level(self) -> np.ndarray:
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), self.initial)

    def fill(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(filled float32 vector, indices of the voxels it lacked). The level does not change: :meth:`add` the
        vector once it is accepted."""
        vector = np.asarray(vector, dtype=np.float32).ravel()
        index = np.flatnonzero(~np.isfinite(vector))
        if not index.size:
            return vector, index
        filled = vector.copy()
        filled[index] = self.level()[index]
        return filled, index

    def add(self, vector: np.ndarray) -> None:
        """Count the voxels ``vector`` acquired (finite values) into each voxel's level."""
        vector = np.asarray(vector, dtype=np.float64).ravel()
        acquired = np.isfinite(vector)
        self.total += np.where(acquired, vector, 0.0)
        self.count += acquired
