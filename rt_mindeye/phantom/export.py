"""``write_session``: a simulated session on disk, laid out as a scanner export plus the ground truth.

::

    out/
      session.json                      tr, runs (series number, volumes, calibration flag, start time), preset,
                                        subject, seed, config, software version, file pattern, truth index
      dicom/001_SSSSSS_VVVVVV.dcm       one file per volume (mosaic, or XA multi-frame with ``xa=True``)
      events/run-XX_events.tsv          BIDS events: onset duration trial_type stim_file image_index trial ...
      stimuli/NNNN_name.png             every image the session shows (224 px RGB)
      truth/run-XX_betas.npy            (n_trials_run, V) float32 true betas, % signal change
      truth/run-XX_motion.tsv           trans_x/y/z (mm), rot_x/y/z (rad), framewise_displacement (mm)
      truth/hrf_index.npy               (V,) GLMsingle library column per visual voxel
      truth/voxel_indices.npy           (V, 3) [row, column, slice] of the visual voxels (order of every (.., V))
      truth/responsive.npy              (V,) bool
      truth/tuned_responses.npy         (n_images, V) z-scored image tuning
      truth/{brain,visual,responsive}_mask.nii.gz   masks in session space (affine of the acquisition grid)
      truth/reference.nii.gz            noiseless, motionless baseline volume (anatomy x coil)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from rt_mindeye import __version__
from rt_mindeye.config import to_mapping
from rt_mindeye.errors import SessionError
from rt_mindeye.phantom.dicom_writer import FILE_PATTERN, SeriesGeometry, SeriesWriter, series_uids, volume_uid
from rt_mindeye.phantom.session import MOTION_COLUMNS, SESSION_DATE, PhantomSession
from rt_mindeye.phantom.stimuli import save_stimuli

EVENT_COLUMNS = ("onset", "duration", "trial_type", "stim_file", "image_index", "stimulus_index", "trial",
                 "session_trial", "repeat", "n_presentations")


def series_geometry(session: PhantomSession, run: int) -> SeriesGeometry:
    info = session.runs[run]
    uids = series_uids(session.seed, session.subject.subject_id, info.series_number)
    return SeriesGeometry(
        affine=session.affine, shape=session.shape, tr_s=session.tr, echo_time_ms=session.config.echo_time_ms,
        slice_times_s=session.slice_times(), series_number=info.series_number,
        series_description=f"func_task-images_run-{run + 1:02d}", study_uid=uids["study"], series_uid=uids["series"],
        frame_of_reference_uid=uids["frame"], patient_id=f"sub-{session.subject.subject_id:02d}", date=SESSION_DATE,
        series_time_s=info.start_time_s - 2.0, study_time_s=session.runs[0].start_time_s - 600.0)


def write_events(session: PhantomSession, run: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(EVENT_COLUMNS)
        for event in session.events(run):
            writer.writerow([f"{event[c]:.3f}" if isinstance(event[c], float) else event[c] for c in EVENT_COLUMNS])
    return path


def read_events(path: str | Path) -> list[dict]:
    """Rows of an events TSV written by :func:`write_session` (numbers converted)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        for key in ("onset", "duration"):
            row[key] = float(row[key])
        for key in ("image_index", "stimulus_index", "trial", "session_trial", "repeat", "n_presentations"):
            row[key] = int(row[key])
    return rows


def _write_motion(session: PhantomSession, run: int, path: Path) -> None:
    fd = session.framewise_displacement(run)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(list(MOTION_COLUMNS) + ["framewise_displacement"])
        for params, d in zip(session.motion[run], fd):
            writer.writerow([f"{v:.8f}" for v in params] + [f"{d:.6f}"])


def write_truth(session: PhantomSession, truth: Path) -> None:
    truth.mkdir(parents=True, exist_ok=True)
    for r in range(session.n_runs):
        np.save(truth / f"run-{r + 1:02d}_betas.npy", session.betas[r])
        _write_motion(session, r, truth / f"run-{r + 1:02d}_motion.tsv")
    np.save(truth / "hrf_index.npy", session.hrf_index.astype(np.int16))
    np.save(truth / "voxel_indices.npy", session.voxel_indices.astype(np.int32))
    np.save(truth / "responsive.npy", session.subject.responsive)
    np.save(truth / "mean_response.npy", session.subject.mean_response)
    np.save(truth / "tuned_responses.npy", session.tuned_responses)
    for name, mask in session.masks.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), session.affine), truth / f"{name}_mask.nii.gz")
    reference = session.subject.anatomy * session.subject.coil
    nib.save(nib.Nifti1Image(reference.astype(np.float32), session.affine), truth / "reference.nii.gz")


