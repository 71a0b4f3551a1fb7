"""A simulated scanner session: design, ground-truth responses, noise, head motion, and the BOLD volumes.

``simulate_session(config, subject=1, seed=0)`` returns a :class:`PhantomSession`. Small arrays (design, true betas,
HRF choices, motion, masks) are computed at once; the 4-D BOLD of a run is generated on demand
(:meth:`PhantomSession.bold` or volume by volume with :meth:`PhantomSession.iter_volumes`) from per-run random
streams, so any run can be regenerated alone and a realistic session never needs all runs in memory.

Signal model for voxel ``x`` at volume ``t`` of a run (``psc`` = percent signal change)::

    tissue(x, t) = anatomy(x) * (1 + [response(x, t) + physio(x, t) + ar(x, t)] / 100)    head frame
    bold(x, t)   = moved(tissue, motion_t)(x) * coil(x) * (1 + drift(x, t) / 100) + thermal(x, t)   scanner frame

``response`` = sum over trials of ``beta[trial, v] * h_v(t - onset)`` where ``h_v`` is the voxel's GLMsingle library
HRF convolved with the stimulus duration and scaled to peak 1 (so betas are in % signal change, the GLMsingle
convention), ``physio`` = a few shared slow/aliased-cardiac/respiratory components with smooth spatial maps, ``ar`` =
AR(1) noise, ``drift`` = Legendre polynomials over the run, ``thermal`` = white noise of the same level everywhere, and
``moved`` resamples the head with the true rigid motion of that volume (``motion_matrix``). Motion of the first
volume of the first run is exactly zero, so session space = the grid of that volume.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage

from rt_mindeye.phantom import brain
from rt_mindeye.phantom.config import PhantomConfig, phantom_config
from rt_mindeye.phantom.features import ImageFeatures, compute_features
from rt_mindeye.phantom.stimuli import Stimulus, render_all, stimulus
from rt_mindeye.phantom.subject import Subject, make_subject

HRF_LIBRARY_PATH = Path(__file__).resolve().parent.parent / "data" / "hrf_library_glmsingle.tsv"
HRF_DT = 0.1  # sampling of the library (s)
MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
SESSION_START_S = 9 * 3600 + 30 * 60  # 09:30:00 scanner clock
SESSION_DATE = "20260105"


@functools.lru_cache(maxsize=1)
def hrf_library() -> np.ndarray:
    """The GLMsingle library (501, 20): impulse responses sampled every 0.1 s from 0 to 50 s."""
    return np.loadtxt(HRF_LIBRARY_PATH, delimiter="\t")


@functools.lru_cache(maxsize=16)
def response_kernels(duration_s: float) -> np.ndarray:
    """(n, 20) library HRFs convolved with a ``duration_s`` boxcar at 0.1 s, each scaled to peak 1."""
    lib = hrf_library()
    width = max(int(round(duration_s / HRF_DT)), 1)
    box = np.ones(width)
    kernels = np.stack([np.convolve(lib[:, j], box) for j in range(lib.shape[1])], axis=1)
    return kernels / kernels.max(axis=0, keepdims=True)


def response_regressors(frame_times: np.ndarray, onsets: np.ndarray, duration_s: float, hrf: int) -> np.ndarray:
    """(T, n_trials) responses of unit amplitude (peak 1) for trials at ``onsets`` sampled at ``frame_times``."""
    kernel = response_kernels(float(duration_s))[:, hrf]
    grid = np.arange(len(kernel)) * HRF_DT
    lags = frame_times[:, None] - np.asarray(onsets)[None, :]
    return np.interp(lags, grid, kernel, left=0.0, right=0.0)


def slice_acquisition_order(n_slices: int) -> np.ndarray:
    """Siemens interleaved order: odd-numbered slices (1, 3, ...) first when n is odd, even-numbered first when even."""
    first = 0 if n_slices % 2 else 1
    return np.concatenate([np.arange(first, n_slices, 2), np.arange(1 - first, n_slices, 2)])


def slice_times(n_slices: int, tr_s: float) -> np.ndarray:
    """Acquisition time (s) of each slice relative to the volume start, for an interleaved acquisition."""
    times = np.empty(n_slices)
    times[slice_acquisition_order(n_slices)] = np.arange(n_slices) * tr_s / n_slices
    return times


@dataclass(frozen=True)
class Trial:
    run: int
    """0-based run index."""
    trial: int
    """0-based trial index within the run."""
    session_trial: int
    """0-based trial index within the session."""
    onset: float
    """Seconds from the start of the run's first volume."""
    duration: float
    image_index: int
    """Index into the session's stimulus list ``session.stimuli`` / ``session.images`` (the global stimulus index is
    ``session.stimuli[image_index].index``)."""
    stim_file: str
    repeat: int
    """0 for the first showing of the image in the session, 1 for the second, ..."""
    n_presentations: int
    """How many times the session shows this image."""


