"""Benchmark of real-time motion correction: time per volume (estimate + reslice) and error against the true motion.

Run from the repository root::

    python bench/preprocess.py            # realistic phantom (104x104x72, 2 mm), 40 volumes
    python bench/preprocess.py --quick    # 8 volumes, few baseline volumes (smoke run)
    python bench/preprocess.py --synthetic   # the analytic synthetic head instead of the phantom

Methods (all register to the first volume = the phantom's session space, so the phantom's motion is the truth):

- ``sitk_tuned`` (the chosen setting, rt_mindeye.preprocess.MotionCorrector) with 1 and 2 ITK threads;
- ``sitk_multires``: SimpleITK's standard tutorial setting (Mattes MI on 10% random samples, 3-level pyramid
  4/2/1 with smoothing 2/1/0 voxels, regular-step gradient descent up to 100 iterations per level, scales from
  physical shift, identity start), the baseline;
- ``numba_gn_mask_only``: the same, reslicing only the voxels the GLM uses (the phantom's visual mask)
  instead of the whole volume (``MotionConfig(full_reslice=False)`` + ``fit(..., voxel_mask=...)``);
- ``scipy_reslice``: the tuned estimate resliced with ``scipy.ndimage.affine_transform`` instead of SimpleITK
  (reslice time only);
- ``numba_gn``: the same objective solved by inverse-compositional Gauss-Newton with a numba reslice
  (``MotionConfig(engine="numba")``, rt_mindeye.preprocess.gauss_newton; serial kernels).

Prints a rich table and writes ``bench/results/preprocess.json``. Timings on a busy machine are not meaningful:
compare ratios within one run.
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

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import SimpleITK as sitk  # noqa: E402
from scipy import ndimage  # noqa: E402

from rt_mindeye.preprocess.config import MotionConfig  # noqa: E402
from rt_mindeye.preprocess.geometry import RigidTransform, volume_center_ras, volume_to_sitk  # noqa: E402
from rt_mindeye.preprocess.motion import MotionCorrector  # noqa: E402
from rt_mindeye.preprocess.synthetic import SyntheticHead, make_affine, make_volume, random_motions  # noqa: E402

RESULTS = REPO / "bench" / "results" / "preprocess.json"


# --- data ---------------------------------------------------------------------------------------------------------


def phantom_series(n_volumes: int):
    """(volumes, true params in the rt_mindeye convention, description) from the realistic phantom."""
    from rt_mindeye.phantom import brain
    from rt_mindeye.phantom.config import phantom_config
    from rt_mindeye.phantom.session import simulate_session

    # Only the first run's volumes are needed: keep the session small so it simulates quickly.
    cfg = phantom_config("realistic", n_runs=3, calibration_runs=1, repeats=3, trials_per_run=20,
                         repeated_images=10)
    session = simulate_session(cfg, subject=1, seed=0)
    n = min(n_volumes, session.runs[0].n_volumes)
    volumes, truth = [], []
    center = volume_center_ras(session.shape, session.affine)
    for t, data in enumerate(session.iter_volumes(0)):
        if t >= n:
            break
        volumes.append(make_volume(data, session.affine, index=t + 1, tr=session.tr))
        # The phantom's params rotate about the head centre, in radians; re-express the same map in ours.
        matrix = brain.rigid_matrix(session.motion[0][t], session.subject.head_centre_world)
        truth.append(RigidTransform.from_matrix(matrix, center).params)
    return (volumes, np.array(truth), f"phantom realistic {session.shape} {tuple(cfg.voxel_size_mm)} mm",
            session.masks["visual"])


def synthetic_series(n_volumes: int):
    shape = (104, 104, 72)
    affine = make_affine(shape, 2.0, rotation_deg=(8.0, 0.0, 0.0))
    head = SyntheticHead.fitting(shape, affine, seed=1)
    center = volume_center_ras(shape, affine)
    truth = random_motions(n_volumes, max_translation_mm=2.0, max_rotation_deg=2.0, seed=2, step_fraction=0.1)
    volumes = [make_volume(head.sample(shape, affine, RigidTransform.from_params(p, center)), affine, index=i + 1)
               for i, p in enumerate(truth)]
    # A visual-cortex-sized block of voxels (~20k) at the back of the head.
    voxel_mask = np.zeros(shape, dtype=bool)
    voxel_mask[32:72, 10:35, 20:40] = True
    return volumes, truth, f"synthetic head {shape} 2 mm", voxel_mask


# --- methods ------------------------------------------------------------------------------------------------------


def run_tuned(volumes, threads: int, engine: str = "sitk", voxel_mask=None):
    config = MotionConfig(threads=threads, engine=engine, full_reslice=voxel_mask is None)
    corrector = MotionCorrector(config).fit(volumes[0], voxel_mask=voxel_mask)
    corrector.update(volumes[0])  # warm-up (first call pays one-off allocations)
    corrector.reset()
    params, wall, cpu, reslice = [], [], [], []
    for volume in volumes:
        cpu0 = time.process_time()
        result = corrector.update(volume)
        cpu.append(time.process_time() - cpu0)
        wall.append(result.elapsed_s)
        reslice.append(result.reslice_s)
        params.append(result.params)
    return np.array(params), np.array(wall), np.array(cpu), np.array(reslice), corrector


def run_multires(volumes, threads: int):
    """SimpleITK's standard multi-resolution rigid registration, each volume from identity (the baseline)."""
    reference = volumes[0]
    fixed = volume_to_sitk(reference)
    center = volume_center_ras(reference.shape, reference.affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetNumberOfThreads(threads)
    params, wall, cpu = [], [], []
    for volume in volumes:
        cpu0, t0 = time.process_time(), time.perf_counter()
        moving = volume_to_sitk(volume)
        registration = sitk.ImageRegistrationMethod()
        registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        registration.SetMetricSamplingStrategy(registration.RANDOM)
        registration.SetMetricSamplingPercentage(0.1, 1)
        registration.SetInterpolator(sitk.sitkLinear)
        registration.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                              numberOfIterations=100, relaxationFactor=0.5)
        registration.SetOptimizerScalesFromPhysicalShift()
        registration.SetShrinkFactorsPerLevel([4, 2, 1])
        registration.SetSmoothingSigmasPerLevel([2, 1, 0])
        registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        registration.SetNumberOfThreads(threads)
        transform = RigidTransform.identity(center).to_sitk()
        registration.SetInitialTransform(transform, inPlace=True)
        registration.Execute(fixed, moving)
        resampler.SetTransform(transform)
        sitk.GetArrayFromImage(resampler.Execute(moving))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - cpu0)
        params.append(RigidTransform.from_sitk(transform, center).params)
    return np.array(params), np.array(wall), np.array(cpu)


