"""Motion regressors in the calibration workflow's GLM: with or without, scored against the phantom's true betas.

    python bench/motion_regressors.py [--seeds 1,2,3] [--noise-pool 3000]

For each seed, the demo's phantom session (``rt-mindeye demo --seed N`` makes the same one: 6 calibration and 4 live
runs of 32 trials, a moving head, Siemens mosaic DICOMs) is written to a temporary folder and the calibration
workflow's GLM steps are run on its DICOMs as ``rt-mindeye calibrate`` runs them: motion correction to the first
volume, the visual mask plus ``--noise-pool`` other head voxels, type-d fit of the calibration runs, the decoder's
voxels by repeat reliability, the calibration runs replayed through the real-time estimator, the live runs through
it volume by volume, and the offline type-d fit of the live runs alone; once with the motion parameters as nuisance
regressors (the old default) and once without (``calibration.motion_regressors: false``, the new one).

Scores, on the live runs' 128 trials and the decoder's voxels:

* the median over trials of the correlation across voxels with the phantom's true betas (z-scored with the
  calibration trials' statistics), for the first (5-volume), last refined, end-of-run and offline betas;
* top-1 retrieval among every stimulus of the session by a ridge map voxels -> image tokens (EfficientNet-Lite0,
  the decoder's targets) fitted on the calibration replay: a decoder without training noise.

Prints a table and writes ``bench/results/motion_regressors.json``. Deterministic; about 35 s per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("early", "refined", "final", "offline")


def corrected_session(phantom_dir: Path, noise_pool: int) -> dict:
    """The session's runs as the calibration workflow reads them, once for both fits: motion-corrected voxel series
    (the visual mask plus ``noise_pool`` other head voxels), motion parameters, events and stimulus ids per run."""
    from rt_mindeye.calibration import workflow as wf
    from rt_mindeye.glm.design import RunEvents
    from rt_mindeye.ingest.dicom import read_volume
    from rt_mindeye.preprocess.masks import load_mask
    from rt_mindeye.preprocess.motion import MotionCorrector

    runs = wf.discover_runs(phantom_dir / "dicom")
    reference = read_volume(runs[0].files[0])
    anatomical = load_mask(phantom_dir / "truth" / "visual_mask.nii.gz", reference)
    glm_mask = wf.glm_voxel_mask(reference, anatomical, noise_pool)
    corrector = MotionCorrector().fit(reference, voxel_mask=glm_mask)
    stimuli = wf.list_stimuli(phantom_dir / "stimuli")
    series, params, events, ids = [], [], [], []
    for run in runs:
        data, motion = wf.corrected_timeseries(run.files, corrector, glm_mask)
        series.append(data)
        params.append(motion)
        path = wf.find_events(phantom_dir / "events", run.ordinal)
        events.append(RunEvents.from_tsv(path, condition_column="stim_file"))
        ids.append(wf.stimulus_ids(wf.onset_ordered(wf.read_event_rows(path)), stimuli, path))
    return {"phantom_dir": phantom_dir, "runs": runs, "reference": reference, "anatomical": anatomical,
            "glm_mask": glm_mask, "stimuli": stimuli, "series": series, "params": params, "events": events,
            "ids": ids}


def session_sets(session: dict, n_calibration: int, with_motion: bool, config=None) -> dict:
    """Calibration replay, live estimates of every kind and the truth, on the decoder's voxels."""
    import nibabel as nib

    from rt_mindeye.calibration import workflow as wf
    from rt_mindeye.glm.config import GLMConfig
    from rt_mindeye.glm.estimator import GLMSingle
    from rt_mindeye.preprocess.masks import reliability_mask

    phantom_dir, runs, reference = session["phantom_dir"], session["runs"], session["reference"]
    anatomical, glm_mask = session["anatomical"], session["glm_mask"]
    series, params, events, ids = session["series"], session["params"], session["events"], session["ids"]
    config = config or GLMConfig()
    cal, live = slice(0, n_calibration), slice(n_calibration, len(runs))
    cal_motion, live_motion = (params[cal], params[live]) if with_motion else (None, None)
    fit = GLMSingle.from_config(config).fit(series[cal], events[cal], reference.tr,
                                            motion=cal_motion)
    calibration_ids = np.concatenate(ids[cal])
    in_anatomy = anatomical[glm_mask]
    decoder = reliability_mask(fit.zscored_betas(), [str(i) for i in calibration_ids],
                               top_n=int(round(0.6 * in_anatomy.sum())), anatomical_mask=in_anatomy)
    replay, replay_trial = wf.realtime_replay(fit.calibration_, config, series[cal], events[cal],
                                              cal_motion, reference.tr)
    # The live runs through the same replay as the calibration runs: per run, the rows of each kind in trial order.
    live_rows, _ = wf.realtime_replay(fit.calibration_, config, series[live], events[live],
                                               live_motion, reference.tr)
    sizes = [len(e) for e in events[live]]
    if len(live_rows) != 3 * sum(sizes):
        raise RuntimeError("a live trial got no estimate of some kind: the tables would mix trials")
    kinds = np.concatenate([np.repeat(["early", "refined", "final"], n) for n in sizes])
    live_fit = GLMSingle.from_config(config).fit(series[live], events[live], reference.tr,
                                                 motion=live_motion)
    test = {kind: live_rows[kinds == kind] for kind in ("early", "refined", "final")}
    test["offline"] = live_fit.zscored_betas()

    # The phantom's true betas at the decoder's voxels (session space is the first volume's grid).
    world = np.argwhere(glm_mask)[decoder] @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    truth_mask = nib.load(phantom_dir / "truth" / "visual_mask.nii.gz")
    grid = np.rint((world - truth_mask.affine[:3, 3]) @ np.linalg.inv(truth_mask.affine[:3, :3]).T).astype(int)
    column = {tuple(v): k for k, v in enumerate(np.load(phantom_dir / "truth" / "voxel_indices.npy"))}
    columns = np.array([column[tuple(g)] for g in grid])
    truth = np.concatenate([np.load(phantom_dir / "truth" / f"run-{r.ordinal:02d}_betas.npy")[:, columns]
                            for r in runs])
    n_cal = len(calibration_ids)
    truth = (truth - truth[:n_cal].mean(0)) / (truth[:n_cal].std(0) + 1e-8)
    return {"train": replay[:, decoder], "train_ids": calibration_ids[replay_trial],
            "test": {k: v[:, decoder] for k, v in test.items()}, "test_ids": np.concatenate(ids[live]),
            "truth": truth[n_cal:], "decoder_voxels": int(decoder.sum())}


