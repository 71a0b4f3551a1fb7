"""Benchmark of the single-trial GLM: accuracy on the phantom's ground truth, offline fit time, real-time latency.

    python bench/glm.py [--quick] [--preset small|realistic] [--skip-timing] [--timing-voxels 20000]

Accuracy (phantom, ideal motion correction): median over responsive voxels of the correlation across trials between
estimated and true betas, for canonical OLS, OLS with each voxel's true HRF, the published real-time MindEye recipe
(reimplemented: LSS, Glover, cosine 0.01 Hz, motion, 7.5 s after onset), offline types a-d, and the real-time
estimator at every post-onset delay (calibration = the phantom's calibration runs; scored on the real-time runs).
Timing (synthetic voxel time series with the realistic session's size): the offline type-d fit with the numba kernels
and, in the same run, with plain numpy kernels (same model, same results); per-volume and per-trial real-time cost.
Writes bench/results/glm.json and prints rich tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
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
from rt_mindeye.glm.synthetic import make_session, median_correlation  # noqa: E402

console = Console()


@contextmanager
def numpy_kernels():
    """Swap the numba kernels for the plain numpy ones (the ratio baseline)."""
    names = ("fraction_alphas", "ridge_cv_sse", "ridge_betas")
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
                "previous default": previous,
                "previous, constant drift": {**previous, "max_drift_degree": 0},
                "default, ar_rho 0": {"ar_rho": 0.0},
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


def timing(n_runs: int, n_frames: int, n_vox: int, trials_per_run: int, skip_numpy: bool) -> dict:
    n_cond = int(n_runs * trials_per_run * 0.8)
    sess = make_session(n_runs=n_runs, n_frames=n_frames, n_vox=n_vox, n_conditions=n_cond, repeats=1, seed=1)
    # make_session spreads repeats x n_conditions trials; add repeats of a quarter of the conditions by renaming.
    out = {"session": {"runs": n_runs, "volumes_per_run": n_frames, "voxels": n_vox,
                       "trials": int(sum(len(e) for e in sess.events))}, "threads": os.cpu_count()}
    events = _with_repeats(sess.events)
    GLMSingle(model="d").fit([y[:, :200] for y in sess.runs[:2]], events[:2], sess.tr)  # compile / warm caches
    stages = {}

    def record(stage, done, total):
        stages.setdefault(stage, [time.perf_counter(), None])
        if done >= total:
            stages[stage][1] = time.perf_counter()

    t = time.perf_counter()
    fitted = GLMSingle(model="d", progress=record).fit(sess.runs, events, sess.tr)
    out["fit_numba_s"] = time.perf_counter() - t
    out["fit_numba_stages_s"] = {k: (v[1] or v[0]) - v[0] for k, v in stages.items()}
    if not skip_numpy:
        t = time.perf_counter()
        with numpy_kernels():
            plain = GLMSingle(model="d").fit(sess.runs, events, sess.tr)
        out["fit_numpy_s"] = time.perf_counter() - t
        out["ratio_numpy_over_numba"] = out["fit_numpy_s"] / out["fit_numba_s"]
        out["max_abs_beta_difference"] = float(np.abs(plain.betas_ - fitted.betas_).max())
    # Real-time cost on one run at full size.
    rt = RealtimeGLM(fitted, RealtimeConfig(early_volumes=5, refine_every=2, refine_until=15))
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
    out["realtime_ms"] = {"volume_update_p50": pct(update_ms, 50), "volume_update_p99": pct(update_ms, 99),
                          "estimate_p50": pct(estimate_ms, 50), "estimate_p99": pct(estimate_ms, 99),
                          "beta_p50": pct(update_ms, 50) + pct(estimate_ms, 50),
                          "add_volume_p50": pct(volume_ms, 50), "add_volume_p99": pct(volume_ms, 99),
                          "end_run_total": end_ms, "end_run_per_trial": end_ms / max(len(finals), 1)}
    return out


def _with_repeats(events):
    """Rename conditions so a third of each run's trials repeat a trial of an earlier run (as a repeated image)."""
    out, pool = [], []
    for r, ev in enumerate(events):
        types = list(ev.trial_types)
        if r:
            for k in range(0, len(types), 3):
                types[k] = pool[(k // 3 + r) % len(pool)]
        pool.extend(types)
        out.append(RunEvents(ev.onsets, ev.durations, tuple(types)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--preset", default="small", help="phantom preset for the accuracy part")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-numpy", action="store_true", help="do not time the plain numpy baseline")
    parser.add_argument("--timing-voxels", type=int, default=20_000)
    parser.add_argument("--max-delay", type=int, default=16, help="largest post-onset volume count on the curve")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "glm.json"))
    args = parser.parse_args(argv)
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform()}, "quick": args.quick}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy(args.preset, args.quick, args.max_delay)
        _print_accuracy(results["accuracy"])
    if not args.skip_timing:
        if args.quick:
            results["timing"] = timing(3, 120, 2000, 40, args.skip_numpy)
        else:
            results["timing"] = timing(11, 192, args.timing_voxels, 63, args.skip_numpy)
        _print_timing(results["timing"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    console.print(f"wrote {args.out}")
    return 0


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
        table.add_row(f"real-time {k} (ms)", f"{v:.2f}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
