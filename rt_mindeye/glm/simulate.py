"""Simulated sessions with known single-trial betas, written independently of the fit's own design code.

Nothing here imports :mod:`rt_mindeye.glm.design`, :mod:`~rt_mindeye.glm.hrf`, :mod:`~rt_mindeye.glm.fit` or
:mod:`~rt_mindeye.glm.estimator` (a test checks it): the HRFs, the convolution and the resampling at the volume times
are written again here, so a fit scored on these sessions is not scored on its own regressors.

* **HRFs.** Half the responsive voxels take one of GLMsingle's 20 library HRFs (read from the packaged TSV), the other
  half a double-gamma HRF with random peak delay (4-7.5 s), dispersion, undershoot delay (11-19 s) and undershoot
  ratio (0.05-0.45), which none of the library's members is. Each HRF is convolved with the image's duration on a
  0.1 s grid (``numpy.convolve``) and read at each volume's time by linear interpolation (the fit uses PCHIP).
* **Betas.** A responsive voxel's beta for a trial is its mean response plus an image-specific part plus trial noise;
  20% of the images are shown once and the rest three times, each time in a different run.
* **Noise.** Per-voxel AR(1) noise (coefficient 0.05-0.45), slow drift (random low-order polynomial plus a random
  walk), low-rank shared noise whose component variances fall as ``k ** -spectrum_decay`` (components are AR(1) processes
  or aliased physiological oscillations; spatial maps random), and a small motion-locked component driven by the
  simulated motion parameters.

Events are returned as plain column mappings (``onset``, ``duration``, ``trial_type``), which the GLM accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
from scipy.stats import gamma

DT = 0.1  # s, resolution of the simulated neural time line


@dataclass
class SimulatedSession:
    runs: list              # (T, V) float32 raw intensities per run
    events: list            # per run: {"onset": (K,), "duration": (K,), "trial_type": [str]}
    tr: float
    true_betas: np.ndarray  # (n_trials, V) % signal change, trials ordered by run then onset
    responsive: np.ndarray  # (V,) bool
    true_hrf: np.ndarray    # (V,) library index 0..19, or -1 for a double-gamma HRF outside the library
    motion: list            # (T, 6) per run
    description: dict
    true_motion_coef: np.ndarray | None = None  # (V, 6) % signal change per unit of each motion parameter

    @property
    def n_trials(self) -> int:
        return int(self.true_betas.shape[0])


def _library() -> np.ndarray:
    text = resources.files("rt_mindeye.data").joinpath("hrf_library_glmsingle.tsv").read_text()
    return np.loadtxt(text.splitlines(), delimiter="\t", dtype=np.float64)


def _double_gamma(rng: np.random.Generator, length_s: float = 32.0) -> np.ndarray:
    t = np.arange(0.0, length_s, DT)
    delay = rng.uniform(4.0, 7.5)
    disp = rng.uniform(0.7, 1.3)
    under = rng.uniform(11.0, 19.0)
    ratio = rng.uniform(0.05, 0.45)
    h = gamma.pdf(t, delay / disp, scale=disp) - ratio * gamma.pdf(t, under, scale=1.0)
    return h / np.abs(h).max()


def _sample_response(hrf: np.ndarray, onsets: np.ndarray, duration: float, n_frames: int, tr: float) -> np.ndarray:
    """(T, K) response of each trial under ``hrf`` (0.1 s samples), read at t = i * tr by linear interpolation."""
    kernel = np.convolve(hrf, np.ones(max(1, int(round(duration / DT)))))
    kernel /= np.abs(kernel).max()
    ktimes = np.arange(kernel.size) * DT
    times = np.arange(n_frames) * tr
    out = np.zeros((n_frames, onsets.size))
    for k, onset in enumerate(onsets):
        lag = times - onset
        inside = (lag >= 0) & (lag <= ktimes[-1])
        out[inside, k] = np.interp(lag[inside], ktimes, kernel)
    return out


def _shared_noise(rng: np.random.Generator, n_frames: int, tr: float, n_components: int) -> np.ndarray:
    """(T, n) unit-variance latent time courses: AR(1) processes and aliased physiological oscillations."""
    out = np.zeros((n_frames, n_components))
    t = np.arange(n_frames) * tr
    for c in range(n_components):
        if c % 3 == 2:  # respiration/cardiac aliased to a random low frequency, with a wandering phase
            freq = rng.uniform(0.02, 0.3)
            phase = np.cumsum(rng.normal(0, 0.15, n_frames))
            x = np.sin(2 * np.pi * freq * t + phase) + 0.3 * rng.normal(size=n_frames)
        else:
            rho = rng.uniform(0.3, 0.95)
            x = np.zeros(n_frames)
            e = rng.normal(size=n_frames)
            x[0] = e[0]
            for i in range(1, n_frames):
                x[i] = rho * x[i - 1] + e[i]
        x -= x.mean()
        out[:, c] = x / (x.std() + 1e-12)
    return out


def _schedule(rng: np.random.Generator, n_runs: int, n_frames: int, tr: float, duration: float,
              once_fraction: float) -> tuple[list, int]:
    """Onsets on the TR grid (3 or 4 TRs apart) and image labels: a fraction of images once, the rest three times,
    each presentation of an image in a different run."""
    onsets = []
    for _ in range(n_runs):
        t, run = 6.0, []
        while t <= n_frames * tr - 14.0:
            run.append(t)
            t += tr * rng.choice([3, 4]) if tr * 3 >= duration + 1.0 else duration + rng.uniform(1.5, 3.0)
        onsets.append(np.asarray(run))
    slots = [(r, k) for r in range(n_runs) for k in range(onsets[r].size)]
    n_slots = len(slots)
    n_images = int(round(n_slots / (once_fraction + 3 * (1 - once_fraction))))
    n_once = int(round(once_fraction * n_images))
    n_thrice = (n_slots - n_once) // 3
    n_once = n_slots - 3 * n_thrice
    labels = [[None] * o.size for o in onsets]
    free = {r: list(rng.permutation(onsets[r].size)) for r in range(n_runs)}
    image = 0
    for _ in range(n_thrice):
        counts = np.array([len(free[r]) for r in range(n_runs)], dtype=float)
        if (counts > 0).sum() < 3:
            break
        runs = rng.choice(n_runs, size=3, replace=False, p=counts / counts.sum())
        while any(not free[r] for r in runs):
            runs = rng.choice(n_runs, size=3, replace=False, p=counts / counts.sum())
        for r in runs:
            labels[r][free[r].pop()] = f"img{image:04d}"
        image += 1
    for r in range(n_runs):
        for k in free[r]:
            labels[r][k] = f"img{image:04d}"
            image += 1
    return [(o, lab) for o, lab in zip(onsets, labels)], image


def simulate_session(*, seed: int = 0, n_runs: int = 8, n_frames: int = 192, n_vox: int = 2000, tr: float = 1.5,
                     duration: float = 3.0, responsive_fraction: float = 0.6, once_fraction: float = 0.2,
                     thermal_sd: float = 1.0, shared_sd: float = 0.8, n_shared: int = 24,
                     spectrum_decay: float = 1.2, drift_sd: float = 1.0, motion_sd: float = 0.15,
                     trial_sd: float = 0.35, library_fraction: float = 0.5) -> SimulatedSession:
    """A session of ``n_runs`` x ``n_frames`` volumes, TR ``tr``, ``duration``-second images.

    Noise sizes are in % signal change (a responsive voxel's mean response is ~0.5-2 %)."""
    rng = np.random.default_rng(seed)
    library = _library()
    schedule, n_images = _schedule(rng, n_runs, n_frames, tr, duration, once_fraction)

    responsive = np.zeros(n_vox, dtype=bool)
    responsive[rng.permutation(n_vox)[:int(round(responsive_fraction * n_vox))]] = True
    # HRFs: library members for some voxels, double-gammas (a pool of 64 random ones) for the others.
    n_dg = 64
    dg = [_double_gamma(rng) for _ in range(n_dg)]
    use_library = rng.random(n_vox) < library_fraction
    true_hrf = np.where(use_library, rng.integers(0, library.shape[1], n_vox), -1)
    hrf_key = np.where(use_library, true_hrf, library.shape[1] + rng.integers(0, n_dg, n_vox))
    hrfs = [library[:, h] for h in range(library.shape[1])] + dg

    mean_resp = rng.uniform(0.3, 2.0, n_vox) * responsive
    selectivity = rng.uniform(0.3, 1.2, n_vox) * responsive
    image_amp = mean_resp + selectivity * rng.normal(size=(n_images, n_vox))
    image_index = {}
    baseline = rng.lognormal(np.log(1000.0), 0.3, n_vox)
    thermal = thermal_sd * rng.uniform(0.7, 1.4, n_vox)
    ar = rng.uniform(0.05, 0.45, n_vox)
    spectrum = np.arange(1, n_shared + 1, dtype=float) ** -spectrum_decay
    spectrum /= spectrum.sum()
    shared_maps = rng.normal(size=(n_shared, n_vox)) * np.sqrt(spectrum)[:, None] * shared_sd
    motion_maps = rng.normal(size=(6, n_vox)) * motion_sd

    runs, events, betas, motions = [], [], [], []
    for r, (onsets, labels) in enumerate(schedule):
        idx = np.array([image_index.setdefault(lab, int(lab[3:])) for lab in labels], dtype=np.int64)
        b = (image_amp[idx] + trial_sd * rng.normal(size=(idx.size, n_vox)) * responsive) * responsive
        signal = np.zeros((n_frames, n_vox))
        for key in np.unique(hrf_key[responsive]):
            vox = np.flatnonzero((hrf_key == key) & responsive)
            x = _sample_response(hrfs[key], onsets, duration, n_frames, tr)
            signal[:, vox] = x @ b[:, vox]
        # AR(1) thermal/physiological noise per voxel.
        e = rng.standard_normal((n_frames, n_vox)) * thermal * np.sqrt(1 - ar ** 2)
        noise = np.empty_like(e)
        noise[0] = e[0] / np.sqrt(1 - ar ** 2)
        for i in range(1, n_frames):
            noise[i] = ar * noise[i - 1] + e[i]
        # Drift: random quadratic trend plus a slow random walk.
        u = np.linspace(-1, 1, n_frames)[:, None]
        walk = np.cumsum(rng.normal(size=(n_frames, 3)), axis=0)
        walk -= walk.mean(axis=0)
        walk /= walk.std(axis=0) + 1e-12
        drift = drift_sd * (rng.normal(size=n_vox) * u + 0.4 * rng.normal(size=n_vox) * (u ** 2 - 1 / 3)
                            + 0.5 * walk @ rng.normal(size=(3, n_vox)) / np.sqrt(3))
        shared = _shared_noise(rng, n_frames, tr, n_shared) @ shared_maps
        motion = np.cumsum(rng.normal(0, 0.03, size=(n_frames, 6)), axis=0)
        motion_effect = (motion - motion.mean(axis=0)) / 0.1 @ motion_maps
        psc = signal + noise + drift + shared + motion_effect
        runs.append((baseline * (1.0 + psc / 100.0)).astype(np.float32))
        events.append({"onset": onsets.copy(), "duration": np.full(onsets.size, duration),
                       "trial_type": list(labels)})
        betas.append(b)
        motions.append(motion)
    description = dict(seed=seed, n_runs=n_runs, n_frames=n_frames, n_vox=n_vox, tr=tr, duration=duration,
                       responsive_fraction=responsive_fraction, once_fraction=once_fraction, thermal_sd=thermal_sd,
                       shared_sd=shared_sd, n_shared=n_shared, spectrum_decay=spectrum_decay, drift_sd=drift_sd,
                       motion_sd=motion_sd, trial_sd=trial_sd, library_fraction=library_fraction,
                       n_images=n_images, n_trials=int(sum(len(ev["onset"]) for ev in events)))
    return SimulatedSession(runs, events, tr, np.concatenate(betas, axis=0), responsive, true_hrf, motions,
                            description, (motion_maps / 0.1).T.copy())


#: The bench's independent sessions (8 runs x 192 volumes, TR 1.5 s, 3-s images). ``dense``: 60% of voxels respond;
#: ``sparse``: whole-brain-like, 15% respond, stronger shared noise; ``weak``: 12% respond, weaker signal, steeper
#: noise spectrum.
PRESETS = {
    "dense": dict(n_vox=8000, responsive_fraction=0.6, shared_sd=0.8, thermal_sd=1.0, seed=11),
    "sparse": dict(n_vox=12000, responsive_fraction=0.15, shared_sd=1.6, thermal_sd=1.0, seed=12),
    "weak": dict(n_vox=6000, responsive_fraction=0.12, shared_sd=1.2, thermal_sd=1.3, spectrum_decay=1.6,
                 trial_sd=0.5, seed=13),
}


def median_correlation(estimated: np.ndarray, truth: np.ndarray, voxels: np.ndarray) -> float:
    """GLMsingle's accuracy metric: median over ``voxels`` of the correlation across trials with the true betas."""
    e = np.asarray(estimated, dtype=np.float64)[:, voxels]
    t = np.asarray(truth, dtype=np.float64)[:, voxels]
    e = e - e.mean(axis=0)
    t = t - t.mean(axis=0)
    r = (e * t).sum(axis=0) / np.sqrt((e ** 2).sum(axis=0) * (t ** 2).sum(axis=0) + 1e-300)
    return float(np.median(r))
