"""Benchmark: live stimulus events against the plan. How much the betas lose when the shown onsets differ from the
planned ones, how much the reported onsets give back, and what a revision of the GLM costs.

    python bench/live_events.py [--quick] [--jitter 0.5 1 2] [--timing-voxels 20000]

Accuracy (the phantom, an independent generator: its BOLD is made with the onsets that were "shown"; ideal motion
correction, as bench/glm.py): the real-time GLM is calibrated on the phantom's calibration runs; on each live run the
plan is the shown onsets moved by uniform noise of +-J s (what a participant-paced or drifting presentation does to a
fixed plan). Three estimators see the same volumes: ``planned`` uses the plan only (rt-mindeye before live events),
``live`` starts from the plan and is revised (``RealtimeGLM.revise_events``) as each report arrives, before the volume
that follows the onset, and ``shown`` is started with the shown onsets (the reference ``live`` must equal). Score:
median over responsive voxels of the correlation across trials with the true betas, for the early estimate (each
trial's first) and the final one. Timing (synthetic voxel time series): one revision late in a run (a trial moved
inside the volumes already used, and a trial reported before its volumes), against one volume's add_volume.

Prints tables and writes bench/results/live_events.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rt_mindeye.process import cli_path, single_threaded_numerics  # noqa: E402

single_threaded_numerics()

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rt_mindeye.glm.config import RealtimeConfig  # noqa: E402
from rt_mindeye.glm.design import RunEvents  # noqa: E402
from rt_mindeye.glm.estimator import GLMSingle  # noqa: E402
from rt_mindeye.glm.realtime import RealtimeGLM  # noqa: E402
from rt_mindeye.glm.synthetic import make_session, median_correlation  # noqa: E402
from rt_mindeye.timing import percentiles  # noqa: E402

console = Console()


def _stream(glm: RealtimeGLM, data: np.ndarray, reports: dict[int, list[RunEvents]] | None = None) -> dict:
    """Feed a run; ``reports[i]``: designs to revise to before volume ``i``. First and final estimate per trial."""
    first, revise_ms = {}, []
    for i, row in enumerate(data):
        for events in (reports or {}).get(i, ()):
            t = time.perf_counter()
            out = glm.revise_events(events, origin=np.arange(len(events)))
            revise_ms.append((time.perf_counter() - t) * 1e3)
            for e in out:
                first.setdefault(e.trial, e.betas)
        for e in glm.add_volume(i, row):
            first.setdefault(e.trial, e.betas)
    final = {e.trial: e.betas for e in glm.end_run()}
    return {"first": first, "final": final, "revise_ms": revise_ms}


def accuracy(jitters: list[float], quick: bool, seed: int) -> dict:
    from rt_mindeye.phantom.config import phantom_config
    from rt_mindeye.phantom.session import simulate_session

    overrides = {} if quick else {"n_runs": 6, "calibration_runs": 3, "trials_per_run": 30, "repeated_images": 20}
    ps = simulate_session(phantom_config("small", **overrides), subject=1, seed=seed)
    runs = [ps.visual_timeseries(r) for r in range(ps.n_runs)]
    shown = [RunEvents.from_records(ps.events(r), condition_column="stim_file") for r in range(ps.n_runs)]
    truth = [np.asarray(b, dtype=np.float64) for b in ps.betas]
    responsive = np.asarray(ps.subject.responsive, dtype=bool)
    cal_runs = list(ps.calibration_runs or [0])
    live_runs = [r for r in range(ps.n_runs) if r not in cal_runs]
    tr = ps.tr
    calibration = GLMSingle(model="d").fit([runs[r] for r in cal_runs], [shown[r] for r in cal_runs], tr).calibration_
    rng = np.random.default_rng(seed)
    out = {"phantom": {"overrides": overrides, "seed": seed, "live_runs": len(live_runs),
                       "trials": int(sum(len(shown[r]) for r in live_runs)), "voxels": int(runs[0].shape[1]),
                       "responsive": int(responsive.sum())}, "by_jitter": {}}
    for jitter in jitters:
        scores = {name: {"first": [], "final": []} for name in ("planned", "live", "shown")}
        revise_ms, worst = [], 0.0
        for r in live_runs:
            actual = shown[r]
            planned_onsets = np.maximum(actual.onsets + rng.uniform(-jitter, jitter, len(actual)), 0.0)
            order = np.argsort(planned_onsets, kind="stable")
            if np.any(order != np.arange(len(actual))):
                planned_onsets = np.sort(planned_onsets)  # keep the trial order of the plan (a jitter, not a swap)
            plan = RunEvents(planned_onsets, actual.durations, actual.trial_types)
            # The reports: trial k's onset becomes known before the volume after it.
            reports: dict[int, list[RunEvents]] = {}
            for k in range(len(actual)):
                onsets = np.where(np.arange(len(actual)) <= k, actual.onsets, plan.onsets)
                if np.any(np.diff(onsets) < 0):  # a shown trial overtakes a planned one not reported yet
                    onsets = np.maximum.accumulate(onsets)
                at = min(int(np.floor(actual.onsets[k] / tr)) + 1, runs[r].shape[0] - 1)
                reports.setdefault(at, []).append(RunEvents(onsets, actual.durations, actual.trial_types))
            n = runs[r].shape[0]
            runs_out = {
                "planned": _stream(RealtimeGLM(calibration, RealtimeConfig()).start_run(plan, tr, n_volumes=n),
                                   runs[r]),
                "live": _stream(RealtimeGLM(calibration, RealtimeConfig()).start_run(plan, tr, n_volumes=n),
                                runs[r], reports),
                "shown": _stream(RealtimeGLM(calibration, RealtimeConfig()).start_run(actual, tr, n_volumes=n),
                                 runs[r]),
            }
            revise_ms += runs_out["live"]["revise_ms"]
            worst = max(worst, max(float(np.abs(runs_out["live"]["final"][k] - runs_out["shown"]["final"][k]).max())
                                   for k in runs_out["shown"]["final"]))
            for name, got in runs_out.items():
                for kind in ("first", "final"):
                    scores[name][kind].append(np.stack([got[kind][k] for k in range(len(actual))]))
        live_truth = np.concatenate([truth[r] for r in live_runs])
        out["by_jitter"][str(jitter)] = {
            name: {kind: median_correlation(np.concatenate(v).astype(np.float64), live_truth, responsive)
                   for kind, v in kinds.items()} for name, kinds in scores.items()}
        out["by_jitter"][str(jitter)]["revise_ms_phantom"] = percentiles(revise_ms)
        out["by_jitter"][str(jitter)]["live_vs_shown_final_max_abs_diff"] = worst
    return out


def timing(n_voxels: int, n_frames: int, seed: int) -> dict:
    """One revision late in a run at the realistic voxel count, against one volume's add_volume."""
    s = make_session(seed=seed, n_runs=3, n_frames=n_frames, n_vox=n_voxels, n_conditions=40, repeats=2)
    calibration = GLMSingle(model="b").fit(s.runs[:2], s.events[:2], s.tr).calibration_
    data, events = s.runs[2], s.events[2]
    glm = RealtimeGLM(calibration, RealtimeConfig()).start_run(events, s.tr, n_volumes=n_frames)
    stop = int(events.onsets[-3] / s.tr) + 6
    add_ms = []
    for i in range(stop):
        t = time.perf_counter()
        glm.add_volume(i, data[i])
        add_ms.append((time.perf_counter() - t) * 1e3)
    moved = events.onsets.copy()
    moved[-3] += 0.8  # a trial already inside the volumes used: its rows and the trial terms are rebuilt
    inside = []
    for step in range(5):
        onsets = moved if step % 2 == 0 else events.onsets
        t = time.perf_counter()
        glm.revise_events(RunEvents(onsets, events.durations, events.trial_types), origin=np.arange(len(events)))
        inside.append((time.perf_counter() - t) * 1e3)
    ahead = events.onsets.copy()
    ahead[-1] += 0.8  # a trial reported before its volumes
    before = []
    for step in range(5):
        onsets = ahead if step % 2 == 0 else events.onsets
        t = time.perf_counter()
        glm.revise_events(RunEvents(onsets, events.durations, events.trial_types), origin=np.arange(len(events)))
        before.append((time.perf_counter() - t) * 1e3)
    return {"voxels": n_voxels, "volumes_so_far": stop, "trials": len(events),
            "add_volume_ms": percentiles(add_ms[5:]), "revise_moved_inside_ms": percentiles(inside),
            "revise_reported_ahead_ms": percentiles(before)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small phantom, 2000 voxels for the timing")
    parser.add_argument("--jitter", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="plan-to-shown onset differences, uniform +- this many seconds")
    parser.add_argument("--timing-voxels", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=cli_path, default=ROOT / "bench" / "results" / "live_events.json")
    args = parser.parse_args(argv)
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "node": platform.node()}, "quick": args.quick}
    results["accuracy"] = accuracy(args.jitter, args.quick, args.seed)
    table = Table(title="median r with the true betas, live runs (phantom: BOLD made with the shown onsets)")
    for column in ("plan vs shown", "planned: first", "live: first", "shown: first", "planned: final", "live: final",
                   "shown: final", "revise ms p50/p99"):
        table.add_column(column, justify="right")
    for jitter, row in results["accuracy"]["by_jitter"].items():
        ms = row["revise_ms_phantom"]
        table.add_row(f"+-{jitter} s", *(f"{row[n]['first']:.3f}" for n in ("planned", "live", "shown")),
                      *(f"{row[n]['final']:.3f}" for n in ("planned", "live", "shown")),
                      f"{ms['p50']:.1f} / {ms['p99']:.1f}")
    console.print(table)
    results["timing"] = timing(2000 if args.quick else args.timing_voxels, 190, args.seed)
    t = results["timing"]
    timing_table = Table(title=f"cost late in a run ({t['voxels']} voxels, {t['volumes_so_far']} volumes, "
                               f"{t['trials']} trials)")
    for column in ("operation", "p50 ms", "p99 ms"):
        timing_table.add_column(column, justify="right" if column != "operation" else "left")
    for key, label in (("add_volume_ms", "add_volume (one volume)"),
                       ("revise_moved_inside_ms", "revise: a trial moved inside the volumes used"),
                       ("revise_reported_ahead_ms", "revise: a trial reported before its volumes")):
        timing_table.add_row(label, f"{t[key]['p50']:.1f}", f"{t[key]['p99']:.1f}")
    console.print(timing_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
