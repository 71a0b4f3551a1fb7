"""Benchmark of the single-trial GLM: accuracy on independent simulated sessions (beside the reference GLMsingle),
the real-time estimator on their live runs, the phantom as an extra data set, and timings.

    python bench/glm.py [--quick] [--sessions dense,sparse,weak] [--reference-glmsingle [PYTHON]]
                        [--phantom] [--skip-timing] [--timing-voxels 20000] [--command-timing 8000x8,20000x11]

* Independent sessions (``rt_mindeye.glm.simulate``: own HRFs incl. double-gammas outside the library, own
  convolution, AR(1) noise, drift, low-rank shared noise, motion-locked signal; 8 runs x 192 volumes, TR 1.5 s, 3-s
  images, 20% of images once, the rest three times): offline types a-d and, with ``--reference-glmsingle``, GLMsingle
  (cvnlab, defaults, one BLAS thread, run in its own environment by ``bench/glmsingle_reference.py``) on the same data,
  both timed in the same run. Metric: median over responsive voxels of the correlation across trials with the true
  betas (GLMsingle's). Real-time: calibration (type d, motion) on runs 1-3, estimates at the default delay and at the
  end of each run on runs 4-8, with motion, against GLMsingle's type D and our offline type d on the same trials.
* ``--phantom``: the previous accuracy bench on the phantom (types a-d, the real-time MindEye recipe, the real-time
  curve by delay and its ablations).
* Timing: ``rt-mindeye glm fit`` as a whole command (NIfTI in, outputs written) against GLMsingle's whole fit on the
  same session sizes (``--command-timing``, needs the reference); the type-d fit with the numba kernels and with the
  plain numpy kernels (same algorithm, same threads); real-time cost per volume and per beta at ``--timing-voxels``.
Writes bench/results/glm.json and prints rich tables. ``PYTHON`` defaults to $RT_MINDEYE_GLMSINGLE_PYTHON, else
/work/scratch/glmsingle-venv/bin/python if present, else this python if it can import glmsingle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rt_mindeye.glm import kernels, kernels_reference  # noqa: E402
from rt_mindeye.glm.baseline import mindeye_lss_betas  # noqa: E402
from rt_mindeye.glm.config import RealtimeConfig  # noqa: E402
from rt_mindeye.glm.design import RunEvents  # noqa: E402
from rt_mindeye.glm.estimator import GLMSingle  # noqa: E402
from rt_mindeye.glm import fit as F  # noqa: E402
from rt_mindeye.glm.hrf import HRFSet  # noqa: E402
from rt_mindeye.glm.realtime import RealtimeGLM  # noqa: E402
from rt_mindeye.glm.simulate import PRESETS, median_correlation, simulate_session  # noqa: E402

console = Console()


@contextmanager
def numpy_kernels():
    """Swap the numba kernels for the plain numpy ones (the ratio baseline)."""
    names = ("fraction_alphas", "pair_squared_differences", "pair_sums", "gained_badness", "weighted_squares",
             "ridge_gains", "column_sum_squares", "row_sum_squares", "percent_signal", "scale_offset", "lag1_sums",
             "unwhitened_sum_squares", "prewhiten")
    saved = {n: getattr(kernels, n) for n in names}
    try:
        for n in names:
            setattr(kernels, n, getattr(kernels_reference, n))
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)


def true_hrf_ols(runs, events, tr, hrf_index) -> np.ndarray:
    """OLS single-trial betas with each voxel's true HRF (the reference point quoted in the brief)."""
    psc = [F.percent_signal(y)[0] for y in runs]
    bases = [F.nuisance_basis(y.shape[0], tr, None) for y in psc]
    lib = HRFSet.library()
    regs = [F.run_regressors(lib, ev, y.shape[0], tr, 0.0) for y, ev in zip(psc, events)]
    rot = F.rotate(psc, regs, bases, hrf_index, lib.n_hrfs)
    return F.betas_and_sse(rot, hrf_index, np.zeros((len(psc), psc[0].shape[1])))[0]


