"""Haemodynamic response functions: GLMsingle's 20-HRF library and a canonical (Glover/SPM) HRF.

Every HRF here is first described at 0.1 s resolution for an instantaneous event. For a trial of duration ``d`` it is
convolved with a ``d``-second boxcar, scaled to peak 1 (so betas are in the data's units, % signal change here;
with ``peak_tr``, GLMsingle's scaling: peak 1 among the samples at multiples of the TR after onset) and then read
off at each volume's time with PCHIP interpolation, which keeps the shape monotone between samples and handles
onsets that do not fall on the TR grid.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import numpy as np

#: Sampling interval of the HRF library and of every kernel built here (seconds).
HRF_DT = 0.1


@lru_cache(maxsize=1)
def load_hrf_library() -> np.ndarray:
    """GLMsingle's library, (501, 20): column ``h`` is HRF ``h`` sampled every 0.1 s from 0 to 50 s."""
    text = resources.files("rt_mindeye.data").joinpath("hrf_library_glmsingle.tsv").read_text()
    library = np.loadtxt(text.splitlines(), delimiter="\t", dtype=np.float64)
    library.setflags(write=False)
    return library


def gamma_pdf(t: np.ndarray, shape: float, scale: float = 1.0) -> np.ndarray:
    """The gamma distribution's density at ``t`` (0 for ``t <= 0``); written out so that a fit does not import
    scipy.stats (a quarter of a second of every ``glm fit`` command)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros_like(t)
    pos = t > 0
    x = t[pos] / scale
    out[pos] = np.exp((shape - 1.0) * np.log(x) - x - math.lgamma(shape)) / scale
    out[t == 0] = 1.0 / scale if shape == 1 else (0.0 if shape > 1 else np.inf)
    return out


class Pchip:
    """Monotone piecewise-cubic Hermite interpolation (Fritsch-Carlson slopes as in MATLAB's ``pchip``) of samples
    ``values (n, m)`` at increasing ``knots (n,)``, column by column; NaN outside the knots.

    The slopes: zero where the neighbouring secant slopes differ in sign or one is zero, else their weighted harmonic
    mean (weights ``2 h_k + h_{k-1}`` and ``h_k + 2 h_{k-1}``); at the ends the three-point one-sided estimate, set to
    zero if its sign differs from the first secant's and limited to three times it where the secants change sign.
    Written here so that a fit does not import scipy.interpolate (tested against scipy's ``PchipInterpolator``).
    """

    def __init__(self, knots: np.ndarray, values: np.ndarray):
        x = np.asarray(knots, dtype=np.float64)
        y = np.asarray(values, dtype=np.float64)
        if y.ndim == 1:
            y = y[:, None]
        h = np.diff(x)
        m = np.diff(y, axis=0) / h[:, None]
        d = np.zeros_like(y)
        if x.size == 2:
            d[:] = m[0]
        elif x.size > 2:
            h0, h1 = h[:-1, None], h[1:, None]
            w1, w2 = 2.0 * h1 + h0, h1 + 2.0 * h0
            same = (np.sign(m[:-1]) * np.sign(m[1:])) > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                harmonic = (w1 + w2) / (w1 / m[:-1] + w2 / m[1:])
            d[1:-1] = np.where(same, harmonic, 0.0)
            d[0] = self._end_slope(h[0], h[1], m[0], m[1])
            d[-1] = self._end_slope(h[-1], h[-2], m[-1], m[-2])
        self.x, self.y, self.h = x, y, h
        # Each interval's cubic in the offset from its left knot: ((c3 t + c2) t + d) t + y.
        self.c2 = (3.0 * m - 2.0 * d[:-1] - d[1:]) / h[:, None]
        self.c3 = (d[:-1] + d[1:] - 2.0 * m) / (h[:, None] ** 2)
        self.d = d

    @staticmethod
    def _end_slope(h0, h1, m0, m1):
        slope = ((2.0 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        slope = np.where(np.sign(slope) != np.sign(m0), 0.0, slope)
        limit = (np.sign(m0) != np.sign(m1)) & (np.abs(slope) > np.abs(3.0 * m0))
        return np.where(limit, 3.0 * m0, slope)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """(len(points), m) values; NaN outside ``[knots[0], knots[-1]]``."""
        p = np.asarray(points, dtype=np.float64)
        k = np.clip(np.searchsorted(self.x, p, side="right") - 1, 0, self.x.size - 2)
        t = (p - self.x[k])[:, None]
        out = ((self.c3[k] * t + self.c2[k]) * t + self.d[k]) * t + self.y[k]
        out[(p < self.x[0]) | (p > self.x[-1]) | np.isnan(p)] = np.nan
        return out


def gamma_difference_hrf(*, time_length: float = 32.0, delay: float = 6.0, undershoot: float = 16.0,
                         dispersion: float = 1.0, u_dispersion: float = 1.0, ratio: float = 0.167) -> np.ndarray:
    """A peak gamma minus a scaled undershoot gamma, sampled every :data:`HRF_DT` seconds, summing to 1."""
    t = np.arange(0.0, time_length + HRF_DT / 2, HRF_DT)
    peak = gamma_pdf(t, delay / dispersion, scale=dispersion)
    under = gamma_pdf(t, undershoot / u_dispersion, scale=u_dispersion)
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
        self._interpolators: dict[int, tuple[Pchip, float]] = {}

    @classmethod
    def library(cls, peak_tr: float | None = None) -> "HRFSet":
        return cls(load_hrf_library(), peak_tr)

    @classmethod
    def canonical(cls, name: str = "glover", peak_tr: float | None = None) -> "HRFSet":
        return cls(canonical_hrf(name), peak_tr)

    @property
    def n_hrfs(self) -> int:
        return self.hrfs.shape[1]

    def _interpolator(self, duration: float) -> tuple[Pchip, float]:
        key = max(1, int(round(duration / HRF_DT)))
        if key not in self._interpolators:
            kernels = np.stack([response_kernel(self.hrfs[:, h], duration) for h in range(self.n_hrfs)], axis=1)
            times = np.arange(kernels.shape[0]) * HRF_DT
            if self.peak_tr:
                # GLMsingle's scaling: peak 1 among the samples at onset + 0, TR, 2 TR, ... (not the continuous peak).
                at_tr = Pchip(times, kernels)(np.arange(0.0, times[-1], self.peak_tr))
                peaks = np.abs(at_tr).max(axis=0)
                kernels = kernels / np.where(peaks > 0, peaks, 1.0)
            self._interpolators[key] = (Pchip(times, kernels), times[-1])
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