def row_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def score(sets: dict, tokens: torch.Tensor) -> dict:
    from rt_mindeye.eval.decoding import top1_among_candidates
    from rt_mindeye.model.adapt import ridge_fit

    weights, bias, alpha = ridge_fit(torch.tensor(sets["train"]), tokens[torch.as_tensor(sets["train_ids"])].flatten(1),
                                     alphas=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
    candidates = torch.arange(len(tokens))
    out = {"alpha": alpha, "decoder_voxels": sets["decoder_voxels"], "trials": int(len(sets["test_ids"]))}
    for kind in KINDS:
        betas = sets["test"][kind]
        predicted = (torch.tensor(betas) @ weights + bias).reshape(len(betas), *tokens.shape[1:])
        out[kind] = {"r_true": float(np.median(row_correlation(betas, sets["truth"]))),
                     "ridge_top1": float(top1_among_candidates(predicted, sets["test_ids"], tokens, candidates))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3", help="demo seeds (comma-separated)")
    parser.add_argument("--noise-pool", type=int, default=3000, help="head voxels outside the mask given to the GLM")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "motion_regressors.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from rt_mindeye.calibration.workflow import load_images
    from rt_mindeye.model.data import image_targets
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.phantom.export import write_session
    from rt_mindeye.phantom.session import simulate_session
    from rt_mindeye.runtime.demo import DEMO_SUBJECT, demo_phantom_config

    console = Console()
    cfg = demo_phantom_config()
    results = {}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            phantom_dir = write_session(simulate_session(cfg, subject=DEMO_SUBJECT, seed=seed), Path(tmp) / "phantom")
            session = corrected_session(phantom_dir, args.noise_pool)
            tokens = torch.as_tensor(image_targets(load_images(session["stimuli"]), PhantomEmbedder()).tokens)
            for with_motion in (True, False):
                sets = session_sets(session, cfg.calibration_runs, with_motion)
                results[f"{seed}/{'with' if with_motion else 'without'}"] = score(sets, tokens.float())
        console.print(f"seed {seed}: {time.perf_counter() - began:.0f} s")

    table = Table(title="calibration GLM with / without motion regressors: live trials, decoder voxels "
                        "(r with true betas, median over trials; ridge top-1 among the session's stimuli)")
    for column in ("seed", "motion regressors", *(f"r {k}" for k in KINDS), "ridge top-1 first / offline"):
        table.add_column(column)
    for key, res in results.items():
        seed, which = key.split("/")
        table.add_row(seed, which, *(f"{res[k]['r_true']:.3f}" for k in KINDS),
                      f"{res['early']['ridge_top1']:.1%} / {res['offline']['ridge_top1']:.1%}")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"noise_pool": args.noise_pool, "results": results}, indent=2))
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