def accuracy(preset: str, quick: bool, max_delay: int) -> dict:
    from rt_mindeye.phantom.config import phantom_config
    from rt_mindeye.phantom.session import simulate_session

    overrides = {} if quick or preset != "small" else {"n_runs": 8, "calibration_runs": 3, "trials_per_run": 40,
                                                       "repeated_images": 30, "rest_end_s": 15.0}
    cfg = phantom_config(preset, **overrides)
    t0 = time.perf_counter()
    ps = simulate_session(cfg, subject=1, seed=0)
    runs = [ps.visual_timeseries(r) for r in range(ps.n_runs)]
    console.print(f"phantom {preset}{' (extended)' if overrides else ''}: {ps.n_runs} runs, "
                  f"{runs[0].shape[1]} visual voxels, {sum(len(ps.trials(r)) for r in range(ps.n_runs))} trials "
                  f"({time.perf_counter() - t0:.0f} s to simulate)")
    events = [RunEvents.from_records(ps.events(r), condition_column="stim_file") for r in range(ps.n_runs)]
    truth = [np.asarray(b, dtype=np.float64) for b in ps.betas]
    responsive = np.asarray(ps.subject.responsive, dtype=bool)
    tr = ps.tr
    cal_runs = ps.calibration_runs or [0]
    live_runs = [r for r in range(ps.n_runs) if r not in cal_runs]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in events])])
    all_truth = np.concatenate(truth)
    live_rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in live_runs])

    def score(betas, rows=None):
        rows = np.arange(all_truth.shape[0]) if rows is None else rows
        return median_correlation(np.asarray(betas, dtype=np.float64), all_truth[rows], responsive)

    results = {"phantom": {"preset": preset, "overrides": overrides, "n_runs": ps.n_runs,
                           "calibration_runs": list(cal_runs), "voxels": int(runs[0].shape[1]),
                           "responsive": int(responsive.sum())}, "offline": {}, "offline_live_runs": {}}
    results["offline"]["ols_true_hrf"] = score(true_hrf_ols(runs, events, tr, np.asarray(ps.hrf_index)))
    fits = {}
    for model in "abcd":
        t = time.perf_counter()
        fits[model] = GLMSingle(model=model).fit(runs, events, tr)
        results["offline"][model] = score(fits[model].betas_)
        results["offline_live_runs"][model] = score(fits[model].betas_[live_rows], live_rows)
        results.setdefault("offline_fit_s", {})[model] = time.perf_counter() - t
    d = fits["d"]
    results["offline_choices"] = {
        "n_pcs": d.n_pcs_, "pc_scores": [float(x) for x in d.pc_scores_],
        "hrf_exact": float(np.mean(d.hrf_index_[responsive] == np.asarray(ps.hrf_index)[responsive])),
        "hrf_within_1": float(np.mean(np.abs(d.hrf_index_[responsive] - np.asarray(ps.hrf_index)[responsive]) <= 1)),
        "median_frac_responsive": float(np.median(d.frac_[responsive])),
        "noise_pool": int(d.noise_pool_.sum()), "noise_pool_responsive": int((d.noise_pool_ & responsive).sum())}

    # Published real-time MindEye recipe (7.5 s after onset, and at the end of the run for reference).
    base = {}
    for label, delay, use_motion in (("mindeye_rt_7.5s", 7.5, True), ("mindeye_rt_7.5s_without_motion", 7.5, False),
                                     ("mindeye_rt_end_of_run", 1e6, True)):
        est = [mindeye_lss_betas(F.percent_signal(runs[r])[0], events[r], tr, delay_s=delay,
                                 motion=np.asarray(ps.motion[r]) if use_motion else None)[0] for r in live_runs]
        base[label] = score(np.concatenate(est), live_rows)
    results["baselines_live_runs"] = base

    # Real-time estimator: calibration on the calibration runs, every delay in one pass.
    cal = GLMSingle(model="d").fit([runs[r] for r in cal_runs], [events[r] for r in cal_runs], tr,
                                   motion=None)
    curve = {}
    # The previous default: no prewhitening, unshrunk drift slope, own columns shrunk toward zero.
    previous = {"ar_rho": 0.0, "drift_shrinkage": 0.0, "ridge_prior_mean": False}
    # default: local LSA +-6, ridge toward the calibration mean beta, AR(1) 0.2 prewhitening, drift <= 1 with the
    # slope shrunk; previous: the same without prewhitening, slope shrinkage and prior mean.
    variants = {"default": {},
                "without the issue-9 priors": {"noise_prior": 0.0, "snr_ridge": False, "final_denoise": False},
                "previous default": previous,
                "previous, constant drift": {**previous, "max_drift_degree": 0},
                "default, ar_rho 0": {"ar_rho": 0.0},
                "default, drift_walk 0 (before the random-walk baseline)": {"drift_walk": 0.0},
                "default, drift_shrinkage 0": {"drift_shrinkage": 0.0},
                "default, ridge toward 0": {"ridge_prior_mean": False},
                "LSS, no ridge (rt-MindEye)": {"neighbors": 0, "ridge": False}}
    for key, options in variants.items():
        if True:
            cfgrt = RealtimeConfig(early_volumes=1, refine_every=1, refine_until=max_delay, zscore=False, **options)
            by_n = {n: {} for n in range(1, max_delay + 1)}
            final = {}
            for r in live_runs:
                rt = RealtimeGLM(cal, cfgrt).start_run(events[r], tr, run=r, n_volumes=runs[r].shape[0])
                for i, row in enumerate(runs[r]):
                    for e in rt.add_volume(i, row):
                        by_n[e.n_volumes][offsets[r] + e.trial] = e.betas
                for e in rt.end_run():
                    final[offsets[r] + e.trial] = e.betas
            row = {}
            for n, got in by_n.items():
                if len(got) == len(live_rows):
                    row[n] = score(np.stack([got[i] for i in live_rows]), live_rows)
            row["final"] = score(np.stack([final[i] for i in live_rows]), live_rows)
            curve[key] = row
    results["realtime_live_runs"] = curve
    default_delay = RealtimeConfig().early_volumes
    results["realtime_over_offline_d_at_default_delay"] = {
        "delay_volumes": default_delay,
        **{k: row.get(default_delay, float("nan")) / results["offline_live_runs"]["d"] for k, row in curve.items()}}
    results["calibration"] = {"n_pcs": cal.n_pcs_, "median_frac": float(np.median(cal.frac_))}
    return results


