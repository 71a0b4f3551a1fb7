"""Reading runs/masks from NIfTI and writing the calibration fit's outputs (used by ``rt-mindeye glm fit``)."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from rt_mindeye.glm.design import write_trials_tsv
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.workers import parallel_map

try:  # ISA-L's gzip codec: the same format, ~2x faster to read and ~10x faster to write than zlib's (optional)
    from isal import igzip as gzip_codec
    from isal.isal_zlib import error as _isal_error

    GZIP_ERRORS: tuple = (OSError, EOFError, ValueError, zlib.error, _isal_error)
except ImportError:  # pragma: no cover - isal is a soft dependency
    gzip_codec = gzip
    GZIP_ERRORS = (OSError, EOFError, ValueError, zlib.error)

OUTPUT_FILES = ("betas.nii.gz", "trials.tsv", "hrf_index.nii.gz", "r2.nii.gz", "frac.nii.gz", "noise_pool.nii.gz",
                "noise_pool_candidates.nii.gz", "pcvoxels.nii.gz", "meanvol.nii.gz", "onoff_r2.nii.gz",
                "scale_offset.nii.gz", "noise_components.npz", "mask.nii.gz", "calibration.npz", "calibration.json",
                "summary.json")  # plus hrf_r2, r2_run, hrf_index_run (types b-d), betas_type<x> (--save-types)


def load_image(path: str | Path, ndim: int) -> nib.Nifti1Image:
    path = Path(path)
    try:
        img = nib.load(str(path))
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise GLMInputError("image", f"cannot read NIfTI ({exc})", str(path)) from exc
    if len(img.shape) != ndim:
        raise GLMInputError("image", f"expected a {ndim}-D image, got shape {img.shape}", str(path))
    return img


def _image_data(img: nib.spatialimages.SpatialImage, path: str | Path) -> np.ndarray:
    """An image's data as float32; a gzipped file is decompressed in one call (:data:`gzip_codec`, which releases the
    GIL, so runs decompress in parallel threads)."""
    if str(path).endswith(".gz") and hasattr(type(img), "from_bytes"):
        try:
            img = type(img).from_bytes(gzip_codec.decompress(Path(path).read_bytes()))
        except GZIP_ERRORS as exc:
            raise GLMInputError("image", f"cannot decompress NIfTI ({exc})", str(path)) from exc
    return np.asarray(img.dataobj, dtype=np.float32)


def _masked_series(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The (T, V) C-ordered time series of a 4-D image's voxels in ``mask`` (in ``data[mask]``'s order). NIfTI data
    are Fortran-ordered: viewed as (T, X*Y*Z) they are C-ordered, and one column gather (``np.take``) builds the
    result (``data[mask].T`` gathers strided rows, then transposes: 0.2 s instead of 6 ms per 20,000-voxel run)."""
    if data.flags.f_contiguous:
        series = data.reshape(-1, data.shape[3], order="F").T
        return np.take(series, np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F"), axis=1)
    return np.ascontiguousarray(data[mask].T)


def _default_mask(first_run: np.ndarray, brain_fraction: float, brain_percentile: float) -> np.ndarray:
    """Voxels whose mean intensity over the first run exceeds ``brain_fraction`` of its ``brain_percentile``-th
    percentile."""
    mean = first_run.mean(axis=3)
    return mean > brain_fraction * np.percentile(mean, brain_percentile)


def _mask_file(path: str | Path, shape: tuple, what: str) -> np.ndarray:
    mimg = load_image(path, 3)
    if mimg.shape != shape:
        raise GLMInputError(what, f"shape {mimg.shape} differs from the runs' {shape}", str(path))
    return np.asarray(mimg.dataobj) > 0


def load_session(bold_paths: Sequence[str | Path], mask_path: str | Path | None = None,
                 noise_mask_path: str | Path | None = None, brain_fraction: float = 0.1,
                 brain_percentile: float = 99.0):
    """Every run read once: ``(runs, mask, ref, noise_runs, noise_mask)``.

    ``runs``: masked (T, V) float32 runs of the fitted voxels; ``mask`` their 3-D mask (the file's, else voxels whose
    mean intensity in the first run exceeds ``brain_fraction`` of its ``brain_percentile``-th percentile); ``ref`` the
    first image (affine/header of the outputs). ``noise_runs``: (T, P) runs of the noise-pool candidates (the noise
    mask file's voxels, else that same brain mask of the first run, i.e. the whole brain whatever ``mask_path``
    chose), or None with ``noise_mask = mask`` when they are the fitted voxels. Runs are decompressed in parallel
    threads, one at a time each (a whole 4-D run is held only for its own masking; with a default mask the first two
    are decompressed together and held while the first sets the mask).
    """
    images = [load_image(p, 4) for p in bold_paths]
    ref = images[0]
    for p, img in zip(bold_paths, images):
        if img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise GLMInputError("bold", f"grid {img.shape[:3]} / affine differs from the first run's", str(p))
    mask = _mask_file(mask_path, ref.shape[:3], "mask") if mask_path is not None else None
    noise_mask = _mask_file(noise_mask_path, ref.shape[:3], "noise mask") if noise_mask_path is not None else None
    prefetched = {}  # decompressed runs not yet masked, by index
    if mask is None or noise_mask is None:
        # The first run sets the default mask; the second one is decompressed beside it (a thread would idle).
        first_runs = parallel_map(lambda index: _image_data(images[index], bold_paths[index]),
                                  range(min(2, len(images))))
        prefetched = dict(enumerate(first_runs))
        del first_runs
        brain = _default_mask(prefetched[0], brain_fraction, brain_percentile)
        mask = brain if mask is None else mask
        noise_mask = brain if noise_mask is None else noise_mask
    if not mask.any():
        raise GLMInputError("mask", "selects no voxels", str(mask_path) if mask_path else None)
    if not noise_mask.any():
        raise GLMInputError("noise mask", "selects no voxels", str(noise_mask_path) if noise_mask_path else None)
    separate = not np.array_equal(noise_mask, mask)

    def masked(index: int):
        data = prefetched.pop(index, None)
        if data is None:
            data = _image_data(images[index], bold_paths[index])
        return _masked_series(data, mask), (_masked_series(data, noise_mask) if separate else None)

    loaded = parallel_map(masked, range(len(images)))
    runs = [run for run, _ in loaded]
    if not separate:
        return runs, mask, ref, None, mask
    return runs, mask, ref, [noise for _, noise in loaded], noise_mask


def load_motion_tsv(path: str | Path) -> np.ndarray:
    """Motion parameters, one row per volume (a header row of names is skipped)."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise GLMInputError("motion", f"cannot read ({exc.strerror})", str(path)) from exc
    rows = [ln.split() for ln in lines]
    try:
        float(rows[0][0])
    except (ValueError, IndexError):
        rows = rows[1:]
    try:
        return np.asarray(rows, dtype=np.float64)
    except ValueError as exc:
        raise GLMInputError("motion", f"non-numeric value ({exc})", str(path)) from exc


def _unmask(values: np.ndarray, mask: np.ndarray, dtype) -> np.ndarray:
    """(V,) or (N, V) masked values (in ``data[mask]`` order) back onto the grid: (X, Y, Z) or (X, Y, Z, N), in
    Fortran order, NIfTI's: nibabel then writes the array as it is (a C-ordered (X, Y, Z, N) array is transposed
    while written, 0.12 s for the 20,000-voxel betas), each volume filled by one scatter."""
    values = np.asarray(values)
    flat_index = np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F")
    if values.ndim == 1:
        out = np.zeros(mask.size, dtype=dtype)
        out[flat_index] = values
        return out.reshape(mask.shape, order="F")
    out = np.zeros((values.shape[0], mask.size), dtype=dtype)  # row n: volume n, Fortran-flattened
    for volume, volume_values in zip(out, values):
        volume[flat_index] = volume_values
    return out.reshape((values.shape[0],) + mask.shape[::-1]).T


#: Compression level of the gzipped outputs (1: nibabel's default with zlib; ISA-L's level 1 compresses as well).
GZIP_LEVEL = 1

#: Uncompressed bytes per gzip member written by one thread (see :func:`_save`).
GZIP_MEMBER_BYTES = 4 << 20


def _save(data: np.ndarray, ref: nib.Nifti1Image, path: Path) -> None:
    """Write a NIfTI file; ``.gz`` as several gzip members compressed in parallel threads (a multi-member gzip
    file, which every gzip reader, nibabel's included, reads as one stream) with :data:`gzip_codec`."""
    img = nib.Nifti1Image(data, ref.affine)
    img.header.set_xyzt_units("mm", "sec")
    if not str(path).endswith(".gz"):
        nib.save(img, str(path))
        return
    raw = memoryview(img.to_bytes())
    pieces = [raw[i:i + GZIP_MEMBER_BYTES] for i in range(0, len(raw), GZIP_MEMBER_BYTES)] or [raw]
    members = parallel_map(lambda piece: gzip_codec.compress(piece, compresslevel=GZIP_LEVEL), pieces)
    with open(path, "wb") as f:
        for member in members:
            f.write(member)


def write_outputs(estimator, mask: np.ndarray, ref: nib.Nifti1Image, out_dir: str | Path,
                  config_mapping: dict | None = None, noise_mask: np.ndarray | None = None) -> Path:
    """Write every output of a fitted :class:`~rt_mindeye.glm.estimator.GLMSingle` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(_unmask(estimator.betas_, mask, np.float32), ref, out / "betas.nii.gz")
    for kind, betas in sorted(estimator.betas_by_type_.items()):
        if kind in estimator.save_types:
            _save(_unmask(betas, mask, np.float32), ref, out / f"betas_type{kind}.nii.gz")
    _save(_unmask(estimator.mean_.astype(np.float32), mask, np.float32), ref, out / "meanvol.nii.gz")
    _save(_unmask(estimator.r2_onoff_, mask, np.float32), ref, out / "onoff_r2.nii.gz")
    _save(_unmask(estimator.pcvoxels_.astype(np.uint8), mask, np.uint8), ref, out / "pcvoxels.nii.gz")
    _save(_unmask(estimator.scale_offset_.T, mask, np.float32), ref, out / "scale_offset.nii.gz")
    if estimator.hrf_r2_ is not None:
        _save(_unmask(estimator.hrf_r2_.astype(np.float32), mask, np.float32), ref, out / "hrf_r2.nii.gz")
        _save(_unmask(estimator.r2_run_, mask, np.float32), ref, out / "r2_run.nii.gz")
        _save(_unmask(estimator.hrf_index_run_.astype(np.int16), mask, np.int16), ref, out / "hrf_index_run.nii.gz")
    pool_mask = mask if noise_mask is None else noise_mask
    _save(_unmask(estimator.noise_pool_candidates_.astype(np.uint8), pool_mask, np.uint8), ref,
          out / "noise_pool_candidates.nii.gz")
    write_trials_tsv(out / "trials.tsv", estimator.trials_)
    _save(_unmask(estimator.hrf_index_.astype(np.int16), mask, np.int16), ref, out / "hrf_index.nii.gz")
    _save(_unmask(estimator.r2_, mask, np.float32), ref, out / "r2.nii.gz")
    _save(_unmask(estimator.frac_, mask, np.float32), ref, out / "frac.nii.gz")
    _save(_unmask(estimator.noise_pool_.astype(np.uint8), mask, np.uint8), ref, out / "noise_pool.nii.gz")
    _save(mask.astype(np.uint8), ref, out / "mask.nii.gz")
    components = {f"run{r}": c for r, c in enumerate(estimator.noise_components_)}
    np.savez(out / "noise_components.npz", n_pcs=np.int64(estimator.n_pcs_), pc_scores=estimator.pc_scores_,
             pool_index=estimator.noise_pool_index_, loadings=estimator.noise_loadings_,
             scale=estimator.noise_scale_, **components)
    estimator.calibration_.save(out)
    summary = {"model": estimator.model, "n_trials": int(estimator.betas_.shape[0]),
               "n_voxels": int(estimator.betas_.shape[1]), "n_pcs": estimator.n_pcs_,
               "pc_scores": [float(x) for x in estimator.pc_scores_],
               "noise_pool_voxels": int(estimator.noise_pool_.sum()),
               "noise_pool_threshold": float(estimator.noise_pool_threshold_),
               "noise_pool_candidates": int(estimator.noise_pool_candidates_.sum()),
               "pcvoxels": int(estimator.pcvoxels_.sum()), "ar_rho": float(estimator.ar_rho_),
               "warnings": list(estimator.warnings_),
               "saved_types": sorted(estimator.save_types),
               "median_r2": float(np.median(estimator.r2_)), "median_frac": float(np.median(estimator.frac_)),
               "config": config_mapping or {}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
