"""Configuration of the single-trial GLM stage (offline calibration fit and real-time estimator)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rt_mindeye.config import setting

#: GLMsingle's default ridge fractions: 1.00, 0.95, ..., 0.05.
DEFAULT_FRACTIONS = tuple(round(1.0 - 0.05 * i, 2) for i in range(20))


@dataclass(frozen=True)
class RealtimeConfig:
    """How the live estimator emits, refines and finalises each trial's betas."""

    early_volumes: int = setting(
        5, "post-onset volumes that must have arrived before a trial's first ('early') estimate", min=1, max=60)
    refine_every: int = setting(2, "volumes between 'refined' estimates after the early one (0 = never refine)",
                                min=0, max=60)
    refine_until: int = setting(16, "post-onset volumes after which a trial is no longer refined before the end "
                                    "of the run", min=1, max=200)
    neighbors: int = setting(6, "trials either side of the estimated one that get their own regressor (LSA "
                                "locally); all other trials of the run share one regressor (LSS). 0 = pure LSS",
                             min=0, max=10)
    ridge: bool = setting(True, "shrink the trials' own regressors with each voxel's calibrated ridge parameter in "
                                "early/refined estimates (voxels grouped by HRF and by alpha in 25% steps)")
    max_drift_degree: int = setting(
        1, "highest polynomial drift degree used for early/refined estimates (the final one uses the calibration's "
           "degree); low orders keep the newest trial from being absorbed by the drift", min=0, max=10)
    drift_shrinkage: float = setting(
        0.01, "ridge on the non-constant drift columns of early/refined estimates, as a fraction of the constant "
              "column's weight (the volumes so far): early in the run the slope is mostly shrunk away (3 x this / "
              "(elapsed fraction of the run)^2 relative to its own information), once the run is long it is almost "
              "free, so the drift is not extrapolated into the newest trial's rising response. 0 = no penalty",
        min=0.0, max=100.0)
    ridge_floor: float = setting(
        0.1, "smallest ridge parameter of the trials' own columns in early/refined estimates, as a fraction of a "
             "whole trial regressor's sum of squares (voxels whose calibration kept fraction 1 get this much)",
        min=0.0, max=100.0)
    ar_rho: float = setting(
        0.2, "AR(1) coefficient of the noise used to prewhiten early/refined estimates: every volume's data and "
             "regressors minus ar_rho times the previous volume's (after a missing volume the chain restarts). "
             "One value for all voxels (0.2: SPM's classic global AR(1)); 0 = no prewhitening", min=0.0, max=0.9)
    drift_walk: float = setting(
        0.01, "random-walk (local-level) baseline of early/refined estimates: variance of the baseline's step per "
              "volume relative to the noise variance. Each volume's data and regressors enter the running sums as "
              "their Kalman innovations (minus a causal, exponentially forgetting estimate of the baseline, one gain "
              "for all voxels), then AR(1) prewhitening, so the newest trial rides on the baseline its own pre-trial "
              "volumes pin. Chosen on development sessions (flat from 0.003 to 0.03). 0 = none (constant + linear "
              "drift only)", min=0.0, max=10.0)
    ridge_prior_mean: bool = setting(
        True, "shrink the trials' own columns toward each voxel's calibration mean beta (its typical response to "
              "any image) instead of toward zero, so partially seen neighbours are not pulled to no response")
    noise_pcs: bool = setting(True, "use the calibration's noise components (frozen spatial loadings applied to "
                                    "the live noise pool) as nuisance regressors in early/refined estimates")
    use_motion: bool = setting(True, "use motion parameters passed to add_volume as nuisance regressors")
    noise_prior: float = setting(
        1.0, "live noise regressors (the calibration's live_noise_pcs spatial components applied to each volume's "
             "noise pool) get per-voxel coefficients shrunk toward the ones the calibration runs gave, with the weight "
             "of this many runs of data (0 = free coefficients, and only the calibration's cross-validated PC count)",
        min=0.0, max=1000.0)
    motion_prior: float = setting(
        1.0, "motion coefficients of early/refined estimates shrunk toward each voxel's calibration coefficients "
             "(their across-run mean, itself shrunk toward zero by its reliability across the calibration runs), "
             "with the weight of this many runs of data; 0 = no prior (motion columns shrunk toward zero like the "
             "drift slope). Needs a calibration fitted with motion in at least 2 runs", min=0.0, max=1000.0)
    snr_ridge: bool = setting(
        True, "own-trial ridge parameter of each voxel = its calibration noise variance / across-trial beta variance "
              "(the posterior mean under a Gaussian prior on the betas) instead of the alpha of its type-d ridge "
              "fraction; used in early/refined and end-of-run estimates")
    final_denoise: bool = setting(
        True, "end-of-run estimate: subtract each voxel's calibration-predicted shared noise (its frozen coefficients "
              "times the live noise regressors) before the refit")
    final_ridge: bool = setting(True, "apply the calibration's ridge fractions in the end-of-run estimate")
    zscore: bool = setting(True, "z-score each voxel's betas with the calibration betas' mean and standard deviation")