class StageTimes:
    """A GLMSingle ``progress`` callback that times each stage from its first report to its completion."""

    def __init__(self):
        self._spans: dict[str, list] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        span = self._spans.setdefault(stage, [time.perf_counter(), None])
        if done >= total:
            span[1] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        return {stage: (end or start) - start for stage, (start, end) in self._spans.items()}


def timing(n_runs: int, n_frames: int, n_vox: int, trials_per_run: int, skip_numpy: bool) -> dict:
    sess = simulate_session(n_runs=n_runs, n_frames=n_frames, n_vox=n_vox, responsive_fraction=0.3, seed=1)
    out = {"session": {"runs": n_runs, "volumes_per_run": n_frames, "voxels": n_vox,
                       "trials": int(sum(len(e["onset"]) for e in sess.events))}, "threads": os.cpu_count()}
    events = [RunEvents.coerce(e) for e in sess.events]
    GLMSingle(model="d").fit([y[:, :200] for y in sess.runs[:2]], events[:2], sess.tr)  # compile / warm caches
    stages = StageTimes()

    t = time.perf_counter()
    fitted = GLMSingle(model="d", progress=stages).fit(sess.runs, events, sess.tr)
    out["fit_numba_s"] = time.perf_counter() - t
    out["fit_numba_stages_s"] = stages.seconds()
    if not skip_numpy:
        t = time.perf_counter()
        with numpy_kernels():
            plain = GLMSingle(model="d").fit(sess.runs, events, sess.tr)
        out["fit_numpy_s"] = time.perf_counter() - t
        out["ratio_numpy_over_numba"] = out["fit_numpy_s"] / out["fit_numba_s"]
        out["max_abs_beta_difference"] = float(np.abs(plain.betas_ - fitted.betas_).max())
    # Real-time cost on one run at full size: the default, and without the random-walk baseline (like for like).
    for key, options in (("realtime_ms", {}), ("realtime_ms_without_drift_walk", {"drift_walk": 0.0})):
        out[key] = _realtime_cost(fitted, events, sess, n_frames, options)
    return out


def _realtime_cost(fitted, events, sess, n_frames, options) -> dict:
    rt = RealtimeGLM(fitted, RealtimeConfig(early_volumes=5, refine_every=2, refine_until=15, **options))
    rt.start_run(events[-1], sess.tr, n_volumes=n_frames)
    update_ms, estimate_ms, volume_ms = [], [], []
    original = rt.estimate

    def timed_estimate(*a, **k):
        t0 = time.perf_counter()
        res = original(*a, **k)
        estimate_ms.append((time.perf_counter() - t0) * 1e3)
        return res

    rt.estimate = timed_estimate
    for i, row in enumerate(sess.runs[-1]):
        n_before = len(estimate_ms)
        t0 = time.perf_counter()
        rt.add_volume(i, row)
        total = (time.perf_counter() - t0) * 1e3
        volume_ms.append(total)
        update_ms.append(total - sum(estimate_ms[n_before:]))
    t0 = time.perf_counter()
    finals = rt.end_run()
    end_ms = (time.perf_counter() - t0) * 1e3
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"volume_update_p50": pct(update_ms, 50), "volume_update_p99": pct(update_ms, 99),
            "estimate_p50": pct(estimate_ms, 50), "estimate_p99": pct(estimate_ms, 99),
            "beta_p50": pct(update_ms, 50) + pct(estimate_ms, 50),
            "add_volume_p50": pct(volume_ms, 50), "add_volume_p99": pct(volume_ms, 99),
            "end_run_total": end_ms, "end_run_per_trial": end_ms / max(len(finals), 1)}