@dataclass(frozen=True)
class RunInfo:
    index: int
    series_number: int
    n_volumes: int
    start_time_s: float
    """AcquisitionTime of the first volume, seconds since midnight."""
    calibration: bool
    trials: tuple[Trial, ...]

    @property
    def onsets(self) -> np.ndarray:
        return np.array([t.onset for t in self.trials])


@dataclass(eq=False)
class PhantomSession:
    """One simulated session. Per-voxel arrays follow ``subject.voxel_indices`` (the visual mask in C order)."""

    config: PhantomConfig
    subject: Subject
    seed: int
    stimuli: list[Stimulus]
    images: np.ndarray
    """uint8 (n_images, size, size, 3)."""
    runs: list[RunInfo]
    betas: list[np.ndarray]
    """Per run (n_trials_run, V) float32: true response amplitude of each trial, % signal change."""
    motion: list[np.ndarray]
    """Per run (n_volumes, 6): trans_x/y/z (mm) and rot_x/y/z (radians) of the head relative to session space."""
    tuned_responses: np.ndarray
    """(n_images, V) z-scored image-specific tuning (the noiseless 'brain code' of each image)."""
    _cache: dict = field(default_factory=dict, repr=False)

    # --- convenience views ---------------------------------------------------------------------------------------
    @property
    def affine(self) -> np.ndarray:
        return self.subject.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.subject.shape

    @property
    def tr(self) -> float:
        return self.config.tr_s

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    @property
    def hrf_index(self) -> np.ndarray:
        return self.subject.hrf_index

    @property
    def voxel_indices(self) -> np.ndarray:
        return self.subject.voxel_indices

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Boolean grids in session space: ``brain``, ``visual``, ``responsive``."""
        responsive = np.zeros(self.shape, bool)
        responsive[tuple(self.voxel_indices[self.subject.responsive].T)] = True
        return {"brain": self.subject.brain_mask, "visual": self.subject.visual_mask, "responsive": responsive}

    @property
    def calibration_runs(self) -> list[int]:
        return [r.index for r in self.runs if r.calibration]

    def trials(self, run: int | None = None) -> list[Trial]:
        if run is None:
            return [t for r in self.runs for t in r.trials]
        return list(self._run(run).trials)

    def events(self, run: int) -> list[dict]:
        """BIDS-style events of a run: onset, duration, trial_type, stim_file, image_index, trial, repeat, ..."""
        return [{"onset": t.onset, "duration": t.duration, "trial_type": "image", "stim_file": t.stim_file,
                 "image_index": t.image_index, "stimulus_index": self.stimuli[t.image_index].index,
                 "trial": t.trial, "session_trial": t.session_trial,
                 "repeat": t.repeat, "n_presentations": t.n_presentations} for t in self._run(run).trials]

    def frame_times(self, run: int) -> np.ndarray:
        """Start time (s from the run's first volume) of every volume of the run."""
        return np.arange(self._run(run).n_volumes) * self.tr

    def slice_times(self) -> np.ndarray:
        return slice_times(self.shape[2], self.tr)

    def acquisition_times(self, run: int) -> np.ndarray:
        """AcquisitionTime of every volume of the run, seconds since midnight."""
        return self._run(run).start_time_s + self.frame_times(run)

    def motion_matrix(self, run: int, volume: int) -> np.ndarray:
        """4x4 world (RAS mm) transform taking session-space head positions to where they are at that volume."""
        return brain.rigid_matrix(self.motion[run][volume], self.subject.head_centre_world)

    def framewise_displacement(self, run: int, radius_mm: float = 50.0) -> np.ndarray:
        """Power's FD per volume (first = 0): summed absolute changes, rotations as arc length on a 50 mm sphere."""
        d = np.abs(np.diff(self.motion[run], axis=0))
        fd = d[:, :3].sum(axis=1) + radius_mm * d[:, 3:].sum(axis=1)
        return np.concatenate([[0.0], fd])

    def _run(self, run: int) -> RunInfo:
        if not 0 <= run < len(self.runs):
            raise IndexError(f"run {run} out of range (session has {len(self.runs)} runs, 0-based)")
        return self.runs[run]

    # --- ground truth ---------------------------------------------------------------------------------------------
    def response_psc(self, run: int) -> np.ndarray:
        """(T, V) noiseless stimulus response in % signal change: true betas times each voxel's HRF regressors."""
        info = self._run(run)
        frame = self.frame_times(run)
        betas = self.betas[run]
        out = np.zeros((info.n_volumes, self.subject.n_voxels), np.float32)
        if not info.trials:
            return out
        onsets = info.onsets
        st = self.slice_times() if self.config.slice_timing else np.zeros(self.shape[2])
        slice_of_voxel = self.voxel_indices[:, 2]
        for hrf in np.unique(self.hrf_index):
            for offset in np.unique(st[slice_of_voxel]):
                cols = np.flatnonzero((self.hrf_index == hrf) & (st[slice_of_voxel] == offset))
                if len(cols) == 0:
                    continue
                x = response_regressors(frame + offset, onsets, self.config.stim_duration_s, int(hrf))
                out[:, cols] = x @ betas[:, cols]
        return out

    def all_betas(self) -> np.ndarray:
        """(n_trials, V) true betas of every trial of the session, in session-trial order."""
        return np.concatenate(self.betas, axis=0)

    # --- noise (per-run random streams) --------------------------------------------------------------------------
    def _streams(self, run: int) -> dict[str, np.random.Generator]:
        base = [self.seed, self.subject.subject_id, 1000 + run]
        return {name: np.random.default_rng(base + [k]) for k, name in enumerate(("visual", "rest", "physio"))}

    def _physio(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, K) time courses and (K, n_brain) spatial maps (psc) of the shared physiological components."""
        key = ("physio", run)
        if key in self._cache:
            return self._cache[key]
        cfg = self.config
        n_vol = self._run(run).n_volumes
        rng = self._streams(run)["physio"]
        t = self.frame_times(run)
        comps = []
        for k in range(cfg.physio_components):
            kind = k % 3
            if kind == 0:  # slow global fluctuation (~0.01-0.05 Hz), smoothed noise
                x = ndimage.gaussian_filter1d(rng.normal(size=n_vol), sigma=max(8.0 / cfg.tr_s, 1.0))
            elif kind == 1:  # respiration ~0.3 Hz, aliased by the TR, with slowly varying amplitude
                f = rng.uniform(0.2, 0.35)
                x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * (
                    1 + 0.3 * ndimage.gaussian_filter1d(rng.normal(size=n_vol), 5))
            else:  # cardiac ~1.1 Hz aliased
                f = rng.uniform(0.9, 1.3)
                x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.2 * rng.normal(size=n_vol)
            comps.append((x - x.mean()) / (x.std() + 1e-12))
        courses = np.array(comps).T.reshape(n_vol, cfg.physio_components)
        # Spatial maps are the subject's (same for every run): smooth fields, stronger towards the brain edge and CSF.
        maps = self._physio_maps()
        self._cache[key] = (courses.astype(np.float32), maps)
        return self._cache[key]

    def _physio_maps(self) -> np.ndarray:
        if "physio_maps" not in self._cache:
            rng = np.random.default_rng([self.seed, self.subject.subject_id, 77])
            world = brain.grid_world_coordinates(self.shape, self.affine)[self.subject.brain_mask]
            maps = np.array([0.5 + brain.SmoothField(rng, 30.0, n_waves=16)(world) * 0.5
                             for _ in range(self.config.physio_components)]).reshape(-1, len(world))
            self._cache["physio_maps"] = (maps * self.config.physio_psc).astype(np.float32)
        return self._cache["physio_maps"]

    def _drift(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, order) Legendre time courses and (order, n_vox_grid) coefficient maps (psc), scanner frame."""
        cfg = self.config
        n_vol = self._run(run).n_volumes
        x = np.linspace(-1.0, 1.0, n_vol)
        polys = np.stack([np.polynomial.legendre.Legendre.basis(d)(x) for d in range(1, cfg.drift_order + 1)], axis=1) \
            if cfg.drift_order > 0 else np.zeros((n_vol, 0))
        rng = np.random.default_rng([self.seed, self.subject.subject_id, 2000 + run])
        world = brain.grid_world_coordinates(self.shape, self.affine).reshape(-1, 3)
        coeffs = []
        for d in range(cfg.drift_order):
            spatial = brain.SmoothField(rng, 60.0, n_waves=8)(world)
            coeffs.append(cfg.drift_psc / (d + 1) * (rng.normal() + 0.4 * spatial))
        coeffs = np.array(coeffs).reshape(cfg.drift_order, -1)
        return polys.astype(np.float32), coeffs.astype(np.float32)

    def _visual_noise(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, V) AR(1) noise (psc) and (T, V) thermal noise (scanner units) of the visual voxels."""
        key = ("visual_noise", run)
        if key not in self._cache:
            cfg = self.config
            rng = self._streams(run)["visual"]
            n_vol, n_vox = self._run(run).n_volumes, self.subject.n_voxels
            innovations = rng.normal(size=(n_vol, n_vox)).astype(np.float32)
            thermal = rng.normal(size=(n_vol, n_vox)).astype(np.float32) * self._thermal_sd()
            ar = _ar1(innovations, cfg.ar_rho) * (cfg.ar_noise_psc * self.subject.noise_scale)
            # Keep the noise of the two most recent runs only: a realistic session would hold ~0.3 GB otherwise.
            for old in [k for k in self._cache if isinstance(k, tuple) and k[0] == "visual_noise"][:-1]:
                del self._cache[old]
            self._cache[key] = (ar.astype(np.float32), thermal)
        return self._cache[key]

    def _thermal_sd(self) -> float:
        return self.config.thermal_noise_psc / 100.0 * brain.INTENSITY["grey"]

    # --- time series ----------------------------------------------------------------------------------------------
    def visual_timeseries(self, run: int, noise: bool = True) -> np.ndarray:
        """(T, V) BOLD of the visual voxels as if there were no head motion (ideal motion correction).

        Uses the same noise draws as :meth:`bold`. ``noise=False`` gives the noiseless signal (anatomy x coil x
        (1 + response/100)), no drift, physiology or thermal noise.
        """
        vox = tuple(self.voxel_indices.T)
        base = self.subject.anatomy[vox] * self.subject.coil[vox]
        psc = self.response_psc(run)
        if not noise:
            return (base * (1.0 + psc / 100.0)).astype(np.float32)
        ar, thermal = self._visual_noise(run)
        courses, maps = self._physio(run)
        brain_pos = self._brain_position_of_visual()
        physio = courses @ maps[:, brain_pos] if maps.size else 0.0
        polys, coeffs = self._drift(run)
        drift = polys @ coeffs[:, self.subject.visual_flat_indices] if coeffs.size else 0.0
        tissue = base * (1.0 + (psc + physio + ar) / 100.0)
        return (tissue * (1.0 + drift / 100.0) + thermal).astype(np.float32)

    def _brain_position_of_visual(self) -> np.ndarray:
        if "brain_pos" not in self._cache:
            order = np.cumsum(self.subject.brain_mask.reshape(-1)) - 1
            self._cache["brain_pos"] = order[self.subject.visual_flat_indices]
        return self._cache["brain_pos"]

    def iter_volumes(self, run: int, motion: bool = True) -> Iterator[np.ndarray]:
        """The run's volumes one at a time, float32 ``shape``, in acquisition order (see the module docstring)."""
        cfg = self.config
        info = self._run(run)
        subject = self.subject
        brain_mask = subject.brain_mask.reshape(-1)
        brain_flat = np.flatnonzero(brain_mask)
        vis_flat = subject.visual_flat_indices
        vis_in_brain = self._brain_position_of_visual()
        other_brain = np.ones(len(brain_flat), bool)
        other_brain[vis_in_brain] = False
        other_thermal = np.ones(int(np.prod(self.shape)), bool)
        other_thermal[vis_flat] = False
        n_other_thermal = int(other_thermal.sum())
        rest_rng = self._streams(run)["rest"]
        ar_vis, thermal_vis = self._visual_noise(run)
        psc = self.response_psc(run)
        courses, maps = self._physio(run)
        polys, coeffs = self._drift(run)
        anatomy = subject.anatomy.reshape(-1)
        anatomy_brain = anatomy[brain_flat]
        coil = subject.coil.reshape(-1)
        thermal_sd = self._thermal_sd()
        ar_state = np.zeros(int(other_brain.sum()), np.float32)
        rho = cfg.ar_rho
        for t in range(info.n_volumes):
            # Head frame: tissue baseline modulated by responses and physiological noise (psc).
            mod = np.zeros(len(brain_flat), np.float32)
            if maps.size:
                mod += courses[t] @ maps
            innov = rest_rng.normal(size=ar_state.shape).astype(np.float32)
            ar_state = rho * ar_state + np.sqrt(1 - rho * rho) * innov if t else innov
            mod[other_brain] += cfg.ar_noise_psc * ar_state
            mod[vis_in_brain] += ar_vis[t] + psc[t]
            tissue = anatomy.copy()
            tissue[brain_flat] = anatomy_brain * (1.0 + mod / 100.0)
            tissue = tissue.reshape(self.shape)
            if motion:
                tissue = self._move(tissue, run, t)
            # Scanner frame: coil shading, drift, thermal noise.
            vol = tissue.reshape(-1) * coil
            if coeffs.size:
                vol *= 1.0 + (polys[t] @ coeffs) / 100.0
            noise = np.empty_like(vol)
            noise[other_thermal] = rest_rng.normal(size=n_other_thermal).astype(np.float32) * thermal_sd
            noise[vis_flat] = thermal_vis[t]
            # Magnitude image: noise around an empty background folds to positive values.
            yield np.abs(vol + noise).reshape(self.shape).astype(np.float32)

    def _move(self, volume: np.ndarray, run: int, t: int) -> np.ndarray:
        params = self.motion[run][t]
        if not np.any(params):
            return volume
        world_motion = self.motion_matrix(run, t)
        # Output voxel -> world -> where that point was in session space -> session voxel.
        voxel_map = np.linalg.inv(self.affine) @ np.linalg.inv(world_motion) @ self.affine
        return resample_voxels(volume, voxel_map, self.config.interpolation_order)

    def bold(self, run: int, motion: bool = True) -> np.ndarray:
        """(X, Y, Z, T) float32 BOLD of a run (cached for the most recent run; a realistic run is ~0.5-0.8 GB)."""
        key = ("bold", run, motion)
        if key not in self._cache:
            for k in [k for k in self._cache if isinstance(k, tuple) and k[0] == "bold"]:
                del self._cache[k]
            self._cache[key] = np.stack(list(self.iter_volumes(run, motion=motion)), axis=-1)
        return self._cache[key]


_SITK_INTERPOLATORS = {0: "sitkNearestNeighbor", 1: "sitkLinear", 3: "sitkBSpline"}
_EDGE_PAD = 3


def resample_voxels(volume: np.ndarray, voxel_map: np.ndarray, order: int = 1) -> np.ndarray:
    """``out[x] = volume[voxel_map @ x]`` (4x4 voxel-to-voxel map), spline ``order``.

    Outside the grid the edge values continue (tissue moving into a slab comes from beyond its edge, which the
    simulation approximates by the edge slice) up to :data:`_EDGE_PAD` voxels, then zero. SimpleITK's multi-threaded
    resampler does it when available (several times faster than scipy on a whole-brain grid; the same values);
    scipy.ndimage otherwise or for other orders.
    """
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK is a declared dependency
        sitk = None
    padded = np.pad(np.asarray(volume, np.float32), _EDGE_PAD, mode="edge")
    if sitk is not None and order in _SITK_INTERPOLATORS:
        image = sitk.GetImageFromArray(np.ascontiguousarray(padded.transpose(2, 1, 0)))
        image.SetOrigin([-float(_EDGE_PAD)] * 3)  # physical point = voxel index of the unpadded grid
        reference = sitk.Image([int(n) for n in volume.shape], sitk.sitkFloat32)
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(voxel_map[:3, :3].ravel().tolist())
        transform.SetTranslation(voxel_map[:3, 3].tolist())
        out = sitk.Resample(image, reference, transform, getattr(sitk, _SITK_INTERPOLATORS[order]), 0.0,
                            sitk.sitkFloat32)
        return np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(2, 1, 0))
    shift = np.eye(4)
    shift[:3, 3] = _EDGE_PAD
    padded_map = shift @ voxel_map
    return ndimage.affine_transform(padded, padded_map[:3, :3], offset=padded_map[:3, 3], output_shape=volume.shape,
                                    order=order, mode="constant", cval=0.0, prefilter=order > 1).astype(np.float32)


