"""``GLMSingle``: the offline, GLMsingle-style single-trial estimator (calibration fit), and its frozen result."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rt_mindeye.errors import NotFittedError
from rt_mindeye.glm import fit as F
from rt_mindeye.glm.config import DEFAULT_FRACTIONS, GLMConfig
from rt_mindeye.glm.design import RunEvents, drift_degree, orthonormal_basis, trial_table
from rt_mindeye.glm.errors import GLMInputError
from rt_mindeye.glm.hrf import HRFSet

#: ``progress(stage, completed, total)``: called as each stage advances (the CLI draws rich progress bars with it).
ProgressCallback = Callable[[str, int, int], None]

MODELS = ("a", "b", "c", "d")

try:  # optional: keeps OpenBLAS from spreading the many small SVDs over threads (80 ms instead of 3 ms each when
    # the cores are busy); the numba kernels keep their own threads.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is a soft dependency
    threadpool_limits = None


def _single_threaded_blas():
    return threadpool_limits(limits=1, user_api="blas") if threadpool_limits is not None else nullcontext()


def _check_in(name: str, value, allowed) -> None:
    if value not in allowed:
        raise GLMInputError(name, f"must be one of {list(allowed)}. Got {value!r} instead.")


@dataclass
class GLMCalibration:
    """Everything the real-time estimator freezes from the calibration fit (saved as ``calibration.npz``/``.json``)."""

    model: str
    tr: float
    canonical_hrf: str
    slice_time_ref: float
    drift_degree: int | None
    uses_motion: bool
    n_pcs: int
    fractions: tuple[float, ...]
    hrf_index: np.ndarray          # (V,) into the library (always 0 for model a: the canonical HRF)
    frac: np.ndarray               # (V,) ridge fraction per voxel (1 = OLS)
    mean: np.ndarray               # (V,) mean intensity over the calibration runs
    noise_pool_index: np.ndarray   # (P,) voxels whose components form the noise regressors
    noise_loadings: np.ndarray     # (P, n_pcs) frozen spatial loadings for live noise regressors
    noise_scale: np.ndarray        # (P,) per-voxel scale applied before the loadings
    beta_mean: np.ndarray          # (V,) z-scoring statistics of the calibration betas
    beta_std: np.ndarray           # (V,)
    n_alpha_grid: int = 120
    ridge_alpha: np.ndarray | None = None  # (V,) chosen ridge parameter (mean over runs; 0 = OLS)

    _ARRAYS = ("hrf_index", "frac", "mean", "noise_pool_index", "noise_loadings", "noise_scale", "beta_mean",
               "beta_std")

    @property
    def n_voxels(self) -> int:
        return int(self.hrf_index.size)

    def hrf_set(self) -> HRFSet:
        return HRFSet.canonical(self.canonical_hrf) if self.model == "a" else HRFSet.library()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in self._ARRAYS}
        if self.ridge_alpha is not None:
            arrays["ridge_alpha"] = self.ridge_alpha
        np.savez(directory / "calibration.npz", **arrays)
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self._ARRAYS and f.name != "ridge_alpha"}
        meta["fractions"] = list(meta["fractions"])
        (directory / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "GLMCalibration":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "calibration.json").read_text())
            with np.load(directory / "calibration.npz", allow_pickle=False) as arrays:
                data = {k: arrays[k] for k in cls._ARRAYS}
                data["ridge_alpha"] = arrays["ridge_alpha"] if "ridge_alpha" in arrays.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise GLMInputError("calibration", f"cannot load ({exc})", str(directory)) from exc
        meta["fractions"] = tuple(meta["fractions"])
        return cls(**meta, **data)


class GLMSingle:
    """GLMsingle-style single-trial betas: model ``a`` canonical-HRF OLS, ``b`` per-voxel HRF from the 20-HRF
    library, ``c`` plus GLMdenoise noise components (count by leave-one-run-out cross-validation), ``d`` plus
    fractional ridge per voxel (fraction by cross-validation across repeated conditions).

    Parameters are those of :class:`~rt_mindeye.glm.config.GLMConfig` (without ``realtime``); ``progress`` is an
    optional :data:`ProgressCallback`. Betas are in % signal change; trials are ordered by run, then onset.
    """

    def __init__(self, model: str = "d", canonical_hrf: str = "glover", slice_time_ref: float = 0.0,
                 drift_degree: int | None = None, max_pcs: int = 10, pc_stop: float = 0.95,
                 noise_pool_r2: float | None = None, brain_percentile: float = 99.0, brain_fraction: float = 0.1,
                 max_pool_voxels: int = 4000, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 n_alpha_grid: int = 120, progress: ProgressCallback | None = None):
        self.model = model
        self.canonical_hrf = canonical_hrf
        self.slice_time_ref = slice_time_ref
        self.drift_degree = drift_degree
        self.max_pcs = max_pcs
        self.pc_stop = pc_stop
        self.noise_pool_r2 = noise_pool_r2
        self.brain_percentile = brain_percentile
        self.brain_fraction = brain_fraction
        self.max_pool_voxels = max_pool_voxels
        self.fractions = fractions
        self.n_alpha_grid = n_alpha_grid
        self.progress = progress

    @classmethod
    def from_config(cls, config: GLMConfig, **overrides) -> "GLMSingle":
        params = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "realtime"}
        params.update(overrides)
        return cls(**params)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "betas_")

    def _report(self, stage: str, completed: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, completed, total)

    # --- validation --------------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        _check_in("model", self.model, MODELS)
        _check_in("canonical_hrf", self.canonical_hrf, ("glover", "spm"))
        if not 0.0 <= float(self.slice_time_ref) <= 1.0:
            raise GLMInputError("slice_time_ref", f"must be in [0, 1]. Got {self.slice_time_ref!r} instead.")
        if self.drift_degree is not None and int(self.drift_degree) < 0:
            raise GLMInputError("drift_degree", f"must be >= 0 or None. Got {self.drift_degree!r} instead.")
        if int(self.max_pcs) < 0:
            raise GLMInputError("max_pcs", f"must be >= 0. Got {self.max_pcs!r} instead.")
        fr = np.asarray(self.fractions, dtype=np.float64)
        if fr.size == 0 or np.any(fr <= 0) or np.any(fr > 1):
            raise GLMInputError("fractions", f"must be non-empty values in (0, 1]. Got {self.fractions!r} instead.")

    @staticmethod
    def _check_runs(runs, events, tr, mask, motion):
        if not isinstance(tr, (int, float)) or isinstance(tr, bool) or not tr > 0:
            raise GLMInputError("tr", f"'tr' must be a positive number of seconds. Got {tr!r} instead.")
        if isinstance(runs, np.ndarray):
            runs = [runs]
        runs = list(runs)
        if not runs:
            raise GLMInputError("runs", "at least one run is needed")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
        data = []
        for r, run in enumerate(runs):
            run = np.asarray(run)
            if run.ndim == 4:
                if mask is None or mask.shape != run.shape[:3]:
                    raise GLMInputError(f"runs[{r}]", "a 4-D run needs a 3-D mask of the same spatial shape")
                run = run[mask].T
            elif run.ndim == 2 and mask is not None and mask.ndim == 1:
                if mask.size != run.shape[1]:
                    raise GLMInputError("mask", f"has {mask.size} entries for {run.shape[1]} voxels")
            elif run.ndim != 2:
                raise GLMInputError(f"runs[{r}]", f"expected (T, V) or 4-D data, got shape {run.shape}")
            if not np.all(np.isfinite(run)):
                raise GLMInputError(f"runs[{r}]", "contains NaN or infinite values")
            data.append(np.ascontiguousarray(run, dtype=np.float32))
        n_vox = data[0].shape[1]
        for r, run in enumerate(data):
            if run.shape[1] != n_vox:
                raise GLMInputError(f"runs[{r}]", f"has {run.shape[1]} voxels, run 0 has {n_vox}")
        if isinstance(events, (RunEvents, str, Path)) or (events and isinstance(events, dict)):
            events = [events]
        events = [RunEvents.coerce(e) for e in events]
        if len(events) != len(data):
            raise GLMInputError("events", f"{len(events)} event tables for {len(data)} runs")
        for r, (run, ev) in enumerate(zip(data, events)):
            if len(ev) and ev.onsets[-1] >= run.shape[0] * tr:
                raise GLMInputError(f"events[{r}]", f"onset {ev.onsets[-1]} s is after the run's end "
                                                    f"({run.shape[0] * tr} s)")
        if motion is not None:
            motion = [None if m is None else np.asarray(m, dtype=np.float64) for m in motion]
            if len(motion) != len(data):
                raise GLMInputError("motion", f"{len(motion)} motion tables for {len(data)} runs")
            for r, (m, run) in enumerate(zip(motion, data)):
                if m is not None and (m.ndim != 2 or m.shape[0] != run.shape[0]):
                    raise GLMInputError(f"motion[{r}]", f"expected ({run.shape[0]}, k), got {m.shape}")
        brain = mask if (mask is not None and mask.ndim == 1) else None
        return data, events, brain, motion

    # --- fit ---------------------------------------------------------------------------------------------------

    def fit(self, runs, events, tr: float, mask=None, motion=None) -> "GLMSingle":
        """Fit single-trial betas.

        ``runs``: sequence of (T, V) float32 voxel time series (or 4-D arrays with a 3-D ``mask``); ``events``:
        one :class:`RunEvents` (or events TSV path / row list) per run; ``tr`` in seconds; ``mask``: optional
        (V,) boolean brain mask for the noise pool; ``motion``: optional (T, k) motion parameters per run.
        """
        with _single_threaded_blas():
            return self._fit(runs, events, tr, mask, motion)

    def _fit(self, runs, events, tr, mask, motion) -> "GLMSingle":
        self._check_params()
        data, events, brain, motion = self._check_runs(runs, events, tr, mask, motion)
        tr = float(tr)
        n_runs = len(data)
        model = self.model

        self._report("prepare", 0, n_runs)
        psc, means = [], []
        for r, run in enumerate(data):
            p, m = F.percent_signal(run)
            psc.append(p)
            means.append(m)
            self._report("prepare", r + 1, n_runs)
        mean = np.mean(means, axis=0)
        valid = np.all(np.asarray(means) > 0, axis=0)
        in_brain = F.brain_voxels(mean, self.brain_percentile, self.brain_fraction) & valid
        if brain is not None:
            in_brain &= brain
        bases = [F.nuisance_basis(y.shape[0], tr, self.drift_degree, None if motion is None else motion[r])
                 for r, y in enumerate(psc)]

        canonical = HRFSet.canonical(self.canonical_hrf)
        can_regs = [F.run_regressors(canonical, ev, y.shape[0], tr, self.slice_time_ref) for y, ev in zip(psc, events)]
        self._report("on-off R2", 0, 1)
        r2_onoff = F.explained_fraction(psc, [F.onoff_regressors(x) for x in can_regs], bases)[0]
        self._report("on-off R2", 1, 1)

        if model == "a":
            hrfs, regs = canonical, can_regs
            hrf_index = np.zeros(psc[0].shape[1], dtype=np.int64)
            hrf_r2 = None
        else:
            hrfs = HRFSet.library()
            regs = [F.run_regressors(hrfs, ev, y.shape[0], tr, self.slice_time_ref) for y, ev in zip(psc, events)]
            self._report("HRF library", 0, 1)
            hrf_r2 = F.explained_fraction(psc, regs, bases)
            hrf_index = np.argmax(hrf_r2, axis=0).astype(np.int64)
            self._report("HRF library", 1, 1)

        # Voxels split into responsive and noise-pool voxels on the R^2 of the HRF-fitted single-trial model when
        # there is one (in rapid designs the on-off regressor hardly varies, so on-off R^2 separates them poorly),
        # else on the on-off R^2.
        pool_r2 = r2_onoff if hrf_r2 is None else hrf_r2.max(axis=0)
        threshold = (float(self.noise_pool_r2) if self.noise_pool_r2 is not None
                     else F.gaussian_mixture_threshold(pool_r2[in_brain], conservative=True))
        cv = F.cross_validation_sets(events)
        n_pcs, pc_scores = 0, np.zeros(1)
        pool = in_brain & (pool_r2 < threshold)
        pool_index = F.subsample_pool(pool, self.max_pool_voxels)
        components = [np.zeros((y.shape[0], 0)) for y in psc]
        if model in ("c", "d") and self.max_pcs > 0 and pool_index.size > 1:
            components = [F.noise_components(y[:, pool_index], b, self.max_pcs) for y, b in zip(psc, bases)]
            responsive = np.flatnonzero(valid & (pool_r2 >= threshold))
            if responsive.size < 10:
                responsive = np.argsort(-pool_r2)[:max(10, pool_r2.size // 20)]
            if cv.n_trials:
                n_max = min(c.shape[1] for c in components)
                pc_scores = np.zeros(n_max + 1)
                for n in range(n_max + 1):
                    self._report("noise PCs (cross-validation)", n, n_max + 1)
                    nuis = [np.concatenate([b, c[:, :n]], axis=1) for b, c in zip(bases, components)]
                    sub = [y[:, responsive] for y in psc]
                    rot = F.rotate(sub, regs, nuis, hrf_index[responsive], hrfs.n_hrfs)
                    sse = F.cv_sse(rot, hrf_index[responsive], np.zeros((n_runs, 1, responsive.size)), cv)[0]
                    total = rot.yss.sum(axis=0)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        score = np.where(total > 0, 1.0 - sse / total, 0.0)
                    pc_scores[n] = np.median(score)
                self._report("noise PCs (cross-validation)", n_max + 1, n_max + 1)
                n_pcs = F.choose_pc_count(pc_scores, self.pc_stop)
        nuisance = [np.concatenate([b, c[:, :n_pcs]], axis=1) for b, c in zip(bases, components)]

        self._report("single-trial fit", 0, 1)
        rot = F.rotate(psc, regs, nuisance, hrf_index, hrfs.n_hrfs)
        fractions = np.asarray(self.fractions, dtype=np.float64)
        n_vox = psc[0].shape[1]
        frac = np.ones(n_vox)
        alphas = np.zeros((n_runs, n_vox))
        if model == "d":
            grid_alphas = F.fraction_alphas(rot, hrf_index, fractions, self.n_alpha_grid)
            if cv.n_trials:
                self._report("ridge fractions (cross-validation)", 0, 1)
                sse = F.cv_sse(rot, hrf_index, grid_alphas, cv)
                # Ties (e.g. silent voxels) go to the first, least-shrunk fraction in the list.
                choice = np.argmin(sse, axis=0)
                self._report("ridge fractions (cross-validation)", 1, 1)
            else:
                choice = np.zeros(n_vox, dtype=np.int64)
            frac = fractions[choice]
            alphas = np.take_along_axis(grid_alphas, choice[None, None, :].repeat(n_runs, axis=0), axis=1)[:, 0]
        betas, sse = F.betas_and_sse(rot, hrf_index, alphas)
        self._report("single-trial fit", 1, 1)
        total = rot.yss.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.where(total > 0, 1.0 - sse / total, 0.0)

        self._report("noise loadings", 0, 1)
        if n_pcs > 0:
            loadings, scale = F.spatial_noise_loadings([y[:, pool_index] for y in psc], bases, n_pcs)
        else:
            loadings, scale = np.zeros((pool_index.size, 0)), np.ones(pool_index.size)
        self._report("noise loadings", 1, 1)

        self.tr_ = tr
        self.betas_ = betas
        self.trials_ = trial_table(events)
        self.hrf_index_ = hrf_index
        self.hrf_r2_ = hrf_r2
        self.r2_ = r2.astype(np.float32)
        self.r2_onoff_ = r2_onoff.astype(np.float32)
        self.frac_ = frac.astype(np.float32)
        self.ridge_alphas_ = alphas
        self.noise_pool_ = pool
        self.noise_pool_threshold_ = threshold
        self.noise_pool_index_ = pool_index
        self.noise_components_ = [c[:, :n_pcs] for c in components]
        self.noise_loadings_ = loadings
        self.noise_scale_ = scale
        self.n_pcs_ = int(n_pcs)
        self.pc_scores_ = pc_scores
        self.mean_ = mean
        self.brain_ = in_brain
        self.drift_degrees_ = [drift_degree(y.shape[0], tr, self.drift_degree) for y in psc]
        self.uses_motion_ = motion is not None and any(m is not None for m in motion)
        self.beta_mean_ = betas.mean(axis=0, dtype=np.float64)
        std = betas.std(axis=0, dtype=np.float64)
        self.beta_std_ = np.where(std > 0, std, 1.0)
        return self

    # --- results -----------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(self)

    @property
    def calibration_(self) -> GLMCalibration:
        """The frozen choices the real-time estimator uses."""
        self._check_fitted()
        return GLMCalibration(
            model=self.model, tr=self.tr_, canonical_hrf=self.canonical_hrf, slice_time_ref=float(self.slice_time_ref),
            drift_degree=None if self.drift_degree is None else int(self.drift_degree),
            uses_motion=bool(self.uses_motion_), n_pcs=self.n_pcs_,
            fractions=tuple(float(f) for f in self.fractions), hrf_index=self.hrf_index_,
            frac=self.frac_.astype(np.float64), mean=self.mean_, noise_pool_index=self.noise_pool_index_,
            noise_loadings=self.noise_loadings_, noise_scale=self.noise_scale_, beta_mean=self.beta_mean_,
            beta_std=self.beta_std_, n_alpha_grid=int(self.n_alpha_grid),
            ridge_alpha=self.ridge_alphas_.mean(axis=0))

    def zscored_betas(self) -> np.ndarray:
        self._check_fitted()
        return ((self.betas_ - self.beta_mean_) / self.beta_std_).astype(np.float32)


def fit_run_frozen(calibration: GLMCalibration, data: np.ndarray, events, frames: np.ndarray | None = None,
                   n_frames: int | None = None, motion: np.ndarray | None = None,
                   tr: float | None = None) -> np.ndarray:
    """Single-trial betas (K, V) of one run with the calibration's frozen choices, computed exactly as the offline
    fit computes that run (per-voxel HRF and ridge fraction, the run's own noise components from the frozen pool).

    ``data`` (T_present, V) holds the volumes at indices ``frames`` of a run of ``n_frames`` volumes (default: all
    consecutive); missing volumes are dropped from the fit, not filled.
    """
    with _single_threaded_blas():
        return _fit_run_frozen(calibration, data, events, frames, n_frames, motion, tr)


def _fit_run_frozen(calibration, data, events, frames, n_frames, motion, tr) -> np.ndarray:
    events = RunEvents.coerce(events)
    data = np.asarray(data, dtype=np.float32)
    if frames is None:
        frames = np.arange(data.shape[0])
    frames = np.asarray(frames, dtype=np.int64)
    n_frames = int(frames.max()) + 1 if n_frames is None else int(n_frames)
    tr = calibration.tr if tr is None else float(tr)
    psc, _ = F.percent_signal(data)
    poly = F.polynomial_drift(n_frames, drift_degree(n_frames, tr, calibration.drift_degree))[frames]
    columns = [poly]
    if calibration.uses_motion and motion is not None:
        motion = np.asarray(motion, dtype=np.float64)
        columns.append(motion - motion.mean(axis=0))
    base = orthonormal_basis(np.concatenate(columns, axis=1))
    hrfs = calibration.hrf_set()
    regs = hrfs.regressors((frames + calibration.slice_time_ref) * tr, events.onsets, events.durations)
    comps = np.zeros((frames.size, 0))
    if calibration.n_pcs > 0 and calibration.noise_pool_index.size > 1:
        comps = F.noise_components(psc[:, calibration.noise_pool_index], base, calibration.n_pcs)
    nuisance = np.concatenate([base, comps], axis=1)
    hrf_index = calibration.hrf_index.astype(np.int64)
    rot = F.rotate([psc], [regs], [nuisance], hrf_index, hrfs.n_hrfs)
    alphas = np.zeros((1, psc.shape[1]))
    if calibration.model == "d":
        unique = np.unique(calibration.frac)[::-1]
        grid = F.fraction_alphas(rot, hrf_index, unique, calibration.n_alpha_grid)
        pick = np.searchsorted(-unique, -calibration.frac)
        alphas = np.take_along_axis(grid[0], pick[None, :], axis=0)
    betas, _ = F.betas_and_sse(rot, hrf_index, alphas)
    return betas