def whole_brain_data(cache: Path, preset: str = "realistic") -> Path:
    """Every in-brain voxel's time series of the phantom's runs (no motion applied; the motion parameters kept as
    regressors), written once to ``cache`` as ``run{r}.npy`` (T, V) float32, ``motion{r}.npy``, ``events{r}.json``
    (the realistic preset: ~4 min to simulate the session plus ~1 min per run)."""
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / "done.json"
    if done.exists() and json.loads(done.read_text()).get("preset") == preset:
        return cache
    from rt_mindeye.phantom.config import phantom_config
    from rt_mindeye.phantom.session import simulate_session as simulate_phantom

    ps = simulate_phantom(phantom_config(preset), subject=1, seed=0)
    brain = ps.masks["brain"]
    for r in range(ps.n_runs):
        np.save(cache / f"run{r}.npy", np.ascontiguousarray(ps.bold(r, motion=False)[brain].T, dtype=np.float32))
        np.save(cache / f"motion{r}.npy", np.asarray(ps.motion[r], dtype=np.float64))
        (cache / f"events{r}.json").write_text(json.dumps(ps.events(r), default=float))
        ps._cache.clear()
        console.print(f"whole brain: run {r + 1}/{ps.n_runs} written ({int(brain.sum())} voxels)")
    done.write_text(json.dumps({"preset": preset, "voxels": int(brain.sum()), "runs": ps.n_runs}))
    return cache


def whole_brain_child(cache: Path) -> int:
    """In its own process: the calibration workflow's GLM call (``GLMSingle.from_config`` of the default ``glm``
    config, with motion) on the cached whole-brain runs; prints wall time, stage times and peak RSS as JSON."""
    import resource

    from rt_mindeye.glm.config import GLMConfig

    n_runs = json.loads((cache / "done.json").read_text())["runs"]
    runs = [np.load(cache / f"run{r}.npy") for r in range(n_runs)]
    motion = [np.load(cache / f"motion{r}.npy") for r in range(n_runs)]
    events = [RunEvents.from_records(json.loads((cache / f"events{r}.json").read_text()), condition_column="stim_file")
              for r in range(n_runs)]
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    stages = StageTimes()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = GLMSingle.from_config(GLMConfig(), progress=stages).fit(runs, events, 1.5, motion=motion)
    wall = time.perf_counter() - start
    print(json.dumps({"voxels": int(runs[0].shape[1]), "runs": n_runs, "volumes": int(sum(r.shape[0] for r in runs)),
                      "trials": int(fitted.betas_.shape[0]), "fit_s": wall, "n_pcs": fitted.n_pcs_,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      "data_rss_gb": loaded_rss,
                      "stages_s": stages.seconds()}))
    return 0


def whole_brain(cache: Path) -> dict:
    """Whole-brain calibration fit (the realistic phantom's in-brain voxels, 11 runs) in a child process."""
    whole_brain_data(cache)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--whole-brain-child", str(cache)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - start
    console.print(out)
    return out


def reference_python(option: str | None) -> str | None:
    """The python of the reference GLMsingle's environment (see the module docstring), or None."""
    candidates = [option] if option not in (None, "auto") else [
        os.environ.get("RT_MINDEYE_GLMSINGLE_PYTHON"), "/work/scratch/glmsingle-venv/bin/python", sys.executable]
    for exe in candidates:
        if exe and Path(exe).exists():
            ok = subprocess.run([exe, "-c", "import glmsingle"], capture_output=True).returncode == 0
            if ok:
                return exe
    return None


