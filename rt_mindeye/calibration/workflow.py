"""`rt-mindeye calibrate`: from the session's first runs to a frozen calibration bundle.

Steps, each a small function a test can drive alone:

1. find the calibration runs' DICOMs (by the scanner's file-name pattern) and their planned events;
2. motion-correct every volume to the reference (the first volume of the first calibration run) with the same
   :class:`~rt_mindeye.preprocess.motion.MotionCorrector` the live runs use, and keep the GLM voxels' time series;
3. fit the offline GLM (GLMsingle type a-d) on them;
4. choose the decoder's voxels: anatomical mask ∩ repeat reliability;
5. fine-tune the pretrained shared MindEye2 model on the calibration betas within the time budget, holding some
   trials out to report retrieval before the live runs;
6. write the bundle (see :mod:`rt_mindeye.calibration.bundle`) and its report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rt_mindeye.calibration.bundle import (BundleInfo, BundlePaths, CalibrationBundle, save_volume_nifti,
                                           write_bundle_info)
from rt_mindeye.calibration.config import CalibrationConfig
from rt_mindeye.errors import SessionError
from rt_mindeye.ingest.config import WatcherConfig
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.masks import load_mask
from rt_mindeye.preprocess.motion import MotionCorrector, head_mask
from rt_mindeye.volume import Volume

log = logging.getLogger("rt_mindeye.calibration")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class RunFiles:
    """One run of the session as found on disk."""

    ordinal: int
    """1-based position of the run in the session (series order)."""
    series: int
    files: tuple[Path, ...]
    """The run's DICOMs ordered by volume number."""


@dataclass
class CalibrationResult:
    bundle: CalibrationBundle
    n_glm_voxels: int
    n_decoder_voxels: int
    n_trials: int
    reliability_median: float
    holdout_top1: float | None
    holdout_chance: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    n_motion_gated: int = 0
    """Calibration trials over the motion gate (motion.gate_fd_mm in their window)."""
    n_excluded: int = 0
    """Of those, left out of fine-tuning (calibration.exclude_motion_gated)."""


Progress = Callable[[str], None]


# --- 1. inputs ------------------------------------------------------------------------------------------------------


def discover_runs(dicom_dir: Path, watcher: WatcherConfig | None = None) -> list[RunFiles]:
    """Group the export folder's files into runs by series number (file-name pattern), ordered by series."""
    watcher = watcher or WatcherConfig()
    by_series: dict[int, list[tuple[int, Path]]] = {}
    for path in sorted(Path(dicom_dir).iterdir()):
        parsed = watcher.parse_name(path.name)
        if parsed is None:
            continue
        series, volume = parsed
        by_series.setdefault(series, []).append((volume, path))
    if not by_series:
        raise SessionError(dicom_dir, f"no file matches the export pattern {watcher.pattern!r}")
    return [RunFiles(ordinal=i + 1, series=s, files=tuple(p for _, p in sorted(by_series[s])))
            for i, s in enumerate(sorted(by_series))]


def find_events(events_dir: Path, ordinal: int) -> Path:
    path = Path(events_dir) / f"run-{ordinal:02d}_events.tsv"
    if not path.is_file():
        raise SessionError(path, f"no planned events for run {ordinal}: expected run-{ordinal:02d}_events.tsv "
                                 f"in {events_dir}")
    return path