def _ar1(innovations: np.ndarray, rho: float) -> np.ndarray:
    """Unit-variance AR(1) along axis 0."""
    out = np.empty_like(innovations)
    out[0] = innovations[0]
    scale = math.sqrt(1 - rho * rho)
    for t in range(1, len(innovations)):
        out[t] = rho * out[t - 1] + scale * innovations[t]
    return out


# --- design --------------------------------------------------------------------------------------------------------

def _assign_trials(cfg: PhantomConfig, rng: np.random.Generator) -> list[list[int]]:
    """Image index of every trial, per run: repeated images go to distinct runs (``test_repeated_images`` to distinct
    real-time runs), the rest are shown once."""
    n_images = cfg.n_images
    order = rng.permutation(n_images)
    n_test = cfg.test_repeated_images
    test_repeated = order[cfg.repeated_images:cfg.repeated_images + n_test]
    repeated = order[:cfg.repeated_images]
    unique = list(order[cfg.repeated_images + n_test:])
    capacity = np.full(cfg.n_runs, cfg.trials_per_run)
    runs: list[list[int]] = [[] for _ in range(cfg.n_runs)]
    live = np.arange(cfg.calibration_runs, cfg.n_runs)
    for image in test_repeated:  # drawn only when there are some: sessions without them are unchanged
        ranking = live[np.lexsort((rng.random(live.size), -capacity[live]))]
        for r in ranking[:cfg.repeats]:
            runs[r].append(int(image))
            capacity[r] -= 1
    for image in repeated:
        # The runs with most free slots (random tie-break) keep every run full at the end.
        ranking = np.lexsort((rng.random(cfg.n_runs), -capacity))
        for r in ranking[:cfg.repeats]:
            runs[r].append(int(image))
            capacity[r] -= 1
    for r in range(cfg.n_runs):
        for _ in range(capacity[r]):
            runs[r].append(int(unique.pop()))
    for r in range(cfg.n_runs):
        rng.shuffle(runs[r])
    return runs


