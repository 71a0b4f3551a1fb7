"""Haemodynamic response functions: GLMsingle's 20-HRF library and a canonical (Glover/SPM) HRF.

Every HRF here is first described at 0.1 s resolution for an instantaneous event. For a trial of duration ``d`` it is
convolved with a ``d``-second boxcar, scaled to peak 1 (so betas are in the data's units, % signal change here;
with ``peak_tr``, GLMsingle's scaling: peak 1 among the samples at multiples of the TR after onset) and then read
off at each volume's time with PCHIP interpolation, which keeps the shape monotone between samples and handles
onsets that do not fall on the TR grid.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.stats import gamma

#: Sampling interval of the HRF library and of every kernel built here (seconds).
HRF_DT = 0.1


@lru_cache(maxsize=1)
def load_hrf_library() -> np.ndarray:
    """GLMsingle's library, (501, 20): column ``h`` is HRF ``h`` sampled every 0.1 s from 0 to 50 s."""
    text = resources.files("rt_mindeye.data").joinpath("hrf_library_glmsingle.tsv").read_text()
    library = np.loadtxt(text.splitlines(), delimiter="\t", dtype=np.float64)
    library.setflags(write=False)
    return library


def gamma_difference_hrf(*, time_length: float = 32.0, delay: float = 6.0, undershoot: float = 16.0,
                         dispersion: float = 1.0, u_dispersion: float = 1.0, ratio: float = 0.167) -> np.ndarray:
    """A peak gamma minus a scaled undershoot gamma, sampled every :data:`HRF_DT` seconds, summing to 1."""
    t = np.arange(0.0, time_length + HRF_DT / 2, HRF_DT)
    peak = gamma.pdf(t, delay / dispersion, scale=dispersion)
    under = gamma.pdf(t, undershoot / u_dispersion, scale=u_dispersion)
    hrf = peak - ratio * under
    return hrf / hrf.sum()


def canonical_hrf(name: str = "glover") -> np.ndarray:
    """Glover's (nilearn ``glover``) or SPM's canonical HRF at 0.1 s resolution."""
    if name == "glover":
        return gamma_difference_hrf(delay=6.0, undershoot=12.0, dispersion=0.9, u_dispersion=0.9, ratio=0.35)
    if name == "spm":
        return gamma_difference_hrf(delay=6.0, undershoot=16.0, dispersion=1.0, u_dispersion=1.0, ratio=0.167)
    raise ValueError(f"canonical HRF must be 'glover' or 'spm', got {name!r}")


def response_kernel(hrf: np.ndarray, duration: float) -> np.ndarray:
    """Response to a ``duration``-second stimulus (0.1 s samples), scaled to peak 1."""
    n_box = max(1, int(round(duration / HRF_DT)))
    kernel = np.convolve(np.asarray(hrf, dtype=np.float64), np.ones(n_box))
    peak = np.max(np.abs(kernel))
    return kernel / peak if peak > 0 else kernel


class HRFSet:
    """A set of HRFs (the library, or one canonical HRF) that builds trial regressors at arbitrary frame times.

    ``hrfs`` is (n_samples, n_hrfs) at 0.1 s. Kernels for each stimulus duration are built and cached on first use.
    """

    def __init__(self, hrfs: np.ndarray, peak_tr: float | None = None):
        hrfs = np.asarray(hrfs, dtype=np.float64)
        if hrfs.ndim == 1:
            hrfs = hrfs[:, None]
        self.hrfs = hrfs
        self.peak_tr = peak_tr
        self._interpolators: dict[int, tuple[PchipInterpolator, float]] = {}

    @classmethod
    def library(cls, peak_tr: float | None = None) -> "HRFSet":
        return cls(load_hrf_library(), peak_tr)

    @classmethod
    def canonical(cls, name: str = "glover", peak_tr: float | None = None) -> "HRFSet":
        return cls(canonical_hrf(name), peak_tr)

    @property
    def n_hrfs(self) -> int:
        return self.hrfs.shape[1]

    def _interpolator(self, duration: float) -> tuple[PchipInterpolator, float]:
        key = max(1, int(round(duration / HRF_DT)))
        if key not in self._interpolators:
            kernels = np.stack([response_kernel(self.hrfs[:, h], duration) for h in range(self.n_hrfs)], axis=1)
            times = np.arange(kernels.shape[0]) * HRF_DT
            if self.peak_tr:
                # GLMsingle's scaling: peak 1 among the samples at onset + 0, TR, 2 TR, ... (not the continuous peak).
                at_tr = PchipInterpolator(times, kernels, axis=0)(np.arange(0.0, times[-1], self.peak_tr))
                peaks = np.abs(at_tr).max(axis=0)
                kernels = kernels / np.where(peaks > 0, peaks, 1.0)
            self._interpolators[key] = (PchipInterpolator(times, kernels, axis=0, extrapolate=False), times[-1])
        return self._interpolators[key]

    def support(self, duration: float) -> float:
        """Seconds after onset during which a trial of this duration has a non-zero regressor."""
        return self._interpolator(duration)[1]

    def regressors(self, frame_times: np.ndarray, onsets: np.ndarray, durations: np.ndarray) -> np.ndarray:
        """Trial regressors, (n_hrfs, n_frames, n_trials): trial ``j`` under HRF ``h`` at each frame time."""
        frame_times = np.asarray(frame_times, dtype=np.float64)
        onsets = np.asarray(onsets, dtype=np.float64)
        durations = np.asarray(durations, dtype=np.float64)
        out = np.zeros((self.n_hrfs, frame_times.size, onsets.size), dtype=np.float64)
        for j, (onset, duration) in enumerate(zip(onsets, durations)):
            interp, length = self._interpolator(duration)
            lag = frame_times - onset
            inside = (lag >= 0.0) & (lag <= length)
            if inside.any():
                out[:, inside, j] = np.nan_to_num(interp(lag[inside])).T
        return out