def read_event_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def onset_ordered(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Rows sorted by onset (stable), the order in which the GLMs number a run's trials."""
    def onset(row):
        try:
            return float(row.get("onset", "nan"))
        except ValueError:
            return float("nan")

    return sorted(rows, key=onset)


def list_stimuli(stimuli_dir: Path) -> list[Path]:
    files = sorted(p for p in Path(stimuli_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SessionError(stimuli_dir, "no stimulus images (png/jpg) found")
    return files


def stimulus_ids(rows: Sequence[dict[str, str]], stimuli: Sequence[Path], source: Path) -> np.ndarray:
    """Index into ``stimuli`` of each trial's ``stim_file`` (matched by file name)."""
    by_name = {p.name: i for i, p in enumerate(stimuli)}
    ids = []
    for row in rows:
        name = Path(row.get("stim_file") or "").name
        if name not in by_name:
            raise SessionError(source, f"stim_file {row.get('stim_file')!r} is not among the stimulus images")
        ids.append(by_name[name])
    return np.asarray(ids, dtype=np.int64)


# --- 2. motion-corrected time series --------------------------------------------------------------------------------


def glm_voxel_mask(reference: Volume, anatomical: np.ndarray, noise_pool_voxels: int) -> np.ndarray:
    """Anatomical voxels plus an even subsample of the other head voxels (noise-pool candidates)."""
    outside = head_mask(reference.data) & ~anatomical
    candidates = np.flatnonzero(outside.ravel())
    if noise_pool_voxels and candidates.size:
        step = max(1, candidates.size // noise_pool_voxels)
        candidates = candidates[::step][:noise_pool_voxels]
    else:
        candidates = candidates[:0]
    mask = anatomical.copy().ravel()
    mask[candidates] = True
    return mask.reshape(anatomical.shape)


def corrected_timeseries(files: Sequence[Path], corrector: MotionCorrector, mask: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(T, V) float32 voxel time series and (T, 6) motion parameters of one run. Voxels a volume did not acquire
    (moved out of the slab) take the voxel's mean over the run's other volumes (:func:`fill_not_acquired`)."""
    from rt_mindeye.glm.missing import fill_not_acquired

    series, motion = [], []
    for path in files:
        result = corrector.update(read_volume(path))
        series.append(result.voxels)
        motion.append(result.params)
    reference = corrector.reference_.data[tuple(corrector.voxel_indices_.T)]
    data, n_missing = fill_not_acquired(np.asarray(series, dtype=np.float32), reference)
    if n_missing.any():
        log.info("%s: %d of %d voxels were outside the imaged slab in some volumes (%d in every one); filled with "
                 "their mean over the run", Path(files[0]).parent, int((n_missing > 0).sum()), n_missing.size,
                 int((n_missing == len(files)).sum()))
    return data, np.asarray(motion, dtype=np.float64)


# --- the workflow ---------------------------------------------------------------------------------------------------


def calibrate(session_dir: str | Path, out_dir: str | Path, config: CalibrationConfig | None = None, *,
              dicom_dir: str | Path | None = None, motion: MotionConfig | None = None,
              watcher: WatcherConfig | None = None, session_id: str | None = None,
              progress: Progress | None = None) -> CalibrationResult:
    """Run the calibration workflow on ``session_dir`` and write the bundle to ``out_dir``."""
    config = config or CalibrationConfig()
    say = progress or (lambda text: log.info(text))
    session_dir = Path(session_dir)
    out = Path(out_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    dicom_dir = Path(dicom_dir) if dicom_dir else _first_existing(session_dir, ("sourcedata/dicom", "dicom"))
    events_dir = config.events_dir or _first_existing(session_dir, ("events", "func"))
    stimuli_dir = config.stimuli_dir or session_dir / "stimuli"
    runs = discover_runs(dicom_dir, watcher)
    if len(runs) < config.calibration_runs:
        raise SessionError(dicom_dir, f"{len(runs)} run(s) found, the configuration asks for "
                                      f"{config.calibration_runs} calibration runs")
    calib = runs[:config.calibration_runs]
    events = [find_events(events_dir, r.ordinal) for r in calib]
    rows = [onset_ordered(read_event_rows(p)) for p in events]
    stimuli = list_stimuli(stimuli_dir)
    image_ids = np.concatenate([stimulus_ids(r, stimuli, p) for r, p in zip(rows, events)])
    say(f"calibration runs: {', '.join(f'{r.ordinal} (series {r.series}, {len(r.files)} volumes)' for r in calib)}")

    # 2. reference, masks, motion-corrected series
    reference = read_volume(calib[0].files[0])
    anatomical = (load_mask(config.anatomical_mask, reference) if config.anatomical_mask
                  else head_mask(reference.data))
    glm_mask = glm_voxel_mask(reference, anatomical, config.noise_pool_voxels)
    corrector = MotionCorrector(motion or MotionConfig()).fit(reference, voxel_mask=glm_mask)
    series, motion_params = [], []
    for run in calib:
        say(f"motion correction: run {run.ordinal}")
        ts, params = corrected_timeseries(run.files, corrector, glm_mask)
        series.append(ts)
        motion_params.append(params)
    lap("motion")

    # 3. offline GLM
    from rt_mindeye.glm.estimator import GLMSingle

    say(f"GLM type {config.glm.model} on {int(glm_mask.sum())} voxels x {sum(len(s) for s in series)} volumes")
    from rt_mindeye.glm.design import RunEvents

    run_events = [RunEvents.from_tsv(p, condition_column=config.condition_column) for p in events]
    glm_motion = motion_params if config.motion_regressors else None
    glm = GLMSingle.from_config(config.glm).fit(series, run_events, reference.tr or 1.0, motion=glm_motion)
    lap("glm")

    # 4. decoder voxels: anatomical ∩ reliability
    from rt_mindeye.preprocess.masks import reliability, reliability_mask

    z = glm.zscored_betas()
    anat_in_glm = anatomical[glm_mask]
    conditions = [str(i) for i in image_ids]
    scores = reliability(z, conditions)
    if not np.isfinite(scores[anat_in_glm]).any():
        # No image was repeated within the calibration runs: reliability is undefined, keep the anatomical mask.
        say("no repeated image in the calibration runs: repeat reliability is undefined, keeping every anatomical "
            "voxel (repeat some images across calibration runs to select voxels)")
        keep = anat_in_glm.copy()
    elif config.reliability_threshold is not None:
        keep = reliability_mask(z, conditions, threshold=config.reliability_threshold, anatomical_mask=anat_in_glm)
    else:
        top_n = max(1, int(round(config.reliability_top_fraction * anat_in_glm.sum())))
        keep = reliability_mask(z, conditions, top_n=top_n, anatomical_mask=anat_in_glm)
    if not keep.any():
        raise SessionError(session_dir, "no voxel passes the reliability selection: lower "
                                        "calibration.reliability_threshold or check the events")
    decoder_index = np.flatnonzero(keep)
    decoder_mask = np.zeros(glm_mask.shape, dtype=bool)
    decoder_mask.ravel()[np.flatnonzero(glm_mask.ravel())[decoder_index]] = True
    finite = scores[keep][np.isfinite(scores[keep])]
    rel_median = float(np.median(finite)) if finite.size else float("nan")
    say(f"decoder voxels: {decoder_index.size} of {int(anatomical.sum())} anatomical "
        f"(median repeat reliability {rel_median:.3f})")
    lap("masks")

    # 5. fine-tune on the betas the live decoder will see, without the trials over the motion gate
    gate = _motion_gate(motion or MotionConfig(), motion_params, run_events, reference.tr or 1.0)
    excluded = gate if config.exclude_motion_gated and not gate.all() else np.zeros_like(gate)
    say(f"motion gate (FD > {(motion or MotionConfig()).gate_fd_mm:g} mm in a trial's window): {int(gate.sum())} of "
        f"{gate.size} trials" + (", left out of fine-tuning" if excluded.any() else ""))
    train_betas, train_ids, train_trials = finetune_set(config, glm, z, series, run_events, glm_motion,
                                                        reference.tr or 1.0, image_ids)
    holdout_top1, chance, n_epochs = _finetune(out, config, train_betas[:, decoder_index], train_ids, stimuli, say,
                                               exclude=excluded[train_trials])
    lap("finetune")

    # 6. bundle
    paths = BundlePaths(out)
    save_volume_nifti(paths.reference_path, reference.data, reference.affine)
    save_volume_nifti(paths.mask_path, decoder_mask.astype(np.uint8), reference.affine)
    save_volume_nifti(paths.glm_mask_path, glm_mask.astype(np.uint8), reference.affine)
    glm.calibration_.save(paths.glm_dir)
    np.save(paths.decoder_index_path, decoder_index)
    info = BundleInfo(
        subject=config.subject, session=session_id or session_dir.name, shape=tuple(reference.shape),
        voxel_size=tuple(float(v) for v in reference.voxel_sizes),
        affine=tuple(tuple(float(v) for v in row) for row in reference.affine), tr=float(reference.tr or 0.0),
        n_voxels=int(decoder_index.size), calibration_runs=tuple(r.ordinal for r in calib),
        extra={"glm_voxels": int(glm_mask.sum()), "glm_model": config.glm.model, "embedder": config.embedder,
               "condition_column": config.condition_column, "motion_regressors": config.motion_regressors,
               "finetune_epochs": n_epochs, "ensemble_members": config.ensemble_members,
               "reliability_median": rel_median})
    bundle = write_bundle_info(out, info)
    result = CalibrationResult(bundle=bundle, n_glm_voxels=int(glm_mask.sum()), n_decoder_voxels=int(decoder_index.size),
                               n_trials=int(z.shape[0]), reliability_median=rel_median, holdout_top1=holdout_top1,
                               holdout_chance=chance, seconds=timings, n_motion_gated=int(gate.sum()),
                               n_excluded=int(excluded.sum()))
    _write_report(bundle, result, config)
    say(f"bundle written: {out}")
    return result


def realtime_replay(calibration, glm_config, series: Sequence[np.ndarray], run_events, motion: Sequence | None,
                    tr: float, kinds: Sequence[str] = ("early", "refined", "final")) -> tuple[np.ndarray, np.ndarray]:
    """Replay the calibration runs through the real-time estimator with the frozen calibration, volume by volume as
    the scanner host would: the z-scored estimates of every trial, one row per (kind, trial) (``refined``: the last
    refined estimate), and each row's trial index into the runs' trials (onset order, runs concatenated)."""
    from rt_mindeye.glm.realtime import RealtimeGLM

    rows, index = [], []
    first = 0
    for r, (data, events) in enumerate(zip(series, run_events)):
        rt = RealtimeGLM(calibration, glm_config).start_run(events, tr, run=r, n_volumes=len(data))
        got: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in kinds}
        for i, volume in enumerate(data):
            params = None if motion is None else motion[r][i]
            for estimate in rt.add_volume(i, volume, motion_params=params):
                if estimate.kind in got and (estimate.kind != "early" or estimate.trial not in got["early"]):
                    got[estimate.kind][estimate.trial] = estimate.betas
        for estimate in rt.end_run():
            if "final" in got:
                got["final"][estimate.trial] = estimate.betas
        for kind in kinds:
            for trial, betas in sorted(got[kind].items()):
                rows.append(betas)
                index.append(first + trial)
        first += len(events)
    return np.asarray(rows, dtype=np.float32), np.asarray(index, dtype=np.int64)


def finetune_set(config: CalibrationConfig, glm, offline_z: np.ndarray, series, run_events, motion, tr: float,
                 image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fine-tuning betas (all voxels), their image ids and calibration-trial indices, per
    ``config.finetune_betas``: the offline fit's betas, the calibration runs replayed through the real-time estimator
    (what the live decoder sees), or both."""
    parts, trials = [], []
    if config.finetune_betas in ("offline", "both"):
        parts.append(offline_z)
        trials.append(np.arange(len(image_ids)))
    if config.finetune_betas in ("realtime", "both"):
        replayed, trial = realtime_replay(glm.calibration_, config.glm, series, run_events, motion, tr)
        parts.append(replayed)
        trials.append(trial)
    trial = np.concatenate(trials)
    return np.concatenate(parts), image_ids[trial], trial


def offline_betas(bundle: CalibrationBundle, dicom_dir: Path, events_dir: Path, ordinals: Sequence[int],
                  stimuli: Sequence[Path], config: CalibrationConfig | None = None,
                  motion: MotionConfig | None = None, watcher: WatcherConfig | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The offline type-d GLM of runs ``ordinals`` (1-based), fitted on those runs alone with the calibration's GLM
    settings, motion-corrected to the bundle's reference, z-scored with its own statistics (as an offline analysis
    z-scores a session; another fit's statistics would mis-scale betas that are regularised differently) and cut to
    the decoder's voxels: the offline reference against which real-time estimates of the same runs are judged.
    Returns (betas (trials, decoder voxels), index into ``stimuli`` per trial), trials in run then onset order.

    Without ``config``, the events column that identified repeats in the calibration and its choice of motion
    regressors (both recorded in the bundle) are used: the type-d fit cross-validates across repeats, so a generic
    column (every trial ``image``) would make every trial a repeat of one condition and spoil the betas."""
    from rt_mindeye.glm.design import RunEvents
    from rt_mindeye.glm.estimator import GLMSingle

    # Bundles written before motion_regressors was recorded used the motion parameters.
    config = config or CalibrationConfig(condition_column=str(bundle.info.extra.get("condition_column", "trial_type")),
                                         motion_regressors=bool(bundle.info.extra.get("motion_regressors", True)))
    runs = {r.ordinal: r for r in discover_runs(dicom_dir, watcher)}
    missing = [o for o in ordinals if o not in runs]
    if missing:
        raise SessionError(dicom_dir, f"run(s) {missing} not found")
    glm_mask = bundle.glm_mask()
    reference = bundle.reference()
    corrector = MotionCorrector(motion or MotionConfig()).fit(reference, voxel_mask=glm_mask)
    series, params, events, ids = [], [], [], []
    for ordinal in ordinals:
        ts, mp = corrected_timeseries(runs[ordinal].files, corrector, glm_mask)
        series.append(ts)
        params.append(mp)
        path = find_events(events_dir, ordinal)
        events.append(RunEvents.from_tsv(path, condition_column=config.condition_column))
        ids.append(stimulus_ids(onset_ordered(read_event_rows(path)), stimuli, path))
    fit = GLMSingle.from_config(config.glm).fit(series, events, reference.tr or 1.0,
                                                motion=params if config.motion_regressors else None)
    return fit.zscored_betas()[:, bundle.decoder_index()], np.concatenate(ids)


def _first_existing(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise SessionError(root, f"none of {', '.join(names)} exists in the session folder")


def make_embedder(config: CalibrationConfig):
    from rt_mindeye.model.embedders import OpenCLIPBigGEmbedder, PhantomEmbedder

    if config.embedder == "openclip":
        if config.openclip_checkpoint is None:
            raise SessionError(None, "calibration.openclip_checkpoint: the openclip embedder needs a local ViT-bigG/14 "
                                     "weights file")
        return OpenCLIPBigGEmbedder(config.openclip_checkpoint)
    return PhantomEmbedder()


def load_images(paths: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224))) for p in paths])


def _motion_gate(motion: MotionConfig, params: Sequence[np.ndarray], events, tr: float) -> np.ndarray:
    """Which calibration trials (run, then onset order) moved more than the gate in their window."""
    from rt_mindeye.preprocess.gating import gated, trial_fd_max
    from rt_mindeye.preprocess.geometry import framewise_displacement

    out = []
    for run_params, run_events in zip(params, events):
        fd = [0.0] + [framewise_displacement(a, b, motion.fd_radius_mm) for a, b in zip(run_params, run_params[1:])]
        out.append(gated(trial_fd_max(run_events.onsets, fd, tr, motion.gate_window_s), motion.gate_fd_mm))
    return np.concatenate(out)


def _finetune(out: Path, config: CalibrationConfig, betas: np.ndarray, image_ids: np.ndarray,
              stimuli: Sequence[Path], say: Progress, exclude: np.ndarray | None = None
              ) -> tuple[float | None, float | None, int]:
    """Fine-tune the shared model on the calibration betas; write model/ and candidates.npz; held-out top-1."""
    import torch

    from rt_mindeye.model.data import LowLevelModels, identity_stats, image_targets, subject_data
    from rt_mindeye.model.train import finetune

    embedder = make_embedder(config)
    images = load_images(stimuli)
    say(f"embedding {len(stimuli)} stimulus images ({type(embedder).__name__})")
    low_level = None
    if config.blurry_vae is not None:  # the full model: VAE-latent and ConvNeXt targets from local weights
        low_level = LowLevelModels.from_files(config.blurry_vae, config.convnext_checkpoint, seed=config.train.seed)
    targets = image_targets(images, embedder, low_level=low_level)
    from rt_mindeye.eval.decoding import split_by_image

    # Whole images are held out (repeated ones first), so no image is on both sides: a random split by trial would
    # score the model on repeats of images it was trained on.
    holdout = split_by_image(image_ids, config.holdout_fraction, seed=config.train.seed)
    n = betas.shape[0]
    stats = identity_stats(betas.shape[1])  # the betas are already z-scored
    exclude = np.zeros(n, dtype=bool) if exclude is None else exclude
    train = subject_data(betas, image_ids, targets, stats, name=config.subject, keep=~holdout & ~exclude)
    val = subject_data(betas, image_ids, targets, stats, name=config.subject, keep=holdout) if holdout.any() else None
    paths = BundlePaths(out)
    model_dir = paths.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    if config.pretrained is None:
        raise SessionError(None, "calibration.pretrained: a shared MindEye2 checkpoint is needed (run "
                                 "`rt-mindeye pretrain` or give the published last.pth)")
    members = config.ensemble_members
    say(f"fine-tuning {config.pretrained} on {len(train)} trials (budget {config.train.time_budget_min} min"
        + (f", {members} ensemble members of {config.train.time_budget_min / members:.2f} min)" if members > 1 else ")"))
    for stale in paths.model_checkpoints()[1:]:  # a re-calibration with fewer members must not decode with old ones
        stale.unlink()
    models, epochs = [], 0
    for member in range(members):
        member_train = dataclasses.replace(config.train, seed=config.train.seed + member,
                                           time_budget_min=config.train.time_budget_min / members)
        model, result = finetune(config.pretrained, train, member_train,
                                 checkpoint_path=model_dir / paths.member_checkpoint_name(member),
                                 validation=val, progress=False, log=say)
        models.append(model.eval())
        epochs += int(result.epochs)
    candidates = targets.tokens.numpy().astype(np.float32)
    np.savez(paths.candidates_path, tokens=candidates, ids=np.arange(len(stimuli)),
             files=np.array([p.name for p in stimuli]))
    top1 = None
    chance = None
    if val is not None:
        from rt_mindeye.eval.decoding import top1_among_candidates, two_afc_hardest

        from rt_mindeye.model.ensemble import average_normalised

        with torch.no_grad():
            clip = average_normalised([m(val.voxels.float()).clip_voxels for m in models])
        every = np.arange(len(stimuli))
        top1 = top1_among_candidates(clip, image_ids[holdout], candidates, every)
        afc = two_afc_hardest(clip, image_ids[holdout], candidates, every)
        chance = 1.0 / len(stimuli)
        say(f"held-out calibration retrieval ({int(holdout.sum())} trials of {len(np.unique(image_ids[holdout]))} "
            f"images never trained on): top-1 {top1:.2%} among {len(stimuli)} images (chance {chance:.2%}), "
            f"2AFC against the most similar image {afc:.1%}")
    return top1, chance, epochs


def _write_report(bundle: CalibrationBundle, result: CalibrationResult, config: CalibrationConfig) -> None:
    lines = [
        f"# Calibration report: subject {bundle.info.subject}, session {bundle.info.session}",
        "",
        f"- created {bundle.info.created} by rt-mindeye {bundle.info.software}",
        f"- calibration runs: {', '.join(map(str, bundle.info.calibration_runs))}; {result.n_trials} trials",
        f"- GLM type {config.glm.model} on {result.n_glm_voxels} voxels",
        f"- decoder voxels: {result.n_decoder_voxels} (median repeat reliability {result.reliability_median:.3f})",
        f"- motion gate: {result.n_motion_gated} of {result.n_trials} trials over it, {result.n_excluded} left out "
        "of fine-tuning",
    ]
    if result.holdout_top1 is not None:
        lines.append(f"- held-out calibration retrieval: top-1 {result.holdout_top1:.1%} "
                     f"(chance {result.holdout_chance:.1%})")
    lines.append("- time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    bundle.report_path.write_text("\n".join(lines) + "\n")
    (bundle.root / "report.json").write_text(json.dumps({
        "n_glm_voxels": result.n_glm_voxels, "n_decoder_voxels": result.n_decoder_voxels,
        "n_trials": result.n_trials, "reliability_median": result.reliability_median,
        "n_motion_gated": result.n_motion_gated, "n_excluded_from_finetuning": result.n_excluded,
        "holdout_top1": result.holdout_top1, "holdout_chance": result.holdout_chance, "seconds": result.seconds,
    }, indent=2))
