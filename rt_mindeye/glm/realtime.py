"""``RealtimeGLM``: single-trial betas during a live run, with the calibration's frozen choices.

Each trial is estimated with its own regressor and those of up to ``neighbors`` started trials either side (local
LSA, shrunk by each voxel's calibrated ridge parameter), one regressor for all other trials of the run so far (LSS,
Mumford et al. 2012, as real-time MindEye), drift, motion and live noise regressors, each voxel with its calibrated
HRF.
Nothing is refitted from the whole run: every volume adds its outer products to running sufficient statistics
(``X'Y`` rows of the few trials whose response is under way, ``S'Y`` for the sum of all trials, ``N'Y`` for the
nuisance regressors, and small per-HRF Gram terms), so the work per volume is ``(active trials + nuisance) x V`` and
an estimate is one system of at most ``2 * neighbors + 2 + nuisance`` unknowns per HRF in use (its (HRF, ridge level)
groups solved through one Schur complement) and a ``size x V`` combination, however long the run has been going.
A missing volume simply never enters the statistics (dropped, not zero-filled).

Four choices keep the newest trial's estimate from being confounded while only the rising part of its response has
been seen (measured on the phantom and the synthetic sessions, see docs/glm.md):

* AR(1) prewhitening (``ar_rho``): each volume enters the sums as ``row_t - rho * row_{t-1}`` (data, trial, sum and
  nuisance columns alike), so the work per volume stays bounded; after a missing volume the chain restarts with the
  stationary scaling ``sqrt(1 - rho^2) * row_t``.
* Drift shrinkage (``drift_shrinkage``): the non-constant drift columns get a ridge proportional to the constant
  column's weight, so a slope that the elapsed part of the run cannot pin down is not extrapolated into the newest
  volumes.
* Ridge toward the prior mean (``ridge_prior_mean``): the trials' own columns are shrunk toward the voxel's
  calibration mean beta rather than toward zero, so a neighbour whose response has barely started is assumed to
  respond as usual rather than not at all.
* Random-walk baseline (``drift_walk``): the baseline is a local level that walks (scanner drift is random-walk
  like); every volume's data and regressors enter the sums as their Kalman innovations under that model (then
  AR(1) prewhitening), which is generalised least squares with the level as a diffuse nuisance, so the newest
  trial's estimate rests on the baseline of the volumes just before it rather than on the run's average.

A trial is first emitted ("early") once ``early_volumes`` volumes at or after its onset have arrived, then
"refined" every ``refine_every`` further volumes up to ``refine_until``, and "final" at :meth:`end_run`, which
refits the run exactly as the offline calibration fit would (:func:`~rt_mindeye.glm.estimator.fit_run_frozen`:
LSA with per-voxel HRF, the run's own noise components and the per-voxel ridge fractions).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from rt_mindeye.glm.config import GLMConfig, RealtimeConfig
from rt_mindeye.glm.design import RunEvents, drift_degree
from rt_mindeye.glm.errors import GLMInputError, GLMWarning, RealtimeStateError
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle, fit_run_frozen
from rt_mindeye.glm.missing import RunningLevel

KINDS = ("early", "refined", "final")
RIDGE_STEP = 1.25
WALK_DROP = 1e-3  # a trial's random-walk filter state below this (all HRFs) is dropped: bounds the work per volume


@dataclass(frozen=True)
class TrialEstimate:
    """One emitted estimate of a trial's betas."""

    run: int
    trial: int            # index of the trial in its run (onset order)
    trial_type: str
    onset: float          # seconds from the run's first volume
    kind: str             # "early" | "refined" | "final"
    n_volumes: int        # volumes at or after the onset that entered this estimate
    betas: np.ndarray     # (V,) float32
    zscored: bool         # True: (beta - calibration mean) / calibration std per voxel
    last_volume: int      # index of the newest volume in the fit


