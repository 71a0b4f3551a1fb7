"""Configuration of the preprocessing stage (motion correction and masks).

:class:`MotionConfig` covers two engines on the same objective (mean squares on a fixed random sample of about 2000
points inside a head mask (10000 for numba), one full-resolution level, started from the previous volume's estimate, linear reslice):
``sitk`` is the real-time SimpleITK setting measured in the brief (section 2: versor rigid transform, ~15 regular
gradient steps, one ITK thread, which beat two with another process busy on a 2-core machine); ``numba`` (the
default) solves it by inverse-compositional Gauss-Newton, which measured faster, as accurate and more robust to large
jumps (docs/preprocess.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from rt_mindeye.config import setting


DEFAULT_SAMPLE_POINTS = {"numba": 10_000, "sitk": 2_000}


@dataclass(frozen=True)
class MotionConfig:
    """Per-volume rigid motion correction against a fixed reference volume."""

    engine: str = setting(
        "numba", "registration engine: 'numba' (inverse-compositional Gauss-Newton on the mean-squares objective,"
        " numba reslice; faster and more robust to large jumps, see docs/preprocess.md) or 'sitk' (SimpleITK versor"
        " rigid + regular-step gradient descent, the setting measured in the brief)", choices=("sitk", "numba"))
    n_sample_points: int | None = setting(
        None, "random points inside the head mask where the mean-squares metric is evaluated; none = the engine's"
        " default: 10000 for numba (a point costs nanoseconds; 2000 -> 10000 halved the phantom errors) and 2000"
        " for sitk (the brief's setting; ITK's per-point cost is high)", min=100, max=1_000_000)
    n_iterations: int = setting(
        15, "maximum optimizer iterations per volume (gradient steps for sitk, Gauss-Newton steps for numba)", min=1,
        max=1000)
    learning_rate: float = setting(
        0.5, "sitk: first (largest) step length of the regular-step gradient descent in parameter space (mm for"
        " the translations)",
        min=1e-4, max=20.0)
    min_step: float = setting(
        1e-3, "sitk: the optimizer stops once its step length shrinks below this", min=1e-7, max=1.0)
    relaxation_factor: float = setting(
        0.5, "sitk: factor the step is multiplied by when the gradient changes direction", min=0.05, max=0.99)
    rotation_scale: float = setting(
        0.1, "sitk: optimizer scale of the rotation (versor) parameters relative to their physical-shift estimate"
        " (2 x RMS head radius)^2; below 1 lets rotations take larger steps (0.1 converged best in 15 steps)",
        min=1e-4, max=100.0)
    gradient_tolerance: float = setting(
        1e-8, "sitk: the optimizer stops when the scaled gradient magnitude falls below this", min=0.0, max=1.0)
    threads: int = setting(
        1, "ITK threads for registration and reslice of the sitk engine (1 beat 2 on a loaded 2-core machine);"
        " the numba engine is single-threaded", min=1, max=256)
    reslice_interpolation: str = setting(
        "linear", "interpolator used to reslice each volume into the reference space",
        choices=("nearest", "linear", "bspline", "lanczos"))
    full_reslice: bool = setting(
        True, "reslice the whole volume into MotionResult.volume; false = only the voxel mask given to fit"
        " (MotionResult.voxels), far cheaper when the GLM only needs a few thousand voxels")
    mask_threshold: float = setting(
        0.15, "head mask for sampling: voxels above this fraction of the reference's 98th percentile", min=0.0,
        max=1.0)
    seed: int = setting(20240601, "seed of the random metric sample (fixed so runs are reproducible)", min=0)
    align_session_start: str = setting(
        "auto", "before the first live volume, register the calibration reference to it with a careful "
                "multi-resolution fit (align_reference) and start motion correction from that pose, so masks and "
                "calibration choices carry over to a session on another day: 'auto' = when the calibration bundle "
                "comes from another session, 'always', 'never'", choices=("auto", "always", "never"))
    fd_radius_mm: float = setting(
        50.0, "head radius turning rotations into displacement for framewise displacement (Power et al.)", min=1.0,
        max=200.0)
    fd_thresholds_mm: tuple[float, float, float] = setting(
        (0.2, 0.3, 0.4), "framewise-displacement thresholds (FIRMM's 0.2 / 0.3 / 0.4 mm) for flagging volumes")
    gate_fd_mm: float = setting(
        0.4, "motion gate: a trial whose largest framewise displacement over its window (gate_window_s from its "
             "onset) exceeds this is marked on the console and in the results and left out of calibration "
             "fine-tuning. FIRMM's most lenient level, because the gate takes the maximum over a window of volumes "
             "and a trial is discarded, not a volume censored (docs/preprocess.md)", min=0.0, max=10.0)
    gate_window_s: float = setting(
        12.0, "seconds from a trial's onset over which its motion counts for the gate: the stimulus and the rise and "
              "peak of its response", min=0.0, max=60.0)

    @property
    def sample_points(self) -> int:
        """``n_sample_points`` with the engine's default filled in."""
        if self.n_sample_points is not None:
            return self.n_sample_points
        return DEFAULT_SAMPLE_POINTS[self.engine]

    def __post_init__(self) -> None:
        thresholds = tuple(self.fd_thresholds_mm)
        if any(t <= 0 for t in thresholds) or list(thresholds) != sorted(thresholds):
            raise ValueError(f"fd_thresholds_mm must be positive and increasing, got {list(thresholds)}")


