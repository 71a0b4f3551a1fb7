"""Configuration of the phantom: one frozen dataclass, two presets (``small`` for tests, ``realistic`` for benchmarks).

Every field is a :func:`~rt_mindeye.config.setting` with a documented range, so a YAML section ``phantom:`` loads
through :func:`rt_mindeye.config.from_mapping` and :func:`phantom_config` can override any field of a preset::

    cfg = phantom_config("small", n_runs=3, motion_max_mm=0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rt_mindeye.config import from_mapping, setting, to_mapping
from rt_mindeye.errors import ConfigError


@dataclass(frozen=True)
class PhantomConfig:
    preset: str = setting("custom", "name of the preset this configuration came from (informational)")

    # --- acquisition geometry -----------------------------------------------------------------------------------
    matrix: tuple[int, int, int] = setting((32, 32, 16), "acquisition matrix (i, j, k) = (columns, rows, slices) "
                                                                  "of each volume")
    voxel_size_mm: tuple[float, float, float] = setting(
        (4.0, 4.0, 4.0), "voxel size along i, j, k (column spacing, row spacing, slice spacing) in mm")
    slab_center_mm: tuple[float, float, float] = setting(
        (0.0, -35.0, 8.0), "RAS+ world position (mm) of the centre of the imaged slab (the head's brain centre is "
                           "near the world origin)")
    slice_tilt_deg: float = setting(8.0, "oblique tilt of the axial slices about the left-right axis (degrees), as "
                                         "for an AC-PC aligned slab", min=-30.0, max=30.0)
    head_scale: float = setting(1.0, "size of the head relative to an adult head (small presets shrink it to fit "
                                     "their field of view)", min=0.3, max=1.5)
    tr_s: float = setting(1.5, "repetition time in seconds", min=0.2, max=10.0)
    echo_time_ms: float = setting(30.0, "echo time written to the DICOM headers (ms)", min=1.0, max=200.0)
    slice_timing: bool = setting(False, "sample each slice's response at its own acquisition time (interleaved "
                                        "order); False samples every slice at the volume's start")

    # --- design ---------------------------------------------------------------------------------------------------
    n_runs: int = setting(4, "number of runs (series) in the session", min=1, max=64)
    calibration_runs: int = setting(2, "how many leading runs are calibration runs (the rest are real-time runs)",
                                    min=0, max=64)
    trials_per_run: int = setting(20, "image trials per run", min=1, max=500)
    stim_duration_s: float = setting(3.0, "image presentation time (s)", min=0.1, max=30.0)
    isi_s: float = setting(1.0, "mean blank interval between images (s)", min=0.0, max=30.0)
    isi_jitter_s: float = setting(0.5, "the blank interval is drawn uniformly within isi_s +/- isi_jitter_s",
                                  min=0.0, max=15.0)
    rest_start_s: float = setting(6.0, "blank period before the first trial of a run (s)", min=0.0, max=120.0)
    rest_end_s: float = setting(12.0, "blank period after the last trial of a run (s)", min=0.0, max=120.0)
    repeated_images: int = setting(10, "number of images shown several times (in different runs)", min=0)
    repeats: int = setting(3, "how many times each repeated image is shown", min=1, max=64)
    test_repeated_images: int = setting(
        0, "further repeated images whose repeats all fall in the real-time runs (never in a calibration run), "
           "like MindEye2's held-out test images: a decoder can be scored on their repeat-averaged betas", min=0)
    first_series: int = setting(5, "DICOM SeriesNumber of the first run; later runs count up from it", min=1,
                                max=9999)
    run_gap_s: float = setting(90.0, "clock time between the end of a run and the start of the next (s)",
                               min=0.0, max=7200.0)

    # --- subject / brain ------------------------------------------------------------------------------------------
    visual_voxels: int = setting(450, "target size of the visual-cortex mask (voxels); subjects vary around it",
                                 min=10, max=200_000)
    visual_voxels_jitter: float = setting(0.15, "relative spread of the visual-mask size across subjects",
                                          min=0.0, max=0.5)
    responsive_fraction: float = setting(0.7, "fraction of visual voxels that respond to images", min=0.0, max=1.0)
    mean_response_psc: float = setting(1.5, "typical response to any image, % signal change (voxels vary "
                                            "log-normally around it)", min=0.0, max=20.0)
    image_modulation: float = setting(0.6, "image-specific response spread relative to the mean response",
                                      min=0.0, max=5.0)
    trial_variability: float = setting(0.4, "trial-to-trial (neural) variability of the response to the same image, "
                                            "relative to the mean response; with the scanner noise it sets the "
                                            "betas' single-trial reliability (docs/phantom.md: calibrated to 3T "
                                            "values)", min=0.0, max=5.0)
    driving_network: str = setting(
        "efficientnet-lite2", "pretrained network whose features drive the mid and high tuning tiers; not the "
                              "decoder's target embedder (EfficientNet-Lite0), so decoding is not scored against the "
                              "network that made the brain (lite0 reproduces the earlier, inflated phantom)",
        choices=("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"))
    tuning_nonlinearity: str = setting(
        "rectified", "how a voxel mixes the network's features: 'rectified' pools half-rectified units (a "
                     "non-linear mixture no linear read-out inverts exactly), 'linear' a plain linear mixture",
        choices=("rectified", "linear"))
    hrf_spread: float = setting(3.0, "spread (in library indices) of the per-voxel HRF choice around the "
                                     "subject's typical HRF", min=0.0, max=20.0)

    # --- noise ----------------------------------------------------------------------------------------------------
    thermal_noise_psc: float = setting(1.0, "white scanner noise (the same everywhere, as in a magnitude image), "
                                            "% of the grey-matter intensity", min=0.0, max=50.0)
    ar_noise_psc: float = setting(0.8, "autocorrelated (AR(1)) physiological noise in the brain, % signal",
                                  min=0.0, max=50.0)
    ar_rho: float = setting(0.5, "AR(1) coefficient of that noise per TR", min=0.0, max=0.99)
    physio_components: int = setting(4, "number of shared physiological noise components (respiration, cardiac, "
                                        "low-frequency global signal)", min=0, max=32)
    physio_psc: float = setting(0.6, "amplitude of each shared component, % signal", min=0.0, max=20.0)
    drift_order: int = setting(2, "polynomial order of the slow scanner drift", min=0, max=5)
    drift_psc: float = setting(1.0, "size of the drift over a run, % signal", min=0.0, max=50.0)

    # --- head motion ----------------------------------------------------------------------------------------------
    motion_max_mm: float = setting(1.5, "largest translation from the reference position (mm)", min=0.0, max=20.0)
    motion_max_deg: float = setting(1.5, "largest rotation from the reference position (degrees)", min=0.0,
                                    max=20.0)
    jerk_rate: float = setting(0.02, "probability per volume of a sudden head jerk", min=0.0, max=1.0)
    interpolation_order: int = setting(1, "spline order used to resample the moved head (1 linear, 3 cubic)",
                                       min=0, max=5)

    # --- stimuli --------------------------------------------------------------------------------------------------
    image_size: int = setting(224, "stimulus size in pixels (square RGB)", min=32, max=1024)
    stimulus_offset: int = setting(0, "first index of the global stimulus sequence this session uses (sessions with "
                                      "different offsets show different images, e.g. for multi-subject pretraining)",
                                   min=0, max=1_000_000)

    def __post_init__(self):
        if self.calibration_runs > self.n_runs:
            raise ValueError(f"calibration_runs ({self.calibration_runs}) exceeds n_runs ({self.n_runs})")
        if self.repeated_images and self.repeats > self.n_runs:
            raise ValueError(f"repeats ({self.repeats}) exceeds n_runs ({self.n_runs}): repeats go to different runs")
        if self.test_repeated_images and self.repeats > self.n_runs - self.calibration_runs:
            raise ValueError(f"repeats ({self.repeats}) exceeds the {self.n_runs - self.calibration_runs} real-time "
                             f"runs: test_repeated_images repeat in distinct real-time runs")
        if self.isi_jitter_s > self.isi_s:
            raise ValueError(f"isi_jitter_s ({self.isi_jitter_s}) exceeds isi_s ({self.isi_s})")
        total = self.n_runs * self.trials_per_run
        if (self.repeated_images + self.test_repeated_images) * self.repeats > total:
            raise ValueError(f"(repeated_images + test_repeated_images) x repeats "
                             f"({(self.repeated_images + self.test_repeated_images) * self.repeats}) exceeds the "
                             f"number of trials ({total})")
        live_slots = (self.n_runs - self.calibration_runs) * self.trials_per_run
        if self.test_repeated_images * self.repeats > live_slots:
            raise ValueError(f"test_repeated_images x repeats exceeds the real-time runs' {live_slots} trials")

    @property
    def n_trials(self) -> int:
        return self.n_runs * self.trials_per_run

    @property
    def n_images(self) -> int:
        """Distinct images the session shows (repeated ones once, plus one per remaining trial)."""
        repeated = self.repeated_images + self.test_repeated_images
        return repeated + (self.n_trials - repeated * self.repeats)


PRESETS: dict[str, PhantomConfig] = {
    # Seconds to simulate: a 32x32x16 slab at 4 mm through the occipital lobe of a shrunken head.
    "small": PhantomConfig(
        preset="small", matrix=(32, 32, 16), voxel_size_mm=(4.0, 4.0, 4.0), slab_center_mm=(0.0, -25.0, 2.0),
        head_scale=0.7, n_runs=4, calibration_runs=2, trials_per_run=20, rest_start_s=4.5, rest_end_s=12.0,
        repeated_images=10, repeats=3, visual_voxels=450, physio_components=3),
    # Prisma-like whole-brain 2 mm EPI and the 3T real-time MindEye design (11 runs of 63 trials, TR 1.5 s).
    "realistic": PhantomConfig(
        preset="realistic", matrix=(104, 104, 72), voxel_size_mm=(2.0, 2.0, 2.0), slab_center_mm=(0.0, -12.0, 4.0),
        head_scale=1.0, n_runs=11, calibration_runs=3, trials_per_run=63, rest_start_s=6.0, rest_end_s=30.0,
        repeated_images=50, repeats=3, visual_voxels=20_000, thermal_noise_psc=1.2, physio_components=5),
}


def phantom_config(preset: str = "small", **overrides: Any) -> PhantomConfig:
    """A preset with any fields overridden, validated like a YAML file would be (raises ConfigError)."""
    if preset not in PRESETS:
        raise ConfigError("<phantom>", "preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    data = to_mapping(PRESETS[preset])
    data.update(to_mapping(overrides))
    return from_mapping(PhantomConfig, data, source=f"<phantom preset {preset}>", prefix="phantom")


def config_to_dict(config: PhantomConfig) -> dict:
    return to_mapping(config)


def replace(config: PhantomConfig, **changes: Any) -> PhantomConfig:
    """``dataclasses.replace`` with validation."""
    data = to_mapping(config)
    data.update(to_mapping(changes))
    return from_mapping(PhantomConfig, data, source="<phantom>", prefix="phantom")


__all__ = ["PhantomConfig", "PRESETS", "phantom_config", "config_to_dict", "replace"]