def scipy_reslice_times(volumes, estimates, reference):
    """Time to reslice each volume with scipy (linear) through the tuned estimate, and its agreement with ITK's."""
    affine = reference.affine
    times = []
    for volume, params in zip(volumes, estimates):
        t0 = time.perf_counter()
        motion = RigidTransform.from_params(params, volume_center_ras(reference.shape, affine)).matrix
        # reference voxel -> world -> moved world -> moving voxel
        voxel_map = np.linalg.inv(volume.affine) @ motion @ affine
        ndimage.affine_transform(volume.data, voxel_map[:3, :3], offset=voxel_map[:3, 3], order=1, mode="constant",
                                 cval=0.0)
        times.append(time.perf_counter() - t0)
    return np.array(times)


def jump_robustness(reference, magnitudes, repeats: int):
    """Worst error after one registration from identity, for jumps of +-m mm on each axis and +-m degrees about each.

    The moved volumes are the reference resampled (B-spline) through the known motion.
    """
    center = volume_center_ras(reference.shape, reference.affine)
    image = volume_to_sitk(reference)
    rng = np.random.default_rng(5)
    correctors = {engine: MotionCorrector(MotionConfig(engine=engine)).fit(reference) for engine in ("sitk", "numba")}
    rows = []
    for magnitude in magnitudes:
        worst = {engine: 0.0 for engine in correctors}
        for _ in range(repeats):
            truth = rng.choice([-1.0, 1.0], size=6) * magnitude
            motion = RigidTransform.from_params(truth, center)
            moved = sitk.Resample(image, image, motion.inverse().to_sitk(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
            volume = make_volume(sitk.GetArrayFromImage(moved).transpose(2, 1, 0), reference.affine)
            for engine, corrector in correctors.items():
                corrector.reset()
                worst[engine] = max(worst[engine], float(np.abs(corrector.update(volume).params - truth).max()))
        rows.append({"jump_mm_deg": magnitude, **{f"{engine}_max_err": worst[engine] for engine in correctors}})
    return rows


# --- reporting ----------------------------------------------------------------------------------------------------


def summarize(name, params, truth, wall, cpu=None, note=""):
    err = np.abs(np.asarray(params) - np.asarray(truth)[: len(params)])
    row = {
        "method": name,
        "n_volumes": int(len(wall)),
        "p50_ms": float(np.percentile(wall, 50) * 1e3),
        "p99_ms": float(np.percentile(wall, 99) * 1e3),
        "median_trans_err_mm": float(np.median(err[:, :3])) if len(err) else None,
        "max_trans_err_mm": float(err[:, :3].max()) if len(err) else None,
        "median_rot_err_deg": float(np.median(err[:, 3:])) if len(err) else None,
        "max_rot_err_deg": float(err[:, 3:].max()) if len(err) else None,
        "cpu_per_wall": float(np.sum(cpu) / np.sum(wall)) if cpu is not None else None,
        "note": note,
    }
    return row


def print_table(rows, baseline, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "n", "p50 ms", "p99 ms", "x baseline p50", "trans err mm (med/max)",
                   "rot err deg (med/max)", "cpu/wall", "note"):
        table.add_column(column)
    base = next((r["p50_ms"] for r in rows if r["method"] == baseline), None)
    for r in rows:
        err_t, err_r = "-", "-"
        if r["median_trans_err_mm"] is not None:
            err_t = f"{r['median_trans_err_mm']:.3f} / {r['max_trans_err_mm']:.3f}"
            err_r = f"{r['median_rot_err_deg']:.3f} / {r['max_rot_err_deg']:.3f}"
        ratio = f"{r['p50_ms'] / base:.2f}" if base else "-"
        cpu = "-" if r["cpu_per_wall"] is None else f"{r['cpu_per_wall']:.2f}"
        table.add_row(r["method"], str(r["n_volumes"]), f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", ratio, err_t,
                      err_r, cpu, r["note"])
    Console(width=170).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few volumes: a smoke run")
    parser.add_argument("--synthetic", action="store_true", help="use the analytic synthetic head, not the phantom")
    parser.add_argument("--volumes", type=int, default=None, help="volumes for the real-time methods (default 40)")
    parser.add_argument("--baseline-volumes", type=int, default=None,
                        help="volumes for the slow multi-resolution baseline (default 10)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n_volumes = args.volumes or (8 if args.quick else 40)
    n_baseline = args.baseline_volumes or (2 if args.quick else 10)

    t0 = time.perf_counter()
    source = "synthetic"
    if not args.synthetic:
        try:
            volumes, truth, description, voxel_mask = phantom_series(n_volumes)
            source = "phantom"
        except ImportError as exc:  # the phantom package may not be there yet
            print(f"phantom unavailable ({exc}); using the synthetic head")
            volumes, truth, description, voxel_mask = synthetic_series(n_volumes)
    else:
        volumes, truth, description, voxel_mask = synthetic_series(n_volumes)
    print(f"data: {description}, {len(volumes)} volumes, made in {time.perf_counter() - t0:.1f} s")

    rows = []
    estimates = None
    reference = volumes[0]
    for threads in (1, 2):
        params, wall, cpu, reslice, corrector = run_tuned(volumes, threads)
        rows.append(summarize(f"sitk_tuned_{threads}thread", params, truth, wall, cpu,
                              note=f"reslice p50 {np.median(reslice) * 1e3:.1f} ms"))
        if threads == 1:
            estimates = params
    params, wall, cpu, reslice, _ = run_tuned(volumes, 1, engine="numba")
    rows.append(summarize("numba_gn", params, truth, wall, cpu, note=f"reslice p50 {np.median(reslice) * 1e3:.1f} ms"))
    params, wall, cpu, reslice, _ = run_tuned(volumes, 1, engine="numba", voxel_mask=voxel_mask)
    rows.append(summarize("numba_gn_mask_only", params, truth, wall, cpu,
                          note=f"reslice of {int(voxel_mask.sum())} mask voxels only, "
                               f"p50 {np.median(reslice) * 1e3:.1f} ms"))
    scipy_times = scipy_reslice_times(volumes, estimates, reference)
    rows.append(summarize("scipy_reslice_only", [], [], scipy_times, note="linear, tuned estimate; reslice only"))
    params, wall, cpu = run_multires(volumes[:n_baseline], threads=2)
    rows.append(summarize("sitk_multires_2thread", params, truth, wall, cpu,
                          note="standard setting, from identity"))

    title = f"motion correction per volume: {description}"
    print_table(rows, "sitk_multires_2thread", title)
    robustness = jump_robustness(reference, (1.0, 2.0, 3.0, 4.0) if args.quick else (0.5, 1.0, 2.0, 3.0, 4.0, 6.0),
                                 repeats=2 if args.quick else 5)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="jump of +-m mm/deg on all 6 params, one registration from identity: worst error")
    for column in ("m", "sitk_tuned", "numba_gn"):
        table.add_column(column)
    for row in robustness:
        table.add_row(f"{row['jump_mm_deg']:.1f}", f"{row['sitk_max_err']:.3f}", f"{row['numba_max_err']:.3f}")
    Console(width=170).print(table)
    report = {
        "benchmark": "preprocess",
        "data": description,
        "source": source,
        "quick": bool(args.quick),
        "n_volumes": len(volumes),
        "baseline": "sitk_multires_2thread",
        "targets": {"p50_ms": 70.0, "median_trans_err_mm": 0.1, "median_rot_err_deg": 0.1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "simpleitk": sitk.Version_VersionString()},
        "results": rows,
        "jump_robustness": robustness,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