class RealtimeGLM:
    """Live single-trial estimator. ``calibration``: a fitted :class:`GLMSingle` or its :class:`GLMCalibration`;
    ``config``: a :class:`GLMConfig` (its ``realtime`` section is used) or a :class:`RealtimeConfig`."""

    def __init__(self, calibration, config: GLMConfig | RealtimeConfig | None = None):
        self.calibration = calibration
        self.config = config

    # --- setup -------------------------------------------------------------------------------------------------

    def _resolve(self) -> tuple[GLMCalibration, RealtimeConfig]:
        cal = self.calibration.calibration_ if isinstance(self.calibration, GLMSingle) else self.calibration
        if not isinstance(cal, GLMCalibration):
            raise GLMInputError("calibration", f"expected a fitted GLMSingle or a GLMCalibration, got "
                                               f"{type(cal).__name__}")
        cfg = self.config
        if cfg is None:
            cfg = RealtimeConfig()
        elif isinstance(cfg, GLMConfig):
            cfg = cfg.realtime
        if not isinstance(cfg, RealtimeConfig):
            raise GLMInputError("config", f"expected GLMConfig or RealtimeConfig, got {type(cfg).__name__}")
        return cal, cfg

    def start_run(self, run_events, tr: float | None = None, *, run: int | None = None,
                  n_volumes: int | None = None) -> "RealtimeGLM":
        """Begin a run. ``run_events``: the run's trials (RunEvents / events TSV / rows); ``tr`` defaults to the
        calibration's; ``n_volumes`` (optional) is the planned run length, used only to scale the drift basis."""
        cal, cfg = self._resolve()
        self.calibration_, self.config_ = cal, cfg
        events = RunEvents.coerce(run_events)
        tr = cal.tr if tr is None else float(tr)
        if not tr > 0:
            raise GLMInputError("tr", f"'tr' must be positive. Got {tr!r} instead.")
        self.run_ = (getattr(self, "run_", -1) + 1) if run is None else int(run)
        self.events_ = events
        self.tr_ = tr
        self._hrfs = cal.hrf_set()
        self._hrf_index = cal.hrf_index.astype(np.int64)
        self._used_hrfs = np.unique(self._hrf_index)
        # Voxels share one solve per (HRF, ridge level); ridge parameters are quantised to 25% steps (ridge
        # solutions change little within a step) so a handful of small pseudo-inverses serve every voxel.
        alpha = np.zeros(cal.n_voxels)
        if cfg.ridge and cfg.snr_ridge and cal.snr_alpha is not None:
            # A prewhitened calibration keeps the unwhitened model's parameter for these estimates.
            alpha = np.asarray(cal.snr_alpha if cal.live_snr_alpha is None else cal.live_snr_alpha, dtype=np.float64)
        elif cfg.ridge and cal.ridge_alpha is not None:
            alpha = cal.ridge_alpha
        self._support = np.array([self._hrfs.support(d) for d in events.durations])
        if cfg.ridge and cfg.ridge_floor > 0 and len(events):
            # Floor: a voxel whose calibration kept fraction 1 (alpha 0) or nearly would otherwise solve an
            # unpenalised, ill-conditioned system while its neighbours' responses are only partly seen.
            energy = self._trial_energy(cal, events, tr)
            alpha = np.maximum(alpha, cfg.ridge_floor * energy)
        level = np.where(alpha > 0, np.round(np.log(np.maximum(alpha, 1e-300)) / np.log(RIDGE_STEP)), -10 ** 6)
        keys = np.stack([self._hrf_index, level.astype(np.int64)], axis=1)
        groups, self._group_of_voxel = np.unique(keys, axis=0, return_inverse=True)
        self._group_of_voxel = self._group_of_voxel.ravel()
        self._group_hrf = groups[:, 0]
        self._group_alpha = np.where(groups[:, 1] > -10 ** 6, RIDGE_STEP ** groups[:, 1].astype(np.float64), 0.0)
        self._prior_mean_rhs = self._group_alpha[self._group_of_voxel] * np.asarray(cal.beta_mean, dtype=np.float64)
        planned = n_volumes * tr if n_volumes else 0.0
        last = float(np.max(events.onsets + self._support)) if len(events) else 0.0
        # The drift's time scale is the planned run length when given (so it does not depend on the events, which
        # revise_events may change), else the end of the last trial's response.
        self._time_scale = planned if planned else max(last, 60.0)
        # Run length in volumes for the start-of-run shrinkage: the plan if given, else a typical run (200 volumes);
        # never from the events, so a revision of the events (or a trial left out) leaves it unchanged.
        self._planned_frames = float(n_volumes) if n_volumes else 200.0
        # Every trial's regressor at every planned volume, built once (volumes past the plan are built on arrival).
        self._n_table = int(np.ceil(max(self._time_scale, last) / tr)) + 1
        self._table = self._hrfs.regressors((np.arange(self._n_table) + cal.slice_time_ref) * tr, events.onsets,
                                            events.durations)
        n_vox = cal.n_voxels
        k = len(events)
        self._n_poly = cfg.max_drift_degree + 1
        self._use_pool(external=False)  # until the first volume says whether noise vectors come with the volumes
        self._n_motion = None  # fixed by the first volume
        self._scale = np.where(cal.mean > 0, 100.0 / np.where(cal.mean > 0, cal.mean, 1.0), 0.0)
        self._xy = np.zeros((k, n_vox))
        self._sy = np.zeros(n_vox)
        self._ny = None
        h = self._hrfs.n_hrfs
        self._xx = np.zeros((h, k, k))  # only pairs of trials whose responses overlap are ever non-zero
        self._xs = np.zeros((h, k))
        self._xn = None
        self._ss = np.zeros(h)
        self._sn = None
        self._nn = None
        self._n_post = np.zeros(k, dtype=np.int64)
        self._emitted = np.zeros(k, dtype=np.int64)  # n_post of the last emitted estimate (0 = none yet)
        self._frames: list[int] = []
        self._previous = None  # (index, psc, nuisance row, active trials) of the last volume, for prewhitening
        self._nuis_weight = None
        self._last_nuisance = None
        self._walk = None  # Kalman state of the random-walk baseline (drift_walk > 0), see _walk_innovations
        self._rows: list[np.ndarray] = []
        self._motion_rows: list[np.ndarray] = []
        self._pool_rows: list[np.ndarray] = []  # raw intensities of the live pool voxels, per volume
        self._level = RunningLevel(cal.mean)  # fills the voxels a volume did not acquire (NaN)
        self._not_acquired: list[np.ndarray] = []  # per volume, the voxels it lacked
        self._noise_level: RunningLevel | None = None  # the same for noise vectors, once the first one comes
        self._last_motion = None
        self.work_ = {"rows_updated": [], "solve_size": []}
        self._active = True
        return self

    def _trial_energy(self, cal, events, tr) -> float:
        """Median over the run's trials and the library HRFs of a whole trial regressor's sum of squares."""
        span = float(np.max(self._support)) + tr
        frames = (np.arange(int(np.ceil(span / tr)) + 1) + cal.slice_time_ref) * tr
        regs = self._hrfs.regressors(frames, np.zeros(1), events.durations[:1])[:, :, 0]
        return float(np.median((regs ** 2).sum(axis=1)))

    def _require_run(self) -> None:
        if not getattr(self, "_active", False):
            raise RealtimeStateError("no run in progress: call start_run() first")

    # --- volumes -----------------------------------------------------------------------------------------------

    def _use_pool(self, external: bool) -> None:
        """Where the live noise regressors come from: the calibration's offline noise pool (voxels of the noise
        runs, given to add_volume as ``noise_vector``) or the fitted voxels in the pool. With a prior, every frozen
        component (coefficients shrunk toward the calibration's); without, the cross-validated count, free."""
        cal, cfg = self.calibration_, self.config_
        if external:
            index, mean = cal.noise_ext_index, cal.noise_ext_mean
            loadings, scale, coef = cal.noise_ext_loadings, cal.noise_ext_scale, cal.noise_ext_coef
        else:
            index, mean = cal.noise_pool_index, cal.mean[cal.noise_pool_index]
            loadings, scale, coef = cal.noise_loadings, cal.noise_scale, cal.noise_coef
        prior = cfg.noise_pcs and cfg.noise_prior > 0 and coef is not None and coef.shape[1] > 0
        self._n_pcs = loadings.shape[1] if prior else min(cal.n_pcs, loadings.shape[1]) if cfg.noise_pcs else 0
        # Coefficients stored (n, V) so that the prior's right-hand side adds to the nuisance rows of N'Y.
        self._noise_prior = None
        if prior:
            self._noise_prior = (cfg.noise_prior, np.ascontiguousarray(np.asarray(coef, dtype=np.float64).T))
        self._pool = (np.asarray(index, dtype=np.int64), np.asarray(mean, dtype=np.float64),
                      np.asarray(scale, dtype=np.float64), np.asarray(loadings, dtype=np.float64), coef)
        self._pool_external = external

    def _pool_values(self, raw: np.ndarray) -> np.ndarray:
        """(P,) raw intensities of the live pool voxels, from the data vector or the noise vector."""
        return np.asarray(raw, dtype=np.float64)[self._pool[0]]

    def _live_components(self, pool_raw: np.ndarray) -> np.ndarray:
        """Live noise regressors (..., n) from pool intensities (..., P), as the calibration computed them."""
        _, mean, scale, loadings, _ = self._pool
        psc = np.where(mean > 0, pool_raw * (100.0 / np.where(mean > 0, mean, 1.0)) - 100.0, 0.0)
        return (psc / scale) @ loadings

    def _nuisance_row(self, index: int, pool_raw: np.ndarray, motion: np.ndarray | None) -> np.ndarray:
        cal = self.calibration_
        u = (index + cal.slice_time_ref) * self.tr_ / self._time_scale
        parts = [u ** np.arange(self._n_poly)]
        if self._n_motion:
            parts.append(motion)
        if self._n_pcs:
            parts.append(self._live_components(pool_raw)[:self._n_pcs])
        return np.concatenate(parts)

    def add_volume(self, index: int, data_vector: np.ndarray, motion_params=None,
                   noise_vector: np.ndarray | None = None) -> list[TrialEstimate]:
        """Add volume ``index`` (0-based in the run): ``data_vector`` (V,) masked intensities. Returns the
        estimates this volume completes (early/refined), possibly none.

        ``noise_vector``: the volume's intensities at the noise-mask voxels (the ``noise_runs`` voxels of the
        calibration fit), when the calibration drew its noise pool from them: the live noise regressors then come
        from the same pool as the offline fit's (without it, from the fitted voxels in the pool, with a warning)."""
        self._require_run()
        index = int(index)
        if self._frames and index <= self._frames[-1]:
            raise GLMInputError("index", f"volume {index} arrived after volume {self._frames[-1]}: volumes must be "
                                         "added in increasing order (the watcher reorders)")
        y_raw = np.asarray(data_vector, dtype=np.float32).ravel()
        if y_raw.size != self.calibration_.n_voxels:
            raise GLMInputError("data_vector", f"has {y_raw.size} voxels, the calibration has "
                                               f"{self.calibration_.n_voxels}")
        # NaN: a voxel this volume did not acquire (moved out of the slab); it takes its level so far in the run.
        acquired_raw = y_raw
        y_raw, not_acquired = self._level.fill(y_raw)
        motion = None
        if self.config_.use_motion and self.calibration_.uses_motion:
            # Motion enters early and final estimates alike, and only if the calibration fit used it too.
            if self._n_motion is None:
                self._n_motion = 0 if motion_params is None else int(np.size(motion_params))
                if motion_params is None:
                    warnings.warn(f"run {self.run_}: volumes come without motion parameters although the "
                                  "calibration used them: early and final estimates of this run are fitted without "
                                  "motion regressors", GLMWarning, stacklevel=2)
                elif self.config_.motion_prior and self._motion_prior() is None:
                    coef = self.calibration_.motion_coef
                    why = ("has no motion coefficients (fitted before they were kept, or with motion in fewer than 2 "
                           "runs): refit it to use the motion prior" if coef is None else
                           f"has motion coefficients for {coef.shape[1]} parameters, the volumes bring "
                           f"{self._n_motion}")
                    warnings.warn(f"run {self.run_}: motion_prior is set but the calibration {why}; motion columns "
                                  "are shrunk toward zero instead", GLMWarning, stacklevel=2)
            if self._n_motion:
                motion = (self._last_motion if motion_params is None
                          else np.asarray(motion_params, dtype=np.float64).ravel())
                if motion is None or motion.size != self._n_motion:
                    raise GLMInputError("motion_params", f"expected {self._n_motion} values")
                self._last_motion = motion
        cal = self.calibration_
        if self._ny is None and cal.noise_ext_index is not None and self.config_.noise_pcs:
            if noise_vector is None:
                warnings.warn(f"run {self.run_}: the calibration drew its noise pool from noise-mask voxels but the "
                              "volumes come without noise_vector: live noise regressors from the fitted voxels in "
                              "the pool instead", GLMWarning, stacklevel=2)
            self._use_pool(external=noise_vector is not None)
        if self._pool_external:
            if noise_vector is None:
                raise GLMInputError("noise_vector", "this run's first volume came with noise_vector: every volume "
                                                    "must")
            noise_vector = np.asarray(noise_vector, dtype=np.float32).ravel()
            if noise_vector.size != cal.n_noise_voxels:
                raise GLMInputError("noise_vector", f"has {noise_vector.size} voxels, the calibration's noise mask "
                                                    f"has {cal.n_noise_voxels}")
            if self._noise_level is None:
                initial = np.zeros(noise_vector.size)
                initial[cal.noise_ext_index] = cal.noise_ext_mean  # the pool voxels' calibration level
                self._noise_level = RunningLevel(initial)
            acquired_noise = noise_vector
            noise_vector, _ = self._noise_level.fill(noise_vector)
            pool_raw = self._pool_values(noise_vector)
        else:
            pool_raw = self._pool_values(y_raw)
        psc = (y_raw.astype(np.float64) * self._scale) - 100.0 * (self._scale > 0)
        nuis = self._nuisance_row(index, pool_raw, motion)
        if self._ny is None:
            p = nuis.size
            h, k = self._xs.shape
            self._ny = np.zeros((p, psc.size))
            self._xn = np.zeros((h, k, p))
            self._sn = np.zeros((h, p))
            self._nn = np.zeros((p, p))
        t = (index + self.calibration_.slice_time_ref) * self.tr_
        ev = self.events_
        active = np.flatnonzero((ev.onsets <= t) & (t <= ev.onsets + self._support))
        if self.config_.drift_walk:
            rows, psc_w, nuis_w, touched = self._walk_whitened(index, psc, nuis, active)
        else:
            rows, psc_w, nuis_w, touched = self._whitened(index, psc, nuis, active)
        if self._nuis_weight is None:
            self._nuis_weight = np.zeros(nuis.size)
        # Each nuisance column's (prewhitened) weight without the walk filter: the scale of the slope, motion and
        # noise priors, which therefore do not depend on the baseline model.
        if self.config_.drift_walk:
            rho, last = self.config_.ar_rho, self._last_nuisance
            plain = (nuis - rho * last[1] if last is not None and last[0] == index - 1
                     else np.sqrt(1.0 - rho * rho) * nuis)
            self._last_nuisance = (index, nuis)
            self._nuis_weight += plain ** 2
        else:
            self._nuis_weight += nuis_w ** 2
        s_row = rows.sum(axis=1)
        # Sufficient statistics: only the active trials' rows, the trial sum and the nuisance rows touch V voxels.
        if touched.size:
            per_voxel = rows[self._hrf_index]  # (V, A): each voxel's own HRF
            self._xy[touched] += (per_voxel * psc_w[:, None]).T
            self._xx[:, touched[:, None], touched[None, :]] += rows[:, :, None] * rows[:, None, :]
            self._xs[:, touched] += rows * s_row[:, None]
            self._xn[:, touched] += rows[:, :, None] * nuis_w[None, None, :]
        self._sy += s_row[self._hrf_index] * psc_w
        self._ny += nuis_w[:, None] * psc_w[None, :]
        self._ss += s_row ** 2
        self._sn += s_row[:, None] * nuis_w[None, :]
        self._nn += np.outer(nuis_w, nuis_w)
        self.work_["rows_updated"].append(int(touched.size + 1 + nuis.size))
        self._frames.append(index)
        self._rows.append(y_raw)
        self._not_acquired.append(not_acquired)
        self._level.add(acquired_raw)
        if self._pool_external:
            self._noise_level.add(acquired_noise)
        self._motion_rows.append(motion if motion is not None else np.zeros(0))
        self._pool_rows.append(pool_raw)
        self._n_post[ev.onsets <= t] += 1
        return self._emit_due(index)

    def _trial_rows(self, index: int, trials: np.ndarray) -> np.ndarray:
        """(H, len(trials)) regressor values of ``trials`` at volume ``index`` under every HRF."""
        if index < self._n_table:
            return self._table[:, index, trials]
        t = (index + self.calibration_.slice_time_ref) * self.tr_
        ev = self.events_
        return self._hrfs.regressors(np.array([t]), ev.onsets[trials], ev.durations[trials])[:, 0, :]

    def _whitened(self, index: int, psc: np.ndarray, nuis: np.ndarray, active: np.ndarray):
        """This volume's rows after AR(1) prewhitening: (trial rows (H, A'), data (V,), nuisance (p,), the A'
        trials they belong to). With rho = 0 they are the raw rows of the active trials."""
        rho = self.config_.ar_rho
        previous, self._previous = self._previous, (index, psc, nuis, active)
        if not rho:
            return self._trial_rows(index, active), psc, nuis, active
        if previous is None or previous[0] != index - 1:
            # First volume, or the previous one is missing: restart the chain at its stationary scale.
            c = np.sqrt(1.0 - rho * rho)
            return c * self._trial_rows(index, active), c * psc, c * nuis, active
        # A trial whose response ended at the previous volume still has a (small) whitened row now.
        touched = np.union1d(active, previous[3])
        rows = self._trial_rows(index, touched) - rho * self._trial_rows(index - 1, touched)
        return rows, psc - rho * previous[1], nuis - rho * previous[2], touched

    def _walk_whitened(self, index: int, psc: np.ndarray, nuis: np.ndarray, active: np.ndarray):
        """As :meth:`_whitened` with a random-walk baseline: the raw rows' Kalman innovations
        (:meth:`_walk_innovations`), then AR(1) prewhitening of the innovations (the noise around the baseline)."""
        rows, psc, nuis, both, weight = self._walk_innovations(index, self._trial_rows(index, active), psc, nuis,
                                                               active)
        rho = self.config_.ar_rho
        previous, self._previous = self._previous, (index, psc, nuis, both, rows, weight)
        if not rho:
            return rows, psc, nuis, both
        if previous is None or previous[0] != index - 1 or previous[5] == 0:
            c = np.sqrt(1.0 - rho * rho)
            return c * rows, c * psc, c * nuis, both
        touched = np.union1d(both, previous[3])
        out = np.zeros((rows.shape[0], touched.size))
        out[:, np.searchsorted(touched, both)] += rows
        out[:, np.searchsorted(touched, previous[3])] -= rho * previous[4]
        return out, psc - rho * previous[1], nuis - rho * previous[2], touched

    def _walk_innovations(self, index: int, rows: np.ndarray, psc: np.ndarray, nuis: np.ndarray,
                          touched: np.ndarray):
        """Kalman innovations of this volume's (prewhitened) rows under a local-level baseline.

        Model: every column c (data, each trial's regressor, nuisance) is observed as c_t = level_t + white noise,
        level_t = level_{t-1} + step (variance ``drift_walk`` relative to the noise). Regressing the data's
        innovations on the regressors' innovations, each weighted by 1 / sqrt(innovation variance), is generalised
        least squares with the level as an unknown (diffuse) nuisance (de Jong's augmented Kalman filter). The gain
        depends only on the volume count, so one filter serves every voxel and column; the sums stay sums of
        outer products. A trial's innovation decays geometrically after its response ends and is dropped below
        1e-3 of the regressors' peak, which bounds the trials a volume touches."""
        q = self.config_.drift_walk
        h, k = self._xs.shape
        walk = self._walk
        if walk is None:
            walk = self._walk = {"p": np.inf, "x": np.zeros((h, k)), "y": np.zeros_like(psc),
                                 "n": np.zeros_like(nuis), "index": index - 1}
        p = walk["p"] + q * (index - walk["index"] - 1)  # predictions only across missing volumes
        walk["index"] = index
        state = walk["x"]
        alive = np.flatnonzero(np.any(state != 0, axis=0))
        both = np.union1d(touched, alive)
        full = np.zeros((h, both.size))
        full[:, np.searchsorted(both, touched)] = rows
        v_x = full - state[:, both]
        v_y = psc - walk["y"]
        v_n = nuis - walk["n"]
        if np.isinf(p):  # diffuse start: the first volume only sets the level
            gain, weight, walk["p"] = 1.0, 0.0, 1.0 + q
        else:
            f = p + 1.0
            gain, weight, walk["p"] = p / f, 1.0 / np.sqrt(f), p / f + q
        new_state = state[:, both] + gain * v_x
        new_state[:, np.all(np.abs(new_state) < WALK_DROP, axis=0)] = 0.0
        state[:, both] = new_state
        walk["y"] = walk["y"] + gain * v_y
        walk["n"] = walk["n"] + gain * v_n
        return weight * v_x, weight * v_y, weight * v_n, both, weight

    def add_gap(self, index: int) -> list[TrialEstimate]:
        """Record that volume ``index`` will never arrive: it is left out of every fit (with prewhitening the next
        volume restarts the AR(1) chain, as it would after any missing volume)."""
        self._require_run()
        return []

    def _emit_due(self, index: int) -> list[TrialEstimate]:
        cfg = self.config_
        out = []
        for j in np.flatnonzero(self._n_post > 0):
            n = int(self._n_post[j])
            if self._emitted[j] == 0:
                if n >= cfg.early_volumes:
                    out.append(self.estimate(j, "early"))
            elif (cfg.refine_every and n <= cfg.refine_until and n > self._emitted[j]
                  and (n - cfg.early_volumes) % cfg.refine_every == 0):
                out.append(self.estimate(j, "refined"))
        return out

    # --- estimates ---------------------------------------------------------------------------------------------

    def _nuisance_columns(self) -> np.ndarray:
        """Nuisance columns in use now: drift up to the elapsed-time degree (capped), motion, noise components."""
        cal, cfg = self.calibration_, self.config_
        n_frames = self._frames[-1] + 1
        degree = min(cfg.max_drift_degree, drift_degree(n_frames, self.tr_, cal.drift_degree))
        cols = list(range(degree + 1))
        cols.extend(range(self._n_poly, self._ny.shape[0]))
        return np.asarray(cols, dtype=np.int64)

    def estimate(self, trial: int, kind: str = "refined") -> TrialEstimate:
        """LSS estimate of ``trial`` from the volumes so far (cost independent of how many have arrived)."""
        self._require_run()
        if self._ny is None:
            raise RealtimeStateError("no volume has arrived in this run yet")
        j = int(trial)
        cols = self._nuisance_columns()
        p = cols.size
        # One system per (HRF, ridge level) group; the groups of one HRF differ only in the own columns' ridge, so
        # the Gram matrix is built once per HRF in use (``hs``) and the groups are solved from it (_group_weights).
        hs, group_hrf = np.unique(self._group_hrf, return_inverse=True)
        # Own columns: the trial and up to ``neighbors`` started trials either side (LSA locally); every other trial
        # of the run shares one column (LSS), so the system size never depends on the run length.
        w_n = self.config_.neighbors
        own = np.arange(max(0, j - w_n), min(len(self.events_), j + w_n + 1))
        own = own[(self._n_post[own] > 0) | (own == j)]
        m = own.size
        at = int(np.flatnonzero(own == j)[0])
        # The own trials' and columns' entries are taken per HRF first, then spread to the groups (taking whole
        # per-HRF arrays per group would copy every trial's terms once per group).
        xx = self._xx[:, own[:, None], own[None, :]][hs]          # (H', m, m)
        xs = self._xs[:, own][hs]                                  # (H', m)
        xn = self._xn[:, own][:, :, cols][hs]                      # (H', m, p)
        sn = self._sn[:, cols][hs]                                 # (H', p)
        rest_x = xs - xx.sum(axis=2)                               # x_i'(S - sum own)
        rest_rest = self._ss[hs] - 2 * xs.sum(axis=1) + xx.sum(axis=(1, 2))
        rest_n = sn - xn.sum(axis=1)
        size = m + 1 + p
        gram = np.zeros((hs.size, size, size))
        gram[:, :m, :m] = xx
        gram[:, :m, m] = gram[:, m, :m] = rest_x
        gram[:, m, m] = rest_rest
        gram[:, :m, m + 1:] = xn
        gram[:, m + 1:, :m] = xn.transpose(0, 2, 1)
        gram[:, m, m + 1:] = gram[:, m + 1:, m] = rest_n
        gram[:, m + 1:, m + 1:] = self._nn[np.ix_(cols, cols)]
        # Drift slope(s): a ridge proportional to the constant column's weight (see ``drift_shrinkage``).
        sloped = m + 1 + np.flatnonzero((cols >= 1) & (cols < self._n_poly))
        if self.config_.drift_shrinkage and sloped.size:
            gram[:, sloped, sloped] += self.config_.drift_shrinkage * self._nuis_weight[0]
        # Motion and noise-PC columns: shrunk relative to their own weight by the same law as the slope
        # (drift_shrinkage / elapsed fraction of the run^2), so the run's first trials, with fewer volumes than
        # unpenalised columns, stay solvable and the columns are nearly free once the run is long.
        extra = np.flatnonzero(cols >= self._n_poly)
        elapsed = max(len(self._frames) / self._planned_frames, 1e-3)
        prior = self._noise_prior
        pcs = np.flatnonzero(cols >= self._n_poly + (self._n_motion or 0))
        if prior is not None and pcs.size:
            extra = np.setdiff1d(extra, pcs)
        moved = np.flatnonzero((cols >= self._n_poly) & (cols < self._n_poly + (self._n_motion or 0)))
        motion_prior = self._motion_prior() if moved.size else None
        if motion_prior is not None:
            extra = np.setdiff1d(extra, moved)
            lam_m = motion_prior[0] * self._nuis_weight[cols[moved]] / elapsed
            gram[:, m + 1 + moved, m + 1 + moved] += lam_m
        if self.config_.drift_shrinkage and extra.size:
            weight = self._nuis_weight[cols[extra]]
            gram[:, m + 1 + extra, m + 1 + extra] += self.config_.drift_shrinkage / elapsed ** 2 * weight
        if prior is not None and pcs.size:
            strength, coef_t = prior
            lam = strength * self._nuis_weight[cols[pcs]] / elapsed
            gram[:, m + 1 + pcs, m + 1 + pcs] += lam
        weights = self._group_weights(gram, group_hrf, m, at)
        # Each voxel's weights as rows (size, V), so the combination with the (size, V) right-hand sides runs over
        # contiguous rows.
        wt = np.take(weights.T, self._group_of_voxel, axis=1)
        xy = self._xy[own]                    # (m, V), a copy
        rest = self._sy - xy.sum(axis=0)
        if self.config_.ridge_prior_mean:
            # Penalty alpha * |b_own - mu|^2 adds alpha * mu to each own column's right-hand side.
            xy += self._prior_mean_rhs
        # The priors toward the calibration's coefficients add lambda * coef to their columns' right-hand sides.
        # (The motion and noise columns are contiguous runs of ``cols``: row by row, without fancy-index temporaries.)
        rhs = self._ny[cols]
        if prior is not None and pcs.size:
            for k, row in enumerate(pcs):
                rhs[row] += lam[k] * coef_t[k]
        if motion_prior is not None:
            for k, row in enumerate(moved):
                rhs[row] += lam_m[k] * motion_prior[1][k]
        beta = (np.einsum("mv,mv->v", wt[:m], xy) + wt[m] * rest + np.einsum("pv,pv->v", wt[m + 1:], rhs))
        self.work_["solve_size"].append(size)
        self._emitted[j] = self._n_post[j]
        return self._package(j, kind, int(self._n_post[j]), beta)

    def _group_weights(self, gram: np.ndarray, group_hrf: np.ndarray, m: int, at: int) -> np.ndarray:
        """Row ``at`` of each group's inverse (G, size): the weights that turn the right-hand sides into this trial's
        beta (the system is symmetric, so it is the solution for the unit vector). ``gram`` (H', size, size) holds
        each HRF's system without the own columns' ridge, which is the group's alpha on the first ``m`` diagonal
        entries. A relative 1e-9 ridge on every column (relative to the column's own weight, as the noise columns'
        weights dwarf the trials'; to the largest weight for a column that is still empty) keeps columns that are
        still empty (e.g. no other trial yet) from making the system singular.

        Groups with a positive alpha are solved through the Schur complement of the nuisance block, which is the
        same for every group of an HRF: with the own block ``A``, the cross block ``B`` and the nuisance block
        ``C``, the own part of the solution is ``(S + a I)^-1 e_at`` with ``S = A - B C^-1 B'`` (one eigen-
        decomposition per HRF serves every alpha) and the nuisance part is ``-C^-1 B'`` times it. Others (alpha 0,
        or an own column nearly empty) are solved directly."""
        alpha = self._group_alpha
        size = gram.shape[1]
        diag = np.abs(np.diagonal(gram, axis1=1, axis2=2))      # (H', size)
        own_diag = diag[group_hrf, :m] + alpha[:, None]          # (G, m)
        scale = np.maximum(np.maximum(diag.max(axis=1)[group_hrf], own_diag.max(axis=1)), 1e-300)  # (G,)
        fast = (alpha > 0) & np.all(own_diag >= 1e-6 * scale[:, None], axis=1)
        weights = np.zeros((alpha.size, size))
        if fast.any():
            stable = _stabilised(gram.copy())
            a_block, b_block, c_block = stable[:, :m, :m], stable[:, :m, m:], stable[:, m:, m:]
            k = np.linalg.solve(c_block, b_block.transpose(0, 2, 1))       # (H', r, m) = C^-1 B'
            schur = a_block - b_block @ k
            # The own diagonal's stabiliser is 1e-9 x (A_ii + a): 1e-9 of A_ii is in ``stable`` already.
            lam, vec = np.linalg.eigh(0.5 * (schur + schur.transpose(0, 2, 1)))
            g = np.flatnonzero(fast)
            h = group_hrf[g]
            shift = (1.0 + 1e-9) * alpha[g]
            own = np.einsum("gij,gj->gi", vec[h], vec[h, at, :] / (lam[h] + shift[:, None]))
            weights[g, :m] = own
            weights[g, m:] = -np.einsum("grm,gm->gr", k[h], own)
        slow = np.flatnonzero(~fast)
        if slow.size:
            system = gram[group_hrf[slow]]
            system[:, np.arange(m), np.arange(m)] += alpha[slow, None]
            _stabilised(system)
            unit = np.zeros((slow.size, size, 1))
            unit[:, at, 0] = 1.0
            weights[slow] = np.linalg.solve(system, unit)[:, :, 0]
        return weights

    def _motion_prior(self):
        """(strength, (n_motion, V) coefficients) of the motion prior, or None (no prior configured or stored)."""
        coef = getattr(self.calibration_, "motion_coef", None)
        if not self.config_.motion_prior or coef is None or coef.shape[1] != self._n_motion:
            return None
        if getattr(self, "_motion_coef_t", None) is None or self._motion_coef_t[0] is not coef:
            self._motion_coef_t = (coef, np.ascontiguousarray(np.asarray(coef, dtype=np.float64).T))
        return self.config_.motion_prior, self._motion_coef_t[1]

    def _package(self, j: int, kind: str, n_volumes: int, beta: np.ndarray) -> TrialEstimate:
        cal, cfg = self.calibration_, self.config_
        if cfg.zscore:
            beta = (beta - cal.beta_mean) / cal.beta_std
        ev = self.events_
        return TrialEstimate(run=self.run_, trial=j, trial_type=ev.trial_types[j], onset=float(ev.onsets[j]),
                             kind=kind, n_volumes=n_volumes, betas=np.asarray(beta, dtype=np.float32),
                             zscored=bool(cfg.zscore), last_volume=self._frames[-1] if self._frames else -1)

    def end_run(self, n_volumes: int | None = None) -> list[TrialEstimate]:
        """Finish the run: a "final" estimate of every trial that has started, refitted as the offline fit would
        (the run's own noise components, ridge fractions), from the volumes that arrived."""
        self._require_run()
        self._active = False
        if not self._frames:
            return []
        cal, cfg = self.calibration_, self.config_
        if not cfg.final_ridge:
            cal = dataclasses.replace(cal, frac=np.ones_like(cal.frac), ridge_alpha=None, scale_offset=None)
        elif cfg.snr_ridge and cal.snr_alpha is not None:
            cal = dataclasses.replace(cal, model="d", ridge_alpha=cal.snr_alpha, scale_offset=cal.snr_scale_offset)
        frames = np.asarray(self._frames, dtype=np.int64)
        n_frames = max(int(frames[-1]) + 1, int(n_volumes or 0))
        motion = np.stack(self._motion_rows) if self._n_motion else None
        rows = np.stack(self._rows)
        pool_rows = np.stack(self._pool_rows)
        if any(index.size for index in self._not_acquired):
            # The run is over: voxels a volume lacked take their level over the whole run, as offline.
            level = self._level.level().astype(np.float32)
            for p, index in enumerate(self._not_acquired):
                rows[p, index] = level[index]
            if not self._pool_external:
                pool_rows = np.stack([self._pool_values(row) for row in rows])
        coef = self._pool[4]
        if cfg.final_denoise and coef is not None and coef.shape[1]:
            rows = self._denoised(rows, pool_rows, coef)
        betas = fit_run_frozen(cal, rows, self.events_, frames=frames, n_frames=n_frames, motion=motion,
                               tr=self.tr_, noise_data=pool_rows if self._pool_external else None)
        return [self._package(j, "final", int(self._n_post[j]), betas[j].astype(np.float64))
                for j in np.flatnonzero(self._n_post > 0)]

    def not_acquired_counts(self) -> np.ndarray:
        """Per voxel, how many volumes of the current (or last) run lacked it (NaN in the data vector) (V,)."""
        if not hasattr(self, "_level"):
            return np.zeros(0, dtype=np.int64)  # no run started
        return np.asarray(len(self._frames) - self._level.count, dtype=np.int64)

    def _denoised(self, rows: np.ndarray, pool_rows: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """The run's volumes (T, V) minus each voxel's calibration-predicted shared noise: its frozen coefficients
        times the live noise regressors, computed volume by volume as in the early estimates (back in raw units)."""
        comps = self._live_components(pool_rows).astype(np.float32)
        unit = (self.calibration_.mean / 100.0).astype(np.float32)
        coef = np.asarray(coef, dtype=np.float32)
        out = np.empty_like(rows)
        for start in range(0, rows.shape[0], 64):
            out[start:start + 64] = rows[start:start + 64] - (comps[start:start + 64] @ coef.T) * unit
        return out

    # --- live revisions of the run's events ----------------------------------------------------------------------

    def revise_events(self, run_events, origin=None) -> list[TrialEstimate]:
        """Replace the events of the run in progress, e.g. with the onsets the stimulus computer reported.

        ``run_events``: the run's trials in onset order (anything :meth:`RunEvents.coerce` accepts). ``origin[i]``:
        the index, in the current events, of the trial that new trial ``i`` is (``-1``: a trial that is not among
        them, e.g. shown but not planned); by default trials with the same onset, duration and type are the same
        trial and all others are new. Current trials that no new trial comes from are dropped (planned, not shown).

        The running sums that involve trials are rebuilt from the run's retained volumes: rows of trials whose
        timing did not change are carried over, those of moved and new trials are recomputed over the volumes their
        regressors reach, and the trial-by-trial terms (small) are recomputed; the nuisance sums do not depend on
        the events and stay. The result equals a run started with the new events (same volumes, same drift scale).

        Returns ``"revised"`` estimates (from all volumes so far) of the trials whose last emitted estimate used a
        volume that the change reaches, so that estimate would be different now, and ``"early"`` estimates of
        trials that are due and never had one (e.g. an event reported after its volumes). Trial indices are those
        of the new events; dropped trials get nothing (the caller withdraws what they were sent).
        """
        self._require_run()
        new = RunEvents.coerce(run_events)
        if np.any(np.diff(new.onsets) < 0):
            raise GLMInputError("run_events", "trials must be in onset order")
        old = self.events_
        origin = self._match_origin(old, new) if origin is None else np.asarray(origin, dtype=np.int64).ravel()
        if origin.size != len(new):
            raise GLMInputError("origin", f"has {origin.size} entries for {len(new)} trials")
        linked = origin[origin >= 0]
        if np.any(origin >= len(old)) or np.any(origin < -1) or np.unique(linked).size != linked.size:
            raise GLMInputError("origin", f"must be distinct indices into the {len(old)} current trials, or -1")
        same = origin >= 0
        same[same] = (np.isclose(old.onsets[origin[same]], new.onsets[same], rtol=0.0, atol=1e-9)
                      & np.isclose(old.durations[origin[same]], new.durations[same], rtol=0.0, atol=1e-9))
        gone = np.setdiff1d(np.arange(len(old)), origin[same])  # moved or dropped: their old rows leave the sums
        if not gone.size and same.all() and len(new) == len(old):
            self.events_ = new  # only labels changed
            return []
        frames = np.asarray(self._frames, dtype=np.int64)
        touched = self._frames_reached(frames, old, gone) | self._frames_reached(frames, new, np.flatnonzero(~same))
        # An emitted estimate is out of date when a volume it used is one that the change reaches (a regressor
        # there moved, appeared or went); estimates made before that volume are what the new events give too.
        first_touched = frames[touched][0] if touched.any() else None
        stale = [j for j in np.flatnonzero(self._emitted > 0)
                 if first_touched is not None and self._last_emitted_volume(frames, old, j) >= first_touched]
        self._install_events(new, origin, same, gone, frames)
        new_index = {int(o): i for i, o in enumerate(origin) if o >= 0}
        out = [self.estimate(new_index[j], "revised") for j in stale if j in new_index]  # dropped ones get none
        for i in np.flatnonzero((self._emitted == 0) & (self._n_post >= self.config_.early_volumes)):
            out.append(self.estimate(int(i), "early"))
        return sorted(out, key=lambda e: e.trial)

    def _last_emitted_volume(self, frames: np.ndarray, events: RunEvents, j: int) -> int:
        """Index of the newest volume in trial ``j``'s last emitted estimate (the ``_emitted[j]``-th retained volume
        at or after its onset)."""
        after = frames[(frames + self.calibration_.slice_time_ref) * self.tr_ >= events.onsets[j]]
        n = int(self._emitted[j])
        return int(after[n - 1]) if 0 < n <= after.size else int(frames[-1])

    @staticmethod
    def _match_origin(old: RunEvents, new: RunEvents) -> np.ndarray:
        """Each new trial's index among the old ones with the same onset, duration and type (-1: none)."""
        free = {}
        for j in range(len(old)):
            free.setdefault((round(float(old.onsets[j]), 9), round(float(old.durations[j]), 9),
                             old.trial_types[j]), []).append(j)
        origin = np.full(len(new), -1, dtype=np.int64)
        for i in range(len(new)):
            key = (round(float(new.onsets[i]), 9), round(float(new.durations[i]), 9), new.trial_types[i])
            if free.get(key):
                origin[i] = free[key].pop(0)
        return origin

    def _raw_rows(self, frames: np.ndarray, events: RunEvents, table: np.ndarray | None,
                  trials: np.ndarray | None = None) -> np.ndarray:
        """(H, len(frames), trials) regressors at volume indices ``frames`` (table rows where it reaches)."""
        trials = np.arange(len(events)) if trials is None else trials
        out = np.zeros((self._hrfs.n_hrfs, frames.size, trials.size))
        inside = frames < self._n_table
        if table is not None and inside.any():
            out[:, inside] = table[:, frames[inside]][:, :, trials]
        rest = ~inside if table is not None else np.ones(frames.size, dtype=bool)
        if rest.any():
            t = (frames[rest] + self.calibration_.slice_time_ref) * self.tr_
            out[:, rest] = self._hrfs.regressors(t, events.onsets[trials], events.durations[trials])
        return out

    def _walk_replay(self, frames: np.ndarray, values: np.ndarray, drop: bool = False):
        """The rows ``values`` (T, ...) of the retained volumes as :meth:`add_volume` entered them with a random-walk
        baseline (Kalman innovations, then AR(1)), element by element the same operations. ``drop``: columns are
        (H, trials) and a trial's state is dropped below ``WALK_DROP`` as online. Returns (whitened rows, the
        filter state after the last volume, the last volume's weighted innovations)."""
        q, rho = self.config_.drift_walk, self.config_.ar_rho
        state = np.zeros(values.shape[1:])
        innov = np.zeros_like(values, dtype=np.float64)
        weights = np.zeros(frames.size)
        p, last = np.inf, (int(frames[0]) - 1 if frames.size else 0)
        for t, f in enumerate(frames):
            p += q * (int(f) - last - 1)
            last = int(f)
            if np.isinf(p):
                gain, weights[t], p = 1.0, 0.0, 1.0 + q
            else:
                d = p + 1.0
                gain, weights[t], p = p / d, 1.0 / np.sqrt(d), p / d + q
            v = values[t] - state
            new = state + gain * v
            if drop:
                new[:, np.all(np.abs(new) < WALK_DROP, axis=0)] = 0.0
            state = new
            innov[t] = weights[t] * v
        if not rho:
            return innov, state, (innov[-1] if frames.size else None)
        follows = np.zeros(frames.size, dtype=bool)
        follows[1:] = (np.diff(frames) == 1) & (weights[:-1] != 0)
        out = np.sqrt(1.0 - rho * rho) * innov
        out[follows] = innov[follows] - rho * innov[np.flatnonzero(follows) - 1]
        return out, state, (innov[-1] if frames.size else None)

    def _chain(self, frames: np.ndarray) -> tuple[np.ndarray, float]:
        """Which retained volumes follow their predecessor (AR(1) chain continues) and the restart scale."""
        rho = self.config_.ar_rho
        follows = np.zeros(frames.size, dtype=bool)
        follows[1:] = np.diff(frames) == 1
        return follows, (np.sqrt(1.0 - rho * rho) if rho else 1.0)

    def _whitened_rows(self, frames: np.ndarray, events: RunEvents, table: np.ndarray | None,
                       trials: np.ndarray | None = None) -> np.ndarray:
        """The trial rows every retained volume added to the sums under ``events`` (prewhitened as in add_volume)."""
        rows = self._raw_rows(frames, events, table, trials)
        if self.config_.drift_walk:
            return self._walk_replay(frames, rows.transpose(1, 0, 2), drop=True)[0].transpose(1, 0, 2)
        rho = self.config_.ar_rho
        if not rho:
            return rows
        follows, c = self._chain(frames)
        previous = self._raw_rows(frames[follows] - 1, events, table, trials)
        out = c * rows
        out[:, follows] = rows[:, follows] - rho * previous
        return out

    def _frames_reached(self, frames: np.ndarray, events: RunEvents, trials: np.ndarray) -> np.ndarray:
        """Retained volumes whose (whitened) rows of ``trials`` are not all zero."""
        if not trials.size or not frames.size:
            return np.zeros(frames.size, dtype=bool)
        table = self._table if events is self.events_ else None
        return np.any(self._whitened_rows(frames, events, table, trials) != 0, axis=(0, 2))

    def _whitened_data(self, frames: np.ndarray, positions: np.ndarray,
                       with_nuisance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(% signal change rows, nuisance rows or None) of the retained volumes at ``positions`` (indices into
        ``frames``), prewhitened as they entered the sums in :meth:`add_volume`."""
        if self.config_.drift_walk:  # every volume's innovation depends on all before it
            data = np.stack([r.astype(np.float64) * self._scale - 100.0 * (self._scale > 0) for r in self._rows])
            data = self._walk_replay(frames, data)[0][positions]
            nuis = self._walk_replay(frames, self._raw_nuisance(frames))[0][positions] if with_nuisance else None
            return data, nuis
        rho = self.config_.ar_rho
        follows, c = self._chain(frames)

        def psc(p: int) -> np.ndarray:
            return self._rows[p].astype(np.float64) * self._scale - 100.0 * (self._scale > 0)

        def nuisance(p: int, value: np.ndarray) -> np.ndarray:
            return self._nuisance_row(int(frames[p]), self._pool_rows[p],
                                      self._motion_rows[p] if self._n_motion else None)

        data = np.zeros((positions.size, self.calibration_.n_voxels))
        nuis = np.zeros((positions.size, self._ny.shape[0])) if with_nuisance else None
        for n, p in enumerate(positions):
            current = psc(p)
            if rho and follows[p]:
                before = psc(p - 1)
                data[n] = current - rho * before
                if with_nuisance:
                    nuis[n] = nuisance(p, current) - rho * nuisance(p - 1, before)
            else:
                scale = c if rho else 1.0
                data[n] = scale * current
                if with_nuisance:
                    nuis[n] = scale * nuisance(p, current)
        return data, nuis

    def _raw_nuisance(self, frames: np.ndarray) -> np.ndarray:
        """(T, p) nuisance rows of the retained volumes before any filter."""
        return np.stack([self._nuisance_row(int(f), self._pool_rows[p], self._motion_rows[p] if self._n_motion else None)
                         for p, f in enumerate(frames)])

    def _whitened_nuisance(self, frames: np.ndarray) -> np.ndarray:
        """(T, p) nuisance rows of the retained volumes as they entered the sums. They do not depend on the events,
        so they are kept between revisions of a run and only new volumes are computed."""
        cache = getattr(self, "_nuisance_cache", None)
        if self.config_.drift_walk:
            return self._walk_replay(frames, self._raw_nuisance(frames))[0]
        if cache is None or cache[0] is not self._rows:  # a new run
            cache = self._nuisance_cache = (self._rows, [])
        done = cache[1]
        if len(done) < frames.size:
            _, nuis = self._whitened_data(frames, np.arange(len(done), frames.size), with_nuisance=True)
            done.extend(nuis)
        return np.asarray(done[:frames.size]).reshape(frames.size, self._ny.shape[0])

    def _install_events(self, new: RunEvents, origin: np.ndarray, same: np.ndarray, gone: np.ndarray,
                        frames: np.ndarray) -> None:
        cal = self.calibration_
        k = len(new)
        # The regressor table: unchanged trials' columns carried over, moved and new ones built.
        table = np.zeros((self._hrfs.n_hrfs, self._n_table, k))
        table[:, :, same] = self._table[:, :, origin[same]]
        if (~same).any():
            table[:, :, ~same] = self._hrfs.regressors((np.arange(self._n_table) + cal.slice_time_ref) * self.tr_,
                                                       new.onsets[~same], new.durations[~same])
        xy = np.zeros((k, cal.n_voxels))
        xy[same] = self._xy[origin[same]]
        emitted = np.zeros(k, dtype=np.int64)
        emitted[origin >= 0] = self._emitted[origin[origin >= 0]]
        h = self._hrfs.n_hrfs
        if self._ny is None:  # no volume yet: nothing to rebuild
            self._xx, self._xs, self._ss = np.zeros((h, k, k)), np.zeros((h, k)), np.zeros(h)
            self._sy = np.zeros(cal.n_voxels)
        else:
            rows = self._whitened_rows(frames, new, table)  # (H, T, K)
            total = rows.sum(axis=2)
            nuis = self._whitened_nuisance(frames)
            sy = self._sy - self._xy[gone].sum(axis=0)
            whole = None
            for j in np.flatnonzero(~same):
                reached = np.flatnonzero(np.any(rows[:, :, j] != 0, axis=0))
                if reached.size:
                    if self.config_.drift_walk:  # one replay of the whole run serves every moved trial
                        if whole is None:
                            whole = self._whitened_data(frames, np.arange(frames.size))[0]
                        data = whole[reached]
                    else:
                        data, _ = self._whitened_data(frames, reached)
                    per_voxel = rows[:, reached, j][self._hrf_index]  # (V, n): each voxel's own HRF
                    xy[j] = np.einsum("vn,nv->v", per_voxel, data)
                sy += xy[j]
            self._sy = sy
            transposed = rows.transpose(0, 2, 1)
            self._xx = transposed @ rows
            self._xs = self._xx.sum(axis=2)
            self._ss = (total ** 2).sum(axis=1)
            self._xn = transposed @ nuis
            self._sn = total @ nuis
        self._xy = xy
        self._table = table
        self._support = np.array([self._hrfs.support(d) for d in new.durations])
        self.events_ = new
        t = (frames + cal.slice_time_ref) * self.tr_
        self._n_post = (t[None, :] >= new.onsets[:, None]).sum(axis=1).astype(np.int64)
        self._emitted = emitted
        if self._previous is not None and self.config_.drift_walk:
            # The filter state of every trial and the last volume's innovations, as if the run had these events.
            raw = self._raw_rows(frames, new, table).transpose(1, 0, 2)
            _, state, last = self._walk_replay(frames, raw, drop=True)
            self._walk["x"] = state
            both = np.flatnonzero(np.any(last != 0, axis=0))
            index, psc, nuis_row, _, _, weight = self._previous
            self._previous = (index, psc, nuis_row, both, last[:, both], weight)
        elif self._previous is not None:
            index, psc, nuis_row, _ = self._previous
            t_last = (index + cal.slice_time_ref) * self.tr_
            active = np.flatnonzero((new.onsets <= t_last) & (t_last <= new.onsets + self._support))
            self._previous = (index, psc, nuis_row, active)


def _stabilised(systems: np.ndarray) -> np.ndarray:
    """``systems`` (G, n, n) with the relative 1e-9 ridge of :meth:`RealtimeGLM._group_weights` added in place: 1e-9
    of each column's own weight, at least 1e-6 of the system's largest."""
    diag = np.abs(np.diagonal(systems, axis1=1, axis2=2))
    scale = np.maximum(diag.max(axis=1, keepdims=True), 1e-300)
    eye = np.arange(systems.shape[1])
    systems[:, eye, eye] += 1e-9 * np.maximum(diag, 1e-6 * scale)
    return systems
