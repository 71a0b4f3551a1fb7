"""``GLMSingle``: the offline, GLMsingle-style single-trial estimator (calibration fit), and its frozen result."""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rt_mindeye.errors import NotFittedError
from rt_mindeye.glm import fit as F
from rt_mindeye.glm.config import DEFAULT_FRACTIONS, GLMConfig
from rt_mindeye.glm.design import RunEvents, drift_degree, orthonormal_basis, trial_table
from rt_mindeye.glm.errors import GLMInputError, GLMWarning
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
    ridge_alpha: np.ndarray | None = None  # (V,) chosen ridge parameter, one for all runs (0 = OLS)
    hrf_peak_at_tr: bool = False
    scale_offset: np.ndarray | None = None  # (V, 2) rescaling of the ridge betas (type d with rescale)
    noise_coef: np.ndarray | None = None    # (V, n_live) each voxel's coefficients on the live noise regressors
    snr_alpha: np.ndarray | None = None     # (V,) ridge parameter noise variance / beta variance (types c/d)
    snr_scale_offset: np.ndarray | None = None  # (V, 2) rescaling of the betas with snr_alpha toward OLS
    # (V,) the same ridge parameter from the unwhitened model, for the early/refined estimates (only when the
    # calibration prewhitened: else snr_alpha is that already).
    live_snr_alpha: np.ndarray | None = None
    # With noise_runs (e.g. --noise-mask): the offline noise pool itself, for live noise regressors from the
    # volumes' noise vectors (indices into the noise-run voxels, their mean, loadings, scales; voxels' coefficients).
    n_noise_voxels: int = 0
    noise_ext_index: np.ndarray | None = None
    noise_ext_mean: np.ndarray | None = None
    noise_ext_loadings: np.ndarray | None = None
    noise_ext_scale: np.ndarray | None = None
    noise_ext_coef: np.ndarray | None = None
    motion_coef: np.ndarray | None = None   # (V, n_motion) each voxel's motion coefficients for the real-time prior
    # AR(1) coefficient the calibration prewhitened with (0: none, as calibrations made before it existed).
    ar_rho: float = 0.0

    _ARRAYS = ("hrf_index", "frac", "mean", "noise_pool_index", "noise_loadings", "noise_scale", "beta_mean",
               "beta_std")
    _OPTIONAL = ("ridge_alpha", "scale_offset", "noise_coef", "snr_alpha", "snr_scale_offset", "live_snr_alpha",
                 "noise_ext_index",
                 "noise_ext_mean", "noise_ext_loadings", "noise_ext_scale", "noise_ext_coef", "motion_coef")

    @property
    def n_voxels(self) -> int:
        return int(self.hrf_index.size)

    def hrf_set(self) -> HRFSet:
        peak = self.tr if self.hrf_peak_at_tr else None
        return HRFSet.canonical(self.canonical_hrf, peak) if self.model == "a" else HRFSet.library(peak)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in self._ARRAYS}
        for name in self._OPTIONAL:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        np.savez(directory / "calibration.npz", **arrays)
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self._ARRAYS and f.name not in self._OPTIONAL}
        meta["fractions"] = list(meta["fractions"])
        (directory / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "GLMCalibration":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "calibration.json").read_text())
            with np.load(directory / "calibration.npz", allow_pickle=False) as arrays:
                data = {k: arrays[k] for k in cls._ARRAYS}
                for name in cls._OPTIONAL:
                    data[name] = arrays[name] if name in arrays.files else None
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
                 drift_degree: int | None = None, hrf_peak_at_tr: bool = False, max_pcs: int = 10,
                 n_pcs: int | None = None, pc_stop: float = round(1 / 1.05, 6), noise_pool_r2: float | None = None,
                 brain_percentile: float = 99.0, brain_fraction: float = 0.1, max_pool_voxels: int = 20000,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, n_alpha_grid: int = 120, rescale: bool = True,
                 refit_hrf: bool = True, live_noise_pcs: int = 20, chunk_voxels: int = 50000, save_types: str = "",
                 prewhiten: float | None = None, progress: ProgressCallback | None = None):
        self.model = model
        self.canonical_hrf = canonical_hrf
        self.slice_time_ref = slice_time_ref
        self.drift_degree = drift_degree
        self.hrf_peak_at_tr = hrf_peak_at_tr
        self.max_pcs = max_pcs
        self.n_pcs = n_pcs
        self.pc_stop = pc_stop
        self.noise_pool_r2 = noise_pool_r2
        self.brain_percentile = brain_percentile
        self.brain_fraction = brain_fraction
        self.max_pool_voxels = max_pool_voxels
        self.fractions = fractions
        self.n_alpha_grid = n_alpha_grid
        self.rescale = rescale
        self.refit_hrf = refit_hrf
        self.live_noise_pcs = live_noise_pcs
        self.chunk_voxels = chunk_voxels
        self.save_types = save_types
        self.prewhiten = prewhiten
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
        if int(self.chunk_voxels) < 1:
            raise GLMInputError("chunk_voxels", f"must be >= 1. Got {self.chunk_voxels!r} instead.")
        if self.prewhiten is not None and not 0.0 <= float(self.prewhiten) < 1.0:
            raise GLMInputError("prewhiten", f"must be in [0, 1) or None (estimate). Got {self.prewhiten!r} instead.")
        if int(self.max_pcs) < 0:
            raise GLMInputError("max_pcs", f"must be >= 0. Got {self.max_pcs!r} instead.")
        if self.n_pcs is not None and int(self.n_pcs) < 0:
            raise GLMInputError("n_pcs", f"must be >= 0 or None. Got {self.n_pcs!r} instead.")
        if not set(str(self.save_types)) <= set(MODELS[:MODELS.index(self.model) + 1]):
            raise GLMInputError("save_types", f"must be letters among the types up to the model "
                                              f"({MODELS[:MODELS.index(self.model) + 1]!r}). "
                                              f"Got {self.save_types!r} instead.")
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
                raise GLMInputError(f"runs[{r}]", "contains NaN or infinite values (voxels a volume did not acquire: "
                                                  "fill them with rt_mindeye.glm.missing.fill_not_acquired)")
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

    def fit(self, runs, events, tr: float, mask=None, motion=None, noise_runs=None) -> "GLMSingle":
        """Fit single-trial betas.

        ``runs``: sequence of (T, V) float32 voxel time series (or 4-D arrays with a 3-D ``mask``); ``events``:
        one :class:`RunEvents` (or events TSV path / row list) per run; ``tr`` in seconds; ``mask``: optional
        (V,) boolean brain mask for the noise pool; ``motion``: optional (T, k) motion parameters per run;
        ``noise_runs``: optional (T, P) time series per run of the voxels the noise pool is drawn from (e.g. the
        whole brain when ``runs`` hold a region of interest); by default the pool is drawn from ``runs``.
        """
        with _single_threaded_blas(), F.without_hugepages():
            return self._fit(runs, events, tr, mask, motion, noise_runs)

    def _warn(self, message: str) -> None:
        self.warnings_.append(message)
        warnings.warn(message, GLMWarning, stacklevel=4)

    def _fit(self, runs, events, tr, mask, motion, noise_runs) -> "GLMSingle":
        self._check_params()
        data, events, brain, motion = self._check_runs(runs, events, tr, mask, motion)
        tr = float(tr)
        n_runs = len(data)
        model = self.model
        keep_types = set(self.save_types) | {model}
        self.warnings_: list[str] = []
        self.betas_by_type_: dict[str, np.ndarray] = {}

        self._report("prepare", 0, n_runs)
        psc, means = map(list, zip(*F.parallel_map(F.percent_signal, data)))
        self._report("prepare", n_runs, n_runs)
        mean = np.mean(means, axis=0)
        valid = np.all(np.asarray(means) > 0, axis=0)
        in_brain = F.brain_voxels(mean, self.brain_percentile, self.brain_fraction) & valid
        if brain is not None:
            in_brain &= brain
        bases = [F.nuisance_basis(y.shape[0], tr, self.drift_degree, None if motion is None else motion[r])
                 for r, y in enumerate(psc)]
        # From here on the data are orthogonal to each run's drift/motion basis (projected once, in place).
        psc = F.project_runs(psc, bases)
        ortho = [b.shape[1] for b in bases]
        cv = F.cross_validation_sets(events)
        self._check_design(events, data, tr, cv)

        peak = tr if self.hrf_peak_at_tr else None
        canonical = HRFSet.canonical(self.canonical_hrf, peak)
        can_regs = [F.run_regressors(canonical, ev, y.shape[0], tr, self.slice_time_ref) for y, ev in zip(psc, events)]
        onoff_regs = [F.onoff_regressors(x) for x in can_regs]
        self._report("on-off R2", 0, 1)
        r2_onoff = F.explained_fraction(psc, onoff_regs, bases, orthogonal_to=ortho)[0]
        self._report("on-off R2", 1, 1)

        # Noise-pool candidates: the voxels of ``noise_runs`` (e.g. the whole brain), else the fitted voxels.
        if noise_runs is not None:
            noise_psc, noise_mean = self._noise_candidates(noise_runs, data)
            noise_psc = F.project_runs(noise_psc, bases)
            cand_r2 = F.explained_fraction(noise_psc, onoff_regs, bases, orthogonal_to=ortho)[0]
            cand_bright = F.brain_voxels(noise_mean, self.brain_percentile, self.brain_fraction) & (noise_mean > 0)
        else:
            noise_psc, cand_r2, cand_bright = psc, r2_onoff, in_brain
        # GLMsingle's split: where a two-Gaussian fit of the on-off R^2 crosses 50/50 (findtailthreshold). Bright
        # voxels below it form the noise pool; fitted voxels above it score the PC count (pcvoxels).
        threshold = (float(self.noise_pool_r2) if self.noise_pool_r2 is not None
                     else F.tail_threshold(cand_r2[cand_bright]))
        cand_pool = cand_bright & (cand_r2 < threshold)
        pool_index = F.subsample_pool(cand_pool, self.max_pool_voxels)
        pcvoxels = valid & (r2_onoff > threshold)
        if pcvoxels.sum() == 0:
            pcvoxels = np.zeros_like(valid)
            pcvoxels[np.argsort(-r2_onoff)[:100]] = True

        # Generalised least squares for AR(1) noise: data and every design are prewhitened from here on. The pool
        # and the on-off R^2 above are GLMsingle's (unwhitened) definitions.
        rho = (F.noise_autocorrelation(noise_psc, pool_index) if self.prewhiten is None
               else float(self.prewhiten))
        plain_bases = bases
        if rho > 0:
            bases = [orthonormal_basis(F.prewhiten(b, rho)) for b in bases]
            for runs in [psc] if noise_psc is psc else [psc, noise_psc]:
                def whiten(r: int, runs=runs) -> None:  # run by run (whole-brain data are not held twice)
                    runs[r] = F.project_runs([F.prewhiten(runs[r], rho)], [bases[r]])[0]

                F.parallel_map(whiten, range(len(runs)))
            can_regs = [F.prewhiten(x, rho, axis=1) for x in can_regs]
            onoff_regs = [F.onoff_regressors(x) for x in can_regs]

        library_parts = []
        if model == "a":
            hrfs, regs = canonical, can_regs
            hrf_index = np.zeros(psc[0].shape[1], dtype=np.int64)
            hrf_r2 = r2_run = hrf_index_run = None
        else:
            hrfs = HRFSet.library(peak)
            regs = [F.prewhiten(F.run_regressors(hrfs, ev, y.shape[0], tr, self.slice_time_ref), rho, axis=1)
                    for y, ev in zip(psc, events)]
            self._report("HRF library", 0, 1)
            # The per-run fitted sums of squares are kept for the refit with the noise components (refit_hrf).
            keep = self.refit_hrf and model in ("c", "d")
            hrf_r2, hrf_r2_run, *library_parts = F.explained_fraction(psc, regs, bases, per_run=True,
                                                                      orthogonal_to=ortho, keep_parts=keep,
                                                                      chunk=F.LIBRARY_CHUNK)
            hrf_index = np.argmax(hrf_r2, axis=0).astype(np.int64)
            hrf_index_run = np.argmax(hrf_r2_run, axis=1).astype(np.int16)
            r2_run = np.take_along_axis(hrf_r2_run, hrf_index[None, None, :], axis=1)[:, 0]
            hrf_r2 = hrf_r2.max(axis=0)
            del hrf_r2_run
            self._report("HRF library", 1, 1)
        if "a" in keep_types and model != "a":
            rot_a = F.rotate(psc, can_regs, bases, np.zeros(psc[0].shape[1], dtype=np.int64), 1, ortho)
            self.betas_by_type_["a"] = F.betas_and_sse(rot_a, np.zeros(psc[0].shape[1], dtype=np.int64),
                                                       np.zeros((n_runs, psc[0].shape[1])))[0]
            del rot_a

        n_pcs, pc_scores = 0, np.zeros(1)
        components = [np.zeros((y.shape[0], 0)) for y in psc]
        rows = F.run_rows(psc)
        pool_data = None  # the noise pool's data, runs stacked (sum T, P): gathered once, read by the loadings too
        if model in ("c", "d") and self.max_pcs > 0 and pool_index.size > 1:
            n_want = self.max_pcs if self.n_pcs is None else max(int(self.n_pcs), 0)
            pool_data, gather_pool = F.gather_runs(noise_psc, pool_index, rows)
            components = F.parallel_map(lambda r: F.noise_components(gather_pool(r), bases[r], n_want,
                                                                     projected=True), range(n_runs))
            n_max = min(c.shape[1] for c in components)
            if self.n_pcs is not None:
                n_pcs = min(int(self.n_pcs), n_max)
            elif cv.n_trials:
                stage = "noise PCs (cross-validation)"
                pc_index = np.flatnonzero(pcvoxels)
                pc_scores = F.pc_count_scores([np.take(y, pc_index, axis=1) for y in psc], regs, bases,
                                              components, hrf_index[pc_index], cv, n_max,
                                              progress=lambda done, total: self._report(stage, done, total))
                n_pcs = F.choose_pc_count(pc_scores, self.pc_stop)
        nuisance = [np.concatenate([b, c[:, :n_pcs]], axis=1) for b, c in zip(bases, components)]
        if "b" in keep_types and model in ("c", "d") and n_pcs > 0:
            rot_b = F.rotate(psc, regs, bases, hrf_index, hrfs.n_hrfs, ortho)
            self.betas_by_type_["b"] = F.betas_and_sse(rot_b, hrf_index, np.zeros((n_runs, hrf_index.size)))[0]
            del rot_b
        if self.refit_hrf and n_pcs > 0 and model != "a":
            # Choose each voxel's HRF again with the noise regressors in the model: the shared noise no longer
            # drives the choice (GLMsingle keeps the type-b choice; +.003 to +.02 on the independent sessions).
            self._report("HRF library (denoised)", 0, 1)
            hrf_r2 = F.explained_fraction_with_components(psc, regs, bases, [c[:, :n_pcs] for c in components],
                                                          library_parts[0])
            hrf_index = np.argmax(hrf_r2, axis=0).astype(np.int64)
            hrf_r2 = hrf_r2.max(axis=0)
            self._report("HRF library (denoised)", 1, 1)
        del library_parts

        # Live noise regressors need pool voxels among the fitted ones (the real-time vector holds only those): the
        # pool's spatial loadings (live_noise_pcs of them, at least the chosen count) and each voxel's coefficients
        # on them in the calibration runs, fitted with its single-trial design (the real-time prior).
        live_pool = cand_pool if noise_runs is None else (in_brain & (r2_onoff < threshold))
        live_index = F.subsample_pool(live_pool, self.max_pool_voxels)
        self._report("noise loadings", 0, 1)
        # Only where the cross-validation found noise regressors worth having, and at most 5x as many: a pool that
        # holds responsive voxels (e.g. a small region fitted alone) would put signal into the live components.
        n_live = min(max(n_pcs, int(self.live_noise_pcs)), 5 * n_pcs) if model in ("c", "d") else 0
        n_live = min(n_live, max(live_index.size - 1, 0), min(y.shape[0] for y in psc))
        noise_coef = None
        if n_live > 0:
            # The pool's data are orthogonal to the basis: the live components differ from those of the raw
            # volumes only by their drift/motion part, which the coefficients' fit projects out anyway.
            if noise_runs is None:  # the live pool is the noise pool (live_index == pool_index)
                pool = pool_data
            else:
                pool, gather_live = F.gather_runs(psc, live_index, rows)
                F.parallel_map(gather_live, range(n_runs))
            loadings, scale = F.stacked_noise_loadings(pool, n_live)
            live = F.parallel_map(lambda part: F.live_components(pool[part], loadings, scale), rows)
            del pool
            noise_coef = F.noise_coefficients(psc, regs, bases, live, hrf_index).astype(np.float32)
        else:
            loadings, scale = np.zeros((live_index.size, 0)), np.ones(live_index.size)
        # The offline pool itself, when it comes from separate noise runs: the real-time stage uses it when the
        # volumes come with their noise-mask vectors (else the fitted voxels in the pool above).
        external = None
        if noise_runs is not None and model in ("c", "d") and pool_index.size > 1:
            n_ext = n_live if n_live > 0 else min(n_pcs, pool_index.size - 1)
            if n_ext > 0:
                ext_loadings, ext_scale = F.stacked_noise_loadings(pool_data, n_ext)
                ext_live = [F.live_components(pool_data[part], ext_loadings, ext_scale) for part in rows]
                ext_coef = (F.noise_coefficients(psc, regs, bases, ext_live, hrf_index).astype(np.float32)
                            if n_live > 0 else None)
                external = dict(n_noise_voxels=int(noise_psc[0].shape[1]), noise_ext_index=pool_index,
                                noise_ext_mean=noise_mean[pool_index], noise_ext_loadings=ext_loadings,
                                noise_ext_scale=ext_scale, noise_ext_coef=ext_coef)
        del pool_data
        self._report("noise loadings", 1, 1)
        motion_coef = self._motion_coefficients(data, mean, hrfs, events, motion, tr, live_index, loadings, scale,
                                                hrf_index)

        # The single-trial fit is per voxel once the HRFs and the nuisance are chosen: it runs over chunks of
        # voxels so that the rotated data and the ridge work stay bounded (the whole brain included); only the
        # outputs (betas of every trial and voxel) grow with the voxel count.
        n_vox = hrf_index.size
        n_trials = sum(len(ev) for ev in events)
        fractions = np.asarray(self.fractions, dtype=np.float64)
        dof = sum(y.shape[0] - n.shape[1] - len(ev) for y, n, ev in zip(psc, nuisance, events))
        ols = np.zeros((n_trials, n_vox), dtype=np.float32)
        betas = ols if model != "d" else np.zeros((n_trials, n_vox), dtype=np.float32)
        sse, total = np.zeros(n_vox), np.zeros(n_vox)
        frac, alpha = np.ones(n_vox), np.zeros(n_vox)
        scale_offset = np.tile([1.0, 0.0], (n_vox, 1))
        snr_alpha = snr_scale_offset = live_snr_alpha = None
        if model in ("c", "d"):
            snr_alpha, snr_scale_offset = np.zeros(n_vox), np.tile([1.0, 0.0], (n_vox, 1))
        if model in ("c", "d") and rho > 0:
            # The early and refined estimates filter with their own, milder AR(1) (glm.realtime.ar_rho): their
            # signal-to-noise ridge comes from the unwhitened model, as it did before the prewhitening (the
            # prewhitened model's sigma^2 (X'X)^-1 is about twice the noise the betas show, which doubled the live
            # ridge and cost the refined estimates .02). The rotation maps its products instead of unwhitening the data.
            live_snr_alpha = np.zeros(n_vox)
            plain_regs = [F.unprewhiten(x, rho, axis=1) for x in regs]
            plain_nuisance = [orthonormal_basis(np.concatenate([b, F.unprewhiten(c[:, :n_pcs], rho)], axis=1))
                              for b, c in zip(plain_bases, components)]
        chunk = max(int(self.chunk_voxels), 1)
        n_chunks = -(-n_vox // chunk)
        for c, first in enumerate(range(0, n_vox, chunk)):
            self._report("single-trial fit", c, n_chunks)
            part = slice(first, min(first + chunk, n_vox))
            h = hrf_index[part]
            rot = F.rotate([y[:, part] for y in psc], regs, nuisance, h, hrfs.n_hrfs, ortho)
            part_ols, part_sse = F.betas_and_sse(rot, h, np.zeros((n_runs, h.size)))
            ols[:, part] = part_ols
            sse[part] = part_sse
            total[part] = rot.yss.sum(axis=0)
            if model in ("c", "d"):
                a = F.signal_to_noise_alpha(rot, h, part_ols, part_sse, dof)
                snr_alpha[part] = a
                snr_scale_offset[part] = F.rescale_to(F.betas_and_sse(rot, h, np.repeat(a[None, :], n_runs,
                                                                                         axis=0))[0], part_ols)
            if live_snr_alpha is not None:
                plain = F.rotate([y[:, part] for y in psc], plain_regs, plain_nuisance, h, hrfs.n_hrfs,
                                 unwhiten=rho)
                live_snr_alpha[part] = F.signal_to_noise_alpha(plain, h, *F.betas_and_sse(
                    plain, h, np.zeros((n_runs, h.size))), dof)
                del plain
            if model == "d":
                betas[:, part], sse[part], frac[part], alpha[part], scale_offset[part] = self._ridge(
                    rot, h, fractions, part_ols, cv)
            del rot
        self._report("single-trial fit", n_chunks, n_chunks)
        del psc, noise_psc
        if model in ("b", "c", "d"):
            self.betas_by_type_["c" if model in ("c", "d") else "b"] = ols
            if n_pcs == 0 and "b" in keep_types:
                self.betas_by_type_.setdefault("b", ols)
        else:
            self.betas_by_type_["a"] = ols
        if model == "d":
            self.betas_by_type_["d"] = betas
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.where(total > 0, 1.0 - sse / total, 0.0)

        self.tr_ = tr
        self.ar_rho_ = float(rho)
        self.betas_ = betas
        self.trials_ = trial_table(events)
        self.hrf_index_ = hrf_index
        self.hrf_index_run_ = hrf_index_run
        self.hrf_r2_ = hrf_r2
        self.r2_run_ = r2_run
        self.r2_ = r2.astype(np.float32)
        self.r2_onoff_ = r2_onoff.astype(np.float32)
        self.frac_ = frac.astype(np.float32)
        self.ridge_alpha_ = alpha
        self.scale_offset_ = scale_offset.astype(np.float32)
        self.noise_pool_ = live_pool
        self.noise_pool_candidates_ = cand_pool
        self.noise_pool_threshold_ = threshold
        self.noise_pool_index_ = live_index
        self.noise_pool_used_ = pool_index
        self.pcvoxels_ = pcvoxels
        self.noise_components_ = [c[:, :n_pcs] for c in components]
        self.noise_loadings_ = loadings
        self.noise_scale_ = scale
        self.noise_coef_ = noise_coef
        self.noise_external_ = external
        self.motion_coef_ = motion_coef
        self.snr_alpha_ = snr_alpha
        self.live_snr_alpha_ = live_snr_alpha
        self.snr_scale_offset_ = snr_scale_offset
        self.n_pcs_ = int(n_pcs)
        self.pc_scores_ = pc_scores
        self.mean_ = mean
        self.brain_ = in_brain
        self.drift_degrees_ = [drift_degree(y.shape[0], tr, self.drift_degree) for y in data]
        self.uses_motion_ = motion is not None and any(m is not None for m in motion)
        self.beta_mean_ = betas.mean(axis=0, dtype=np.float64)
        std = betas.std(axis=0, dtype=np.float64)
        self.beta_std_ = np.where(std > 0, std, 1.0)
        return self

    # --- stages ------------------------------------------------------------------------------------------------

    def _motion_coefficients(self, data, mean, hrfs, events, motion, tr, live_index, loadings, scale, hrf_index):
        """Each voxel's motion coefficients for the real-time prior (V, k) float32, or None: per run, least squares
        on the raw (not prewhitened) volumes with its trials, drift and the live noise components (as the live stage
        computes them from raw volumes), then the across-run mean shrunk by its reliability
        (:func:`fit.reliable_mean`). Needs motion in at least two runs (the reliability comes from their spread)."""
        if motion is None:
            return None
        with_motion = [r for r, m in enumerate(motion) if m is not None and m.size]
        if len(with_motion) < 2 or len({motion[r].shape[1] for r in with_motion}) != 1:
            return None
        self._report("motion coefficients", 0, 1)
        drift = [F.nuisance_basis(data[r].shape[0], tr, self.drift_degree) for r in with_motion]
        comps = [F.live_components(F.percent_of_mean(data[r][:, live_index], mean[live_index]), loadings, scale)
                 for r in with_motion]
        regs = [F.run_regressors(hrfs, events[r], data[r].shape[0], tr, self.slice_time_ref) for r in with_motion]
        per_run = F.motion_coefficients([data[r] for r in with_motion], mean, regs, drift,
                                        [motion[r] for r in with_motion], comps, hrf_index)
        self._report("motion coefficients", 1, 1)
        return F.reliable_mean(per_run).astype(np.float32)

    def _check_design(self, events, data, tr, cv) -> None:
        """GLMsingle's design warnings: no condition repeated across runs, trials too close to a run's end."""
        late = [r for r, (ev, run) in enumerate(zip(events, data))
                if len(ev) and run.shape[0] * tr - ev.onsets[-1] < 8.0 + tr]
        if late:
            self._warn(f"trials start less than 8 s before the end of run(s) {', '.join(str(r) for r in late)}: "
                       "their responses are cut off, which may make their betas unreliable; consider leaving "
                       "those trials out of the events")
        if not cv.n_trials and self.model in ("c", "d"):
            what = []
            if self.n_pcs is None and self.max_pcs > 0:
                what.append("no noise PCs (pass n_pcs / --n-pcs to use a fixed count)")
            if self.model == "d" and len(self.fractions) > 1:
                what.append("ridge fraction 1 (pass a single fraction to use it)")
            self._warn(f"no condition is repeated across runs ({len(data)} run(s)), so type {self.model}'s "
                       f"cross-validation cannot run: using {' and '.join(what) or 'the fixed choices given'}")

    def _noise_candidates(self, noise_runs, data):
        if isinstance(noise_runs, np.ndarray):
            noise_runs = [noise_runs]
        noise_runs = list(noise_runs)
        if len(noise_runs) != len(data):
            raise GLMInputError("noise_runs", f"{len(noise_runs)} runs for {len(data)} runs of data")
        psc, means = [], []
        for r, (run, ref) in enumerate(zip(noise_runs, data)):
            run = np.asarray(run)
            if run.ndim != 2 or run.shape[0] != ref.shape[0]:
                raise GLMInputError(f"noise_runs[{r}]", f"expected ({ref.shape[0]}, P), got shape {run.shape}")
            if not np.all(np.isfinite(run)):
                raise GLMInputError(f"noise_runs[{r}]", "contains NaN or infinite values")
            p, m = F.percent_signal(run)
            psc.append(p)
            means.append(m)
        return psc, np.where(np.all(np.asarray(means) > 0, axis=0), np.mean(means, axis=0), 0.0)

    def _ridge(self, rot, hrf_index, fractions, ols, cv):
        """Per-voxel fractional ridge, one fraction for all runs, chosen by GLMsingle's cross-validation in beta
        space against the unregularised betas; then GLMsingle's scale-and-offset rescaling."""
        n_runs = rot.s.shape[0]
        n_vox = hrf_index.size
        if not cv.n_trials:
            choice_frac = np.full(n_vox, fractions[0] if fractions.size == 1 else 1.0)
            alpha = F.fraction_alphas(rot, hrf_index, np.unique(choice_frac), self.n_alpha_grid)[0]
            frac = choice_frac
        else:
            self._report("ridge fractions (cross-validation)", 0, 1)
            grid_alphas = F.fraction_alphas(rot, hrf_index, fractions, self.n_alpha_grid)
            rows = F.cv_rows(cv, rot)
            badness = F.ridge_badness(rot, hrf_index, grid_alphas, ols[rows], cv)
            # Ties (repeats that carry no information, e.g. a silent voxel with identical badness everywhere)
            # go to the least-shrunk fraction.
            best = badness.min(axis=0)
            tied = np.all(badness - best <= 1e-9 * np.maximum(np.abs(best), 1e-300), axis=0)
            order = np.argsort(-fractions, kind="stable")
            choice = order[np.argmin(badness[order], axis=0)]
            choice[tied] = order[0]
            frac = fractions[choice]
            alpha = np.take_along_axis(grid_alphas, choice[None, :], axis=0)[0]
            self._report("ridge fractions (cross-validation)", 1, 1)
        betas, sse = F.betas_and_sse(rot, hrf_index, np.repeat(alpha[None, :], n_runs, axis=0))
        scale_offset = np.tile([1.0, 0.0], (n_vox, 1))
        if self.rescale:
            scale_offset = F.rescale_to(betas, ols)
            scale_offset[alpha <= 0] = (1.0, 0.0)  # unshrunk voxels are kept as they are (x * 1 + 0 = x)
            betas *= scale_offset[:, 0].astype(np.float32)
            betas += scale_offset[:, 1].astype(np.float32)
        return betas, sse, frac, alpha, scale_offset

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
            beta_std=self.beta_std_, n_alpha_grid=int(self.n_alpha_grid), ridge_alpha=self.ridge_alpha_,
            hrf_peak_at_tr=bool(self.hrf_peak_at_tr),
            scale_offset=self.scale_offset_.astype(np.float64) if self.model == "d" else None,
            noise_coef=self.noise_coef_, motion_coef=self.motion_coef_, snr_alpha=self.snr_alpha_,
            live_snr_alpha=getattr(self, "live_snr_alpha_", None),
            snr_scale_offset=self.snr_scale_offset_, ar_rho=float(getattr(self, "ar_rho_", 0.0)),
            **(self.noise_external_ or {}))

    def zscored_betas(self) -> np.ndarray:
        self._check_fitted()
        return ((self.betas_ - self.beta_mean_) / self.beta_std_).astype(np.float32)