@dataclass(frozen=True)
class GLMConfig:
    """The single-trial GLM: model type, HRFs, drift, noise model, ridge, and the real-time estimator."""

    model: str = setting("d", "GLMsingle model type: a canonical HRF OLS, b per-voxel HRF from the library, "
                              "c plus GLMdenoise noise components, d plus fractional ridge", choices=("a", "b", "c", "d"))
    canonical_hrf: str = setting("glover", "HRF of model a and of the on-off model", choices=("glover", "spm"))
    slice_time_ref: float = setting(0.0, "where in each TR a volume is sampled, as a fraction of the TR "
                                         "(0 = start, as GLMsingle; 0.5 = middle of the acquisition)", min=0.0, max=1.0)
    drift_degree: int | None = setting(
        None, "polynomial drift degree per run; null = GLMsingle's rule round(run minutes / 2)", min=0, max=10)
    hrf_peak_at_tr: bool = setting(False, "scale each HRF to peak 1 among its samples at multiples of the TR after "
                                          "onset, as GLMsingle does (false: peak 1 of the continuous response)")
    max_pcs: int = setting(10, "largest number of noise principal components considered", min=0, max=30)
    n_pcs: int | None = setting(None, "use this many noise principal components instead of choosing the count by "
                                      "cross-validation (GLMsingle's pcstop = -n); null = cross-validate",
                                min=0, max=30)
    pc_stop: float = setting(round(1 / 1.05, 6), "choose the first PC count whose cross-validated improvement is "
                                                 "within this fraction of the best (GLMsingle's pcstop 1.05 = "
                                                 "0.952)", min=0.0, max=1.0)
    noise_pool_r2: float | None = setting(
        None, "on-off R^2 (0..1) below which a bright voxel joins the noise pool and above which a fitted voxel "
              "scores the PC count; null = where a two-Gaussian fit of the on-off R^2 crosses 50/50 (GLMsingle's "
              "findtailthreshold)", min=0.0, max=1.0)
    brain_percentile: float = setting(99.0, "percentile of mean intensity used for the brain threshold",
                                      min=0.0, max=100.0)
    brain_fraction: float = setting(0.1, "voxels with mean intensity below this fraction of the percentile are "
                                         "kept out of the noise pool", min=0.0, max=1.0)
    max_pool_voxels: int = setting(20000, "noise-pool voxels used for the principal components (evenly "
                                          "subsampled above this)", min=10)
    fractions: tuple[float, ...] = setting(default_factory=lambda: DEFAULT_FRACTIONS,
                                           doc="ridge fractions tried per voxel (type d)")
    n_alpha_grid: int = setting(120, "points of the log-spaced ridge-parameter grid used to map fractions to "
                                     "ridge parameters", min=10, max=2000)
    live_noise_pcs: int = setting(
        20, "types c/d: noise components (spatial loadings of the noise pool) frozen for the real-time estimator, "
            "with each voxel's coefficients on them in the calibration runs (at least the cross-validated PC count, "
            "at most 5 times it; none when the cross-validation chose no PCs)",
        min=0, max=100)
    chunk_voxels: int = setting(50000, "voxels per chunk of the single-trial fit (bounds its memory on whole-brain "
                                       "data; results do not depend on it)", min=1)
    refit_hrf: bool = setting(True, "types c/d: choose each voxel's HRF again with the chosen noise regressors in "
                                    "the model (GLMsingle keeps the type-b choice made without them)")
    prewhiten: float | None = setting(
        None, "AR(1) coefficient with which each run's data and designs are prewhitened (generalised least squares "
              "for autocorrelated noise); null = the noise pool's median lag-1 autocorrelation after the drift is "
              "removed; 0 = no prewhitening, as GLMsingle", min=0.0, max=0.95)
    rescale: bool = setting(True, "after ridge, scale and offset each voxel's betas to best match its unregularised "
                                  "betas (GLMsingle's wantautoscale; a negative scale falls back to 1, 0)")
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig, metadata={"doc": "real-time estimator"})

    def __post_init__(self):
        if not self.fractions:
            raise ValueError("fractions: must not be empty")
        for value in self.fractions:
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"fractions: each must be in (0, 1], got {value!r}")