def run_glmsingle(python: str, runs, events, tr: float, stimdur: float, work: Path) -> dict:
    """GLMsingle on ``runs`` in its own process (one BLAS thread), timed as a whole; its betas and choices."""
    types = sorted({t for ev in events for t in ev["trial_type"]})
    index = {t: i for i, t in enumerate(types)}
    arrays = {"n_runs": len(runs), "stimdur": stimdur, "tr": tr}
    for r, (run, ev) in enumerate(zip(runs, events)):
        on = np.asarray(ev["onset"]) / tr
        if not np.allclose(on, np.round(on)):
            raise ValueError("GLMsingle needs onsets on the TR grid")
        arrays[f"run{r}"] = run
        arrays[f"onset_idx{r}"] = np.round(on).astype(np.int64)
        arrays[f"cond{r}"] = np.array([index[t] for t in ev["trial_type"]], dtype=np.int64)
    src, dst = work / "glmsingle_in.npz", work / "glmsingle_out.npz"
    np.savez(src, **arrays)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run([python, str(ROOT / "bench" / "glmsingle_reference.py"), str(src), str(dst)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with np.load(dst) as f:
        out = {k: f[k] for k in f.files}
    out["wall_s"] = wall
    return out


def independent_session(name: str, quick: bool, ref_python: str | None, work: Path) -> dict:
    """Offline types a-d and the real-time estimator on one independent session, GLMsingle beside them."""
    options = dict(PRESETS[name])
    if quick:
        options["n_vox"] = min(options["n_vox"], 1500)
    sess = simulate_session(**options)
    events = [RunEvents.coerce(e) for e in sess.events]
    truth, resp = sess.true_betas, sess.responsive
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in events])])
    cal_runs, live_runs = [0, 1, 2], list(range(3, len(events)))
    live_rows = np.arange(offsets[3], offsets[-1])
    score = lambda b, rows=None: median_correlation(b, truth if rows is None else truth[rows], resp)  # noqa: E731
    out = {"session": sess.description, "offline": {}, "offline_s": {}, "live_runs": {}}
    for model in "abcd":
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Like for like with GLMsingle's defaults: no motion regressors offline.
            fit = GLMSingle(model=model).fit(sess.runs, events, sess.tr)
        out["offline_s"][model] = time.perf_counter() - t
        out["offline"][model] = score(fit.betas_)
        out["live_runs"][model] = score(fit.betas_[live_rows], live_rows)
        if model == "d":
            out["choices"] = {"n_pcs": fit.n_pcs_, "median_frac_responsive": float(np.median(fit.frac_[resp])),
                              "pcvoxels": int(fit.pcvoxels_.sum()), "noise_pool": int(fit.noise_pool_.sum())}
    if ref_python:
        ref = run_glmsingle(ref_python, sess.runs, sess.events, sess.tr, float(sess.events[0]["duration"][0]), work)
        out["glmsingle"] = {m.upper(): score(ref[f"betas_{m}"]) for m in "bcd" if f"betas_{m}" in ref}
        out["glmsingle_live_runs"] = {m.upper(): score(ref[f"betas_{m}"][live_rows], live_rows)
                                      for m in "bcd" if f"betas_{m}" in ref}
        out["glmsingle_s"] = float(ref["wall_s"])
        out["glmsingle_choices"] = {"pcnum": int(np.asarray(ref.get("pcnum", -1))),
                                    "median_frac_responsive": float(np.median(np.asarray(ref["FRACvalue"])[resp]))
                                    if "FRACvalue" in ref else None}
    # Real-time: calibrate on runs 1-3 (with motion), then runs 4-8 live with motion.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = GLMSingle(model="d").fit([sess.runs[r] for r in cal_runs], [events[r] for r in cal_runs], sess.tr,
                                       motion=[sess.motion[r] for r in cal_runs])
    delay = RealtimeConfig().early_volumes
    refined_at = (8, 12)  # post-onset volumes of the refined estimates scored (12 s and 18 s after onset)
    by_n, final = {n: {} for n in (delay, *refined_at)}, {}
    for r in live_runs:
        rt = RealtimeGLM(cal, RealtimeConfig(zscore=False, refine_every=1, refine_until=max(refined_at))).start_run(
            events[r], sess.tr, run=r, n_volumes=sess.runs[r].shape[0])
        for i, row in enumerate(sess.runs[r]):
            for e in rt.add_volume(i, row, motion_params=sess.motion[r][i]):
                if e.n_volumes in by_n:
                    by_n[e.n_volumes][offsets[r] + e.trial] = e.betas
        for e in rt.end_run():
            final[offsets[r] + e.trial] = e.betas
    # Ablation at the default delay: the motion columns shrunk toward zero instead of the calibration's coefficients.
    without_prior = {}
    for r in live_runs:
        rt = RealtimeGLM(cal, RealtimeConfig(zscore=False, refine_every=0, motion_prior=0.0)).start_run(
            events[r], sess.tr, run=r, n_volumes=sess.runs[r].shape[0])
        for i, row in enumerate(sess.runs[r]):
            for e in rt.add_volume(i, row, motion_params=sess.motion[r][i]):
                without_prior[offsets[r] + e.trial] = e.betas
    # A trial too close to the run's end for a refined estimate at n volumes counts with its end-of-run estimate.
    pick = lambda n: np.stack([by_n[n].get(i, final[i]) for i in live_rows])  # noqa: E731
    out["realtime"] = {"delay_volumes": delay,
                       "early": score(np.stack([by_n[delay][i] for i in live_rows]), live_rows),
                       **{f"refined_{n}": score(pick(n), live_rows) for n in refined_at},
                       "final": score(np.stack([final[i] for i in live_rows]), live_rows),
                       "early_without_motion_prior": score(np.stack([without_prior[i] for i in live_rows]), live_rows),
                       "calibration_n_pcs": cal.n_pcs_, "live_noise_components": int(cal.noise_loadings_.shape[1])}
    out["realtime"]["early_over_offline_d"] = out["realtime"]["early"] / out["live_runs"]["d"]
    out["realtime"]["final_over_offline_d"] = out["realtime"]["final"] / out["live_runs"]["d"]
    if "glmsingle_live_runs" in out:
        for key in ("early", "refined_8", "refined_12", "final"):
            out["realtime"][f"{key}_over_glmsingle_D"] = out["realtime"][key] / out["glmsingle_live_runs"]["D"]
    return out