def fit_run_frozen(calibration: GLMCalibration, data: np.ndarray, events, frames: np.ndarray | None = None,
                   n_frames: int | None = None, motion: np.ndarray | None = None,
                   tr: float | None = None, noise_data: np.ndarray | None = None) -> np.ndarray:
    """Single-trial betas (K, V) of one run with the calibration's frozen choices, computed exactly as the offline
    fit computes that run (per-voxel HRF and ridge fraction, the run's own noise components from the frozen pool).

    ``data`` (T_present, V) holds the volumes at indices ``frames`` of a run of ``n_frames`` volumes (default: all
    consecutive); missing volumes are dropped from the fit, not filled. ``noise_data`` (T_present, P): the
    intensities of the calibration's offline noise pool (``noise_ext_index`` of the noise runs) at the same volumes,
    when the calibration drew its pool from separate noise runs: the run's noise components then come from them.
    """
    with _single_threaded_blas(), F.without_hugepages():
        return _fit_run_frozen(calibration, data, events, frames, n_frames, motion, tr, noise_data)


def _fit_run_frozen(calibration, data, events, frames, n_frames, motion, tr, noise_data=None) -> np.ndarray:
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
    rho = float(calibration.ar_rho)
    base = orthonormal_basis(F.prewhiten(np.concatenate(columns, axis=1), rho, frames))
    psc = F.prewhiten(psc, rho, frames)
    hrfs = calibration.hrf_set()
    regs = F.prewhiten(hrfs.regressors((frames + calibration.slice_time_ref) * tr, events.onsets, events.durations),
                       rho, frames, axis=1)
    comps = np.zeros((frames.size, 0))
    if calibration.n_pcs > 0 and noise_data is not None and calibration.noise_ext_index is not None:
        noise_psc = F.prewhiten(F.percent_signal(noise_data)[0], rho, frames)
        comps = F.noise_components(noise_psc, base, calibration.n_pcs)
    elif calibration.n_pcs > 0 and calibration.noise_pool_index.size > 1:
        comps = F.noise_components(psc[:, calibration.noise_pool_index], base, calibration.n_pcs)
    nuisance = np.concatenate([base, comps], axis=1)
    hrf_index = calibration.hrf_index.astype(np.int64)
    rot = F.rotate([psc], [regs], [nuisance], hrf_index, hrfs.n_hrfs)
    alphas = np.zeros((1, psc.shape[1]))
    if calibration.model == "d" and calibration.ridge_alpha is not None:
        alphas = np.asarray(calibration.ridge_alpha, dtype=np.float64)[None, :]
    betas, _ = F.betas_and_sse(rot, hrf_index, alphas)
    if calibration.model == "d" and calibration.scale_offset is not None and np.any(alphas > 0):
        so = calibration.scale_offset
        betas = betas * so[:, 0].astype(np.float32) + so[:, 1].astype(np.float32)
    return betas