@dataclass(frozen=True)
class AlignConfig:
    """The one slower, more careful registration at session start (calibration reference -> today's first volume)."""

    shrink_factors: tuple[int, ...] = setting((4, 2, 1), "pyramid shrink factors, coarse to fine")
    smoothing_sigmas_mm: tuple[float, ...] = setting((4.0, 2.0, 0.0), "Gaussian smoothing per pyramid level, mm")
    sampling_fraction: float = setting(0.2, "fraction of the head-masked voxels used by the metric", min=0.001,
                                       max=1.0)
    n_iterations: int = setting(200, "maximum iterations per level", min=1, max=10_000)
    metric: str = setting(
        "mattes", "similarity metric: Mattes mutual information copes with intensity changes between sessions;"
        " mean squares is faster for identical contrast", choices=("mattes", "meansquares", "correlation"))
    threads: int = setting(2, "ITK threads (done once, before the live run, so it may use every core)", min=1,
                           max=256)
    seed: int = setting(20240601, "seed of the random metric sample", min=0)

    def __post_init__(self) -> None:
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm must have the same length, got "
                             f"{len(self.shrink_factors)} and {len(self.smoothing_sigmas_mm)}")


@dataclass(frozen=True)
class MaskConfig:
    """Which voxels go to the GLM and decoder."""

    anatomical_mask: str | None = setting(
        None, "NIfTI mask in session (calibration reference) space, e.g. nsdgeneral; none = all voxels")
    reliability_threshold: float | None = setting(
        None, "keep voxels whose repeat reliability is at least this (none = no reliability selection)", min=-1.0,
        max=1.0)
    reliability_top_n: int | None = setting(
        None, "instead of a threshold, keep this many most reliable voxels (e.g. 8627 or 2792 as in real-time"
        " MindEye)", min=1)
    reliability_method: str = setting(
        "pairwise", "reliability score: mean pairwise correlation between repeats, or split-half correlation",
        choices=("pairwise", "split_half"))
    min_repeats: int = setting(2, "images shown fewer times than this are ignored by the reliability score", min=2)
    resample_order: int = setting(
        0, "interpolation order when carrying a session-space mask into today's space (0 = nearest)", min=0, max=1)

    def __post_init__(self) -> None:
        if self.reliability_threshold is not None and self.reliability_top_n is not None:
            raise ValueError("give reliability_threshold or reliability_top_n, not both")