def command_timing(sizes: list[tuple[int, int]], ref_python: str | None, work: Path, repeats: int = 3) -> list[dict]:
    """``rt-mindeye glm fit`` as a whole command (NIfTI in, every output written) against GLMsingle's whole fit on
    the same session, for each (voxels, runs): ours ``repeats`` times (median; the first run after a change also
    compiles the numba kernels into their cache, so one untimed run goes first), GLMsingle once."""
    import nibabel as nib

    rows = []
    for n_vox, n_runs in sizes:
        sess = simulate_session(n_vox=n_vox, n_runs=n_runs, responsive_fraction=0.3, seed=5)
        folder = work / f"cmd_{n_vox}x{n_runs}"
        folder.mkdir(parents=True, exist_ok=True)
        side = int(np.ceil(np.sqrt(n_vox / 8))) + 1
        shape = (side, side, 8)
        bold, tsvs = [], []
        for r, (run, ev) in enumerate(zip(sess.runs, sess.events)):
            vol = np.zeros(shape + (run.shape[0],), np.float32)
            vol.reshape(-1, run.shape[0])[:n_vox] = run.T
            bold.append(folder / f"run-{r + 1}_bold.nii.gz")
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(bold[-1]))
            tsvs.append(folder / f"run-{r + 1}_events.tsv")
            tsvs[-1].write_text("onset\tduration\ttrial_type\n" + "".join(
                f"{o}\t{d}\t{t}\n" for o, d, t in zip(ev["onset"], ev["duration"], ev["trial_type"])))
        cmd = [sys.executable, "-c", "import sys; from rt_mindeye.cli import main; sys.exit(main(sys.argv[1:]))",
               "glm", "fit", "--bold", *map(str, bold), "--events", *map(str, tsvs), "--tr", str(sess.tr),
               "--out", str(folder / "out"), "--quiet"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, env=env, capture_output=True)  # warm-up: numba cache, file cache
        readings = []
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            readings.append(time.perf_counter() - start)
        row = {"voxels": n_vox, "runs": n_runs, "ours_command_s": float(np.median(readings)),
               "ours_command_readings_s": readings}
        if ref_python:
            ref = run_glmsingle(ref_python, sess.runs, sess.events, sess.tr, 3.0, folder)
            row["glmsingle_fit_s"] = float(ref["wall_s"])
            row["speedup"] = row["glmsingle_fit_s"] / row["ours_command_s"]
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
        console.print(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--sessions", default="dense,sparse,weak",
                        help="independent sessions to score (names in rt_mindeye.glm.simulate.PRESETS; '' = none)")
    parser.add_argument("--reference-glmsingle", nargs="?", const="auto", default=None, metavar="PYTHON",
                        help="run the reference GLMsingle beside our fit (python of its environment)")
    parser.add_argument("--phantom", action="store_true", help="also the accuracy bench on the phantom")
    parser.add_argument("--preset", default="small", help="phantom preset for --phantom")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-numpy", action="store_true", help="do not time the plain numpy baseline")
    parser.add_argument("--timing-voxels", type=int, default=20_000)
    parser.add_argument("--command-timing", default="8000x8,20000x11",
                        help="VOXELSxRUNS sizes for the whole-command timing against GLMsingle ('' = skip)")
    parser.add_argument("--max-delay", type=int, default=16, help="largest post-onset volume count on the curve")
    parser.add_argument("--whole-brain", action="store_true",
                        help="time the calibration fit on every in-brain voxel of the realistic phantom (11 runs)")
    parser.add_argument("--whole-brain-cache", default=str(Path(tempfile.gettempdir()) / "rt_mindeye_glm_whole_brain"),
                        help="folder for the whole-brain phantom runs (simulated once, ~15 min)")
    parser.add_argument("--whole-brain-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--command-repeats", type=int, default=3, help="runs of our command per size (median)")
    parser.add_argument("--update", action="store_true",
                        help="keep the sections of an existing --out file that this run does not measure (the "
                             "machine's state per section goes to machine_by_section)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "glm.json"))
    args = parser.parse_args(argv)
    if args.whole_brain_child:
        return whole_brain_child(Path(args.whole_brain_child))
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform(), "load": os.getloadavg()}, "quick": args.quick}
    ref_python = reference_python(args.reference_glmsingle) if args.reference_glmsingle else None
    if args.reference_glmsingle and not ref_python:
        console.print("[yellow]reference GLMsingle not importable: running without it[/]")
    results["reference_glmsingle"] = ref_python
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sessions = [s for s in args.sessions.split(",") if s]
        if sessions:
            results["independent"] = {}
            for name in sessions:
                results["independent"][name] = independent_session(name, args.quick, ref_python, work)
            _print_independent(results["independent"])
        if args.phantom:
            results["accuracy"] = accuracy(args.preset, args.quick, args.max_delay)
            _print_accuracy(results["accuracy"])
        if args.whole_brain:
            results["whole_brain"] = whole_brain(Path(args.whole_brain_cache))
            _print_whole_brain(results["whole_brain"])
        if not args.skip_timing:
            if args.command_timing:  # ours alone without the reference (GLMsingle's column then empty)
                sizes = [tuple(int(x) for x in item.split("x")) for item in args.command_timing.split(",") if item]
                if args.quick:
                    sizes = [(1500, 4)]
                results["command_timing"] = command_timing(sizes, ref_python, work, args.command_repeats)
                _print_command_timing(results["command_timing"])
            if args.quick:
                results["timing"] = timing(3, 120, 2000, 40, args.skip_numpy)
            else:
                results["timing"] = timing(11, 192, args.timing_voxels, 63, args.skip_numpy)
            _print_timing(results["timing"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.update and Path(args.out).exists():
        kept = json.loads(Path(args.out).read_text())
        measured = sorted(set(results) - {"machine", "quick", "reference_glmsingle"})
        by_section = kept.get("machine_by_section", {})
        by_section.update({name: results["machine"] for name in measured})
        results = {**kept, **results, "machine_by_section": by_section, "updated_sections": measured}
    Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _print_independent(res: dict) -> None:
    table = Table(title="independent sessions: median r with the true betas over responsive voxels")
    for col in ("session", "ours a / b / c / d", "GLMsingle B / C / D", "d - D", "RT early (x GLMsingle D)",
                "RT final / offline d (live runs)", "ours d fit (s)", "GLMsingle fit (s)"):
        table.add_column(col, justify="right" if col != "session" else "left")
    for name, r in res.items():
        ours = " / ".join(f"{r['offline'][m]:.3f}" for m in "abcd")
        g = r.get("glmsingle")
        ref = " / ".join(f"{g[m]:.3f}" for m in "BCD") if g else "-"
        diff = f"{r['offline']['d'] - g['D']:+.3f}" if g else "-"
        rt = r["realtime"]
        early = f"{rt['early']:.3f}" + (f" ({rt['early_over_glmsingle_D']:.2f}x)" if g else "")
        table.add_row(f"{name} ({r['session']['n_vox']} vox, {r['session']['responsive_fraction']:.0%})", ours, ref,
                      diff, early, f"{rt['final']:.3f} / {r['live_runs']['d']:.3f}", f"{r['offline_s']['d']:.1f}",
                      f"{r['glmsingle_s']:.0f}" if g else "-")
    Console(width=max(console.width, 160)).print(table)
    rt_table = Table(title="real-time on the live runs (calibration on runs 1-3 with motion; scored on runs 4-8)")
    for col in ("session", "early (5 vol)", "early, motion_prior 0", "refined (8 vol)", "refined (12 vol)",
                "end of run", "offline d", "GLMsingle D", "early / D", "end of run - d"):
        rt_table.add_column(col, justify="right" if col != "session" else "left")
    for name, r in res.items():
        rt = r["realtime"]
        g = r.get("glmsingle_live_runs")
        rt_table.add_row(name, *(f"{rt[k]:.3f}" if k in rt else "-" for k in ("early", "early_without_motion_prior",
                                                                              "refined_8", "refined_12", "final")),
                         f"{r['live_runs']['d']:.3f}", f"{g['D']:.3f}" if g else "-",
                         f"{rt['early_over_glmsingle_D']:.3f}" if g else "-",
                         f"{rt['final'] - r['live_runs']['d']:+.3f}")
    Console(width=max(console.width, 160)).print(rt_table)


def _print_accuracy(acc: dict) -> None:
    table = Table(title="single-trial beta accuracy (median r with true betas, responsive voxels)")
    table.add_column("estimator")
    table.add_column("all runs", justify="right")
    table.add_column("real-time runs", justify="right")
    table.add_row("OLS, true HRF (reference)", f"{acc['offline']['ols_true_hrf']:.3f}", "")
    for m in "abcd":
        table.add_row(f"offline type {m}", f"{acc['offline'][m]:.3f}", f"{acc['offline_live_runs'][m]:.3f}")
    for k, v in acc["baselines_live_runs"].items():
        table.add_row(k.replace("_", " "), "", f"{v:.3f}")
    console.print(table)
    curve = Table(title="real-time estimator: accuracy vs post-onset volumes (real-time runs)")
    curve.add_column("variant", no_wrap=True)
    realtime = acc["realtime_live_runs"]
    shown = [n for n in (3, 4, 5, 6, 8, 12, 16) if n in next(iter(realtime.values()))] + ["final"]
    for n in shown:
        curve.add_column(str(n), justify="right")
    ratio = acc.get("realtime_over_offline_d_at_default_delay")
    if ratio:
        curve.add_column(f"x offline d at {ratio['delay_volumes']}", justify="right")
    for key, row in realtime.items():
        cells = [f"{row.get(n, float('nan')):.3f}" for n in shown]
        curve.add_row(key, *cells, *([f"{ratio[key]:.3f}"] if ratio else []))
    Console(width=max(console.width, 120)).print(curve)  # the variant names stay on one line


def _print_command_timing(rows: list[dict]) -> None:
    table = Table(title="whole command vs GLMsingle (same session, same machine, same run)")
    for col in ("voxels x runs", "rt-mindeye glm fit, whole command (s)", "GLMsingle fit (s)", "speed-up"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(f"{row['voxels']} x {row['runs']}", f"{row['ours_command_s']:.1f}",
                      f"{row.get('glmsingle_fit_s', float('nan')):.0f}", f"{row.get('speedup', float('nan')):.1f}x")
    console.print(table)


def _print_whole_brain(wb: dict) -> None:
    table = Table(title=f"whole-brain calibration fit ({wb['voxels']} voxels x {wb['runs']} runs, {wb['trials']} "
                        "trials, type d with motion, child process)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("fit wall time (s)", f"{wb['fit_s']:.0f}")
    table.add_row("peak RSS (GB), data loaded included", f"{wb['peak_rss_gb']:.2f}")
    table.add_row("RSS after loading the data (GB)", f"{wb['data_rss_gb']:.2f}")
    for k, v in wb["stages_s"].items():
        table.add_row(f"  stage: {k} (s)", f"{v:.1f}")
    console.print(table)


def _print_timing(tim: dict) -> None:
    table = Table(title=f"timing ({tim['session']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("offline type-d fit, numba (s)", f"{tim['fit_numba_s']:.1f}")
    if "fit_numpy_s" in tim:
        table.add_row("offline type-d fit, plain numpy (s)", f"{tim['fit_numpy_s']:.1f}")
        table.add_row("ratio numpy / numba", f"{tim['ratio_numpy_over_numba']:.2f}")
    for k, v in tim["fit_numba_stages_s"].items():
        table.add_row(f"  stage: {k} (s)", f"{v:.1f}")
    for k, v in tim["realtime_ms"].items():
        base = tim.get("realtime_ms_without_drift_walk", {}).get(k)
        table.add_row(f"real-time {k} (ms)", f"{v:.2f}" + (f" (without drift_walk {base:.2f})" if base else ""))
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
