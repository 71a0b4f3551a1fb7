"""Voxel selection: anatomical masks from NIfTI files, a repeat-reliability mask, and masking a volume.

Masked voxels are always taken in C order of the ``[i, j, k]`` array (``data[mask]``), so a ``(V,)`` vector from
:func:`apply_mask` lines up with ``np.argwhere(mask)`` and with the columns of the betas the GLM produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Sequence

import nibabel as nib
import numpy as np

from rt_mindeye.errors import GeometryMismatchError, SessionError
from rt_mindeye.preprocess.config import MaskConfig
from rt_mindeye.volume import Volume

__all__ = [
    "MaskGeometryError",
    "apply_mask",
    "load_mask",
    "reliability",
    "reliability_mask",
    "save_mask",
    "select_voxels",
]

AFFINE_TOLERANCE_MM = 1e-3
"""NIfTI stores affines in float32: allow that much (mm) between a mask's affine and the reference's."""


class MaskGeometryError(GeometryMismatchError):
    """A mask does not lie on the reference grid (shape or affine differ); names the mask file."""

    def __init__(self, path: str | Path | None, field: str, expected: object, got: object):
        super().__init__(path, field, expected, got)
        where = f"{self.path}: " if self.path else ""
        # Replace the series wording of the parent message: here it is a mask against a reference.
        self.args = (f"{where}mask does not fit the reference grid: {field} should be {expected}, got {got}",)


def _grid_of(reference) -> tuple[tuple[int, int, int], np.ndarray]:
    if isinstance(reference, Volume):
        return reference.shape, np.asarray(reference.affine, dtype=np.float64)
    shape, affine = reference
    return tuple(int(s) for s in shape[:3]), np.asarray(affine, dtype=np.float64)


def load_mask(path: str | Path, reference: Volume | tuple) -> np.ndarray:
    """Read a NIfTI mask in session (reference) space as a boolean ``[i, j, k]`` array.

    ``reference`` is the reference :class:`Volume` or its ``(shape, affine)``. Voxels with a value > 0 are in the
    mask (NSD's ``nsdgeneral`` files mark outside-the-brain voxels with -1). A mask on another grid raises
    :class:`MaskGeometryError` naming the file; carry it over with
    :func:`rt_mindeye.preprocess.motion.resample_to_target` first.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
    except FileNotFoundError as exc:
        raise SessionError(path, "mask file not found") from exc
    except Exception as exc:  # nibabel raises several unrelated types for unreadable files
        raise SessionError(path, f"cannot read the mask as NIfTI: {exc}") from exc
    shape, affine = _grid_of(reference)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(shape):
        raise MaskGeometryError(path, "shape", tuple(shape), tuple(data.shape))
    if not np.allclose(image.affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise MaskGeometryError(path, "affine", np.round(affine, 3).tolist(), np.round(image.affine, 3).tolist())
    return np.asarray(data) > 0


def save_mask(path: str | Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    """Write a boolean mask as an uint8 NIfTI file (the inverse of :func:`load_mask`)."""
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    nib.save(image, str(path))
    return path


def apply_mask(volume: Volume | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked voxels of a volume as a ``(V,)`` float32 vector (C order of ``[i, j, k]``)."""
    data = volume.data if isinstance(volume, Volume) else np.asarray(volume)
    mask = np.asarray(mask, dtype=bool)
    if data.shape[:3] != mask.shape:
        source = volume.source if isinstance(volume, Volume) else None
        raise MaskGeometryError(source, "shape", mask.shape, data.shape[:3])
    return np.asarray(data[mask], dtype=np.float32)


def _column_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between matching columns of two ``(n, V)`` arrays; NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=0) / denominator, np.nan)


def reliability(betas: np.ndarray, trial_types: Sequence[Hashable], method: str = "pairwise",
                min_repeats: int = 2) -> np.ndarray:
    """Per-voxel repeat reliability of single-trial betas, ``(V,)`` float64 (NaN where undefined).

    For every image shown at least ``min_repeats`` times, its repeats are compared across images:

    - ``"pairwise"``: for each pair of repeat slots (1st vs 2nd, 1st vs 3rd, ...), the Pearson correlation per voxel,
      across the images that have both, between the two slots' betas; the mean over pairs.
    - ``"split_half"``: per image, the mean of the odd-numbered repeats against the mean of the even-numbered ones,
      correlated per voxel across images (no Spearman-Brown correction).

    Images are told apart by ``trial_types`` (one label per trial, e.g. the image file name); repeat order is trial
    order.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 2:
        raise ValueError(f"betas must be (n_trials, n_voxels), got shape {betas.shape}")
    labels = list(trial_types)
    if len(labels) != betas.shape[0]:
        raise ValueError(f"trial_types has {len(labels)} labels for {betas.shape[0]} trials")
    if method not in ("pairwise", "split_half"):
        raise ValueError(f"method must be 'pairwise' or 'split_half', got {method!r}")
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be at least 2, got {min_repeats}")
    repeats: dict[Hashable, list[int]] = {}
    for trial, label in enumerate(labels):
        repeats.setdefault(label, []).append(trial)
    groups = [rows for rows in repeats.values() if len(rows) >= min_repeats]
    n_voxels = betas.shape[1]
    if len(groups) < 3:
        return np.full(n_voxels, np.nan)

    if method == "split_half":
        first = np.stack([betas[rows[0::2]].mean(axis=0) for rows in groups])
        second = np.stack([betas[rows[1::2]].mean(axis=0) for rows in groups])
        return _column_correlation(first, second)

    max_slots = max(len(rows) for rows in groups)
    scores = []
    for a in range(max_slots):
        for b in range(a + 1, max_slots):
            having = [rows for rows in groups if len(rows) > b]
            if len(having) < 3:
                continue
            scores.append(_column_correlation(betas[[rows[a] for rows in having]],
                                              betas[[rows[b] for rows in having]]))
    if not scores:
        return np.full(n_voxels, np.nan)
    with np.errstate(invalid="ignore"):
        stacked = np.stack(scores)
        counts = np.isfinite(stacked).sum(axis=0)
        total = np.nansum(stacked, axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def reliability_mask(betas: np.ndarray, trial_types: Sequence[Hashable], threshold: float | None = None, *,
                     top_n: int | None = None, method: str = "pairwise", min_repeats: int = 2,
                     anatomical_mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean ``(V,)`` selection of reliable voxels.

    Keep voxels whose :func:`reliability` is at least ``threshold``, or the ``top_n`` most reliable ones (give one of
    the two), optionally only inside ``anatomical_mask`` (a boolean ``(V,)`` over the same voxels as the betas'
    columns). Voxels with undefined reliability are never kept.
    """
    if (threshold is None) == (top_n is None):
        raise ValueError("give exactly one of threshold or top_n")
    scores = reliability(betas, trial_types, method=method, min_repeats=min_repeats)
    eligible = np.isfinite(scores)
    if anatomical_mask is not None:
        anatomical_mask = np.asarray(anatomical_mask, dtype=bool)
        if anatomical_mask.shape != scores.shape:
            raise ValueError(f"anatomical_mask has shape {anatomical_mask.shape}, betas have {scores.shape[0]} voxels")
        eligible &= anatomical_mask
    if threshold is not None:
        return eligible & (np.where(eligible, scores, -np.inf) >= threshold)
    if top_n <= 0:
        raise ValueError(f"top_n must be positive, got {top_n}")
    order = np.argsort(np.where(eligible, scores, -np.inf))[::-1][:top_n]
    selected = np.zeros(scores.shape, dtype=bool)
    selected[order] = True
    return selected & eligible


def select_voxels(config: MaskConfig, reference: Volume | tuple, betas: np.ndarray | None = None,
                  trial_types: Sequence[Hashable] | None = None, base_dir: str | Path | None = None) -> np.ndarray:
    """The boolean ``[i, j, k]`` voxel selection a :class:`MaskConfig` describes, on the reference grid.

    Start from ``config.anatomical_mask`` (relative paths are taken from ``base_dir``; none = every voxel), then,
    if a reliability threshold or ``top_n`` is configured, keep the reliable voxels among them: ``betas`` must then be
    ``(n_trials, V)`` calibration betas over the anatomical selection's voxels in C order, with one ``trial_types``
    label per trial.
    """
    shape, _ = _grid_of(reference)
    if config.anatomical_mask is not None:
        path = Path(config.anatomical_mask)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        selection = load_mask(path, reference)
    else:
        selection = np.ones(shape, dtype=bool)
    if config.reliability_threshold is None and config.reliability_top_n is None:
        return selection
    if betas is None or trial_types is None:
        raise ValueError("a reliability selection is configured: give the calibration betas and trial_types")
    betas = np.asarray(betas)
    if betas.ndim != 2 or betas.shape[1] != int(selection.sum()):
        raise ValueError(f"betas must be (n_trials, {int(selection.sum())}) over the anatomical selection, got "
                         f"shape {betas.shape}")
    keep = reliability_mask(betas, trial_types, config.reliability_threshold, top_n=config.reliability_top_n,
                            method=config.reliability_method, min_repeats=config.min_repeats)
    out = np.zeros(shape, dtype=bool)
    out[tuple(np.argwhere(selection)[keep].T)] = True
    return out