def session_manifest(session: PhantomSession, xa: bool = False) -> dict:
    cfg = session.config
    return {
        "software": "rt-mindeye", "version": __version__, "kind": "phantom",
        "preset": cfg.preset, "subject": session.subject.subject_id, "seed": session.seed,
        "tr": cfg.tr_s, "shape": list(session.shape), "affine": session.affine.tolist(),
        "dicom_flavour": "siemens-xa-enhanced" if xa else "siemens-mosaic",
        "file_pattern": FILE_PATTERN, "volume_numbering": "1-based",
        "slice_times": session.slice_times().tolist(), "slice_timing_simulated": cfg.slice_timing,
        "calibration_runs": session.calibration_runs,
        "runs": [{"run": r.index + 1, "series_number": r.series_number, "n_volumes": r.n_volumes,
                  "n_trials": len(r.trials), "calibration": r.calibration, "start_time_s": r.start_time_s,
                  "events": f"events/run-{r.index + 1:02d}_events.tsv",
                  "betas": f"truth/run-{r.index + 1:02d}_betas.npy",
                  "motion": f"truth/run-{r.index + 1:02d}_motion.tsv"} for r in session.runs],
        "n_visual_voxels": session.subject.n_voxels,
        "n_images": len(session.stimuli),
        "motion_convention": "x' = R (x - centre) + centre + t in RAS mm; R = Rz Ry Rx; rotations in radians; "
                             "session space = first volume of the first run",
        "motion_centre_mm": session.subject.head_centre_world.tolist(),
        "betas_unit": "percent signal change (peak of the HRF convolved with the stimulus duration)",
        "config": to_mapping(cfg),
    }


def _study_uid(path: Path) -> str | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
    except (OSError, InvalidDicomError, AttributeError, EOFError):  # unreadable or foreign: "another study"
        return None


class OutputExistsError(SessionError):
    """The output folder already holds DICOM files of another session (mixing two sessions would corrupt both)."""


def write_session(session: PhantomSession, out_dir: str | Path, xa: bool = False, runs: list[int] | None = None,
                  progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False) -> Path:
    """Write the session (all runs, or the 0-based ``runs``) under ``out_dir`` (see the module docstring).

    DICOM files already in ``dicom/`` are replaced when they come from the same phantom study (same subject and seed,
    e.g. an interrupted earlier write) or when ``overwrite`` is set; files of any other study make it refuse
    (:class:`OutputExistsError`), because two sessions mixed in one export folder corrupt both.
    """
    out = Path(out_dir)
    existing = sorted((out / "dicom").glob("*.dcm")) if (out / "dicom").is_dir() else []
    if existing and not overwrite and _study_uid(existing[0]) != series_uids(session.seed, session.subject.subject_id,
                                                                             0)["study"]:
        raise OutputExistsError(out / "dicom", f"already holds {len(existing)} DICOM files of another study; choose "
                                               "an empty folder or overwrite")
    for path in existing:
        path.unlink()
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    save_stimuli(session.stimuli, out / "stimuli", images=session.images)
    write_truth(session, out / "truth")
    selected = list(range(session.n_runs)) if runs is None else list(runs)
    total = sum(session.runs[r].n_volumes for r in selected)
    done = 0
    for r in selected:
        write_events(session, r, out / "events" / f"run-{r + 1:02d}_events.tsv")
        info = session.runs[r]
        writer = SeriesWriter(series_geometry(session, r), xa=xa)
        times = session.acquisition_times(r)
        for v, volume in enumerate(session.iter_volumes(r)):
            name = FILE_PATTERN.format(series=info.series_number, volume=v + 1)
            writer.write(out / "dicom" / name, volume, v + 1, float(times[v]),
                         sop_uid=volume_uid(session.seed, session.subject.subject_id, info.series_number, v + 1))
            done += 1
            if progress is not None:
                progress(f"run {r + 1}", done, total)
    (out / "session.json").write_text(json.dumps(session_manifest(session, xa), indent=2))
    return out