def _run_timing(cfg: PhantomConfig, n_trials: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    onsets = np.empty(n_trials)
    t = cfg.rest_start_s
    for k in range(n_trials):
        onsets[k] = round(t, 3)
        t += cfg.stim_duration_s + rng.uniform(cfg.isi_s - cfg.isi_jitter_s, cfg.isi_s + cfg.isi_jitter_s)
    end = (onsets[-1] + cfg.stim_duration_s if n_trials else 0.0) + cfg.rest_end_s
    return onsets, int(math.ceil(end / cfg.tr_s))


def _motion_trace(cfg: PhantomConfig, n_vol: int, rng: np.random.Generator, start: np.ndarray) -> np.ndarray:
    """(n_vol, 6) smooth drift + random walk + occasional jerks, bounded by the configured maxima."""
    limits = np.array([cfg.motion_max_mm] * 3 + [np.deg2rad(cfg.motion_max_deg)] * 3)
    if not np.any(limits):
        return np.zeros((n_vol, 6))
    t = np.linspace(0, 1, n_vol)[:, None]
    slow = (rng.normal(0, 0.25, size=(1, 6)) * t
            + rng.normal(0, 0.1, size=(1, 6)) * np.sin(np.pi * t * rng.uniform(1, 3)))
    walk = ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, 0.03, size=(n_vol, 6)), axis=0), 2.0, axis=0)
    jerks = np.zeros((n_vol, 6))
    for v in np.flatnonzero(rng.random(n_vol) < cfg.jerk_rate):
        amplitude = rng.normal(0, 0.35, size=6)
        decay = np.exp(-np.arange(n_vol - v) / rng.uniform(1.0, 6.0))[:, None]
        permanent = rng.uniform(0.0, 0.5)
        jerks[v:] += amplitude * (permanent + (1 - permanent) * decay)
    trace = start + (slow + walk + jerks) * limits
    trace -= trace[0] - start  # begin exactly at the run's start position
    return np.clip(trace, -limits, limits)


def simulate_session(config: PhantomConfig | str = "small", subject: int | Subject = 1, seed: int = 0,
                     progress=None) -> PhantomSession:
    """Simulate a session of ``subject`` (a number or a prebuilt :class:`Subject`) with random ``seed``.

    ``config`` is a :class:`PhantomConfig` or a preset name. Deterministic for given (config, subject, seed).
    ``progress``, if given, is called as ``progress(step: str, done: int, total: int)`` while image features compute.
    """
    cfg = phantom_config(config) if isinstance(config, str) else config
    subj = subject if isinstance(subject, Subject) else make_subject(cfg, int(subject))
    if subj.shape != tuple(cfg.matrix):
        raise ValueError(f"subject grid {subj.shape} does not match config matrix {tuple(cfg.matrix)}")
    rng = np.random.default_rng([seed, subj.subject_id, 1])

    stimuli = [stimulus(cfg.stimulus_offset + i) for i in range(cfg.n_images)]
    images = render_all(stimuli, cfg.image_size)
    feats: ImageFeatures = compute_features(
        images, progress=(lambda d, n: progress("image features", d, n)) if progress else None,
        network=cfg.driving_network)
    tuned = subj.tuned_responses(feats)

    assignment = _assign_trials(cfg, rng)
    counts = np.bincount(np.concatenate([np.array(r, int) for r in assignment]), minlength=cfg.n_images)
    seen = np.zeros(cfg.n_images, int)
    beta_rng = np.random.default_rng([seed, subj.subject_id, 3])
    motion_rng = np.random.default_rng([seed, subj.subject_id, 4])
    modulation = cfg.image_modulation
    runs, betas, motion = [], [], []
    clock = SESSION_START_S + float(rng.uniform(0, 3600))
    session_trial = 0
    position = np.zeros(6)
    for r, images_of_run in enumerate(assignment):
        onsets, n_vol = _run_timing(cfg, len(images_of_run), rng)
        trials = []
        run_betas = np.empty((len(images_of_run), subj.n_voxels), np.float32)
        for k, (image, onset) in enumerate(zip(images_of_run, onsets)):
            trials.append(Trial(run=r, trial=k, session_trial=session_trial, onset=float(onset),
                                duration=cfg.stim_duration_s, image_index=image,
                                stim_file=f"stimuli/{stimuli[image].file_name}", repeat=int(seen[image]),
                                n_presentations=int(counts[image])))
            seen[image] += 1
            session_trial += 1
            trial_noise = beta_rng.normal(size=subj.n_voxels).astype(np.float32)
            run_betas[k] = subj.mean_response * (1.0 + modulation * tuned[image] + cfg.trial_variability * trial_noise)
        # Between runs the head settles somewhere new (the first run starts at the reference position).
        if r > 0:
            limits = np.array([cfg.motion_max_mm] * 3 + [np.deg2rad(cfg.motion_max_deg)] * 3)
            position = np.clip(0.6 * position + motion_rng.normal(0, 0.25, 6) * limits, -0.8 * limits, 0.8 * limits)
        trace = _motion_trace(cfg, n_vol, motion_rng, position)
        position = trace[-1]
        runs.append(RunInfo(index=r, series_number=cfg.first_series + r, n_volumes=n_vol, start_time_s=clock,
                            calibration=r < cfg.calibration_runs, trials=tuple(trials)))
        betas.append(run_betas)
        motion.append(trace.astype(np.float64))
        clock += n_vol * cfg.tr_s + cfg.run_gap_s
    return PhantomSession(config=cfg, subject=subj, seed=seed, stimuli=stimuli, images=images, runs=runs,
                          betas=betas, motion=motion, tuned_responses=tuned)
