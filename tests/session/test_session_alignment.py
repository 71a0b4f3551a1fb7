"""Session-start alignment: a live run whose head sits far from where it was at calibration (another day) still
gives the calibration-space betas, because the pipeline registers the reference to the first volume once."""

from __future__ import annotations

import dataclasses

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.glm.estimator import GLMCalibration
from rt_mindeye.glm.realtime import RealtimeGLM
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.series import RunEnded, RunStarted, VolumeReady
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.geometry import RigidTransform
from rt_mindeye.preprocess.motion import MotionCorrector, resample_to_target
from rt_mindeye.runtime.scanner import ScannerPipeline
from rt_mindeye.runtime.events_planner import EventsPlanner
from rt_mindeye.transport.messages import TrialBetas, VolumeStatus

# Between sessions the head can sit a centimetre or more away and turned by several degrees.
SESSION_SHIFT = np.array([8.0, -6.0, 2.0, 2.0, -2.0, 6.0])  # mm, degrees


def _run_pipeline(phantom, volumes, align: bool):
    bundle = CalibrationBundle.open(phantom.bundle_dir)
    pipeline = ScannerPipeline(
        reference=bundle.reference(), mask=bundle.glm_mask(),
        glm=RealtimeGLM(GLMCalibration.load(bundle.glm_dir)), motion=MotionCorrector(MotionConfig()),
        planner=EventsPlanner(phantom.phantom_dir / "events", 3), session="another-day", align_session_start=align)
    pipeline.warm_up()
    series = volumes[0].series
    out = pipeline.handle(RunStarted(series, 0.0))
    for volume in volumes:
        out += pipeline.handle(VolumeReady(volume, 0.0))
    out += pipeline.handle(RunEnded(series, 0.0, len(volumes), 0, "closed"))
    status = [m for m in out if isinstance(m, VolumeStatus)]
    final = {m.trial: m.betas for m in out if isinstance(m, TrialBetas) and m.estimate_kind == "final"}
    return pipeline, status, np.stack([final[k] for k in sorted(final)])


def _moved(volume, transform: RigidTransform):
    """The same volume with the head displaced by ``transform`` (head point p now sits at transform(p))."""
    data = resample_to_target(volume.data, volume.affine, volume.data.shape, volume.affine, transform, order=1)
    return dataclasses.replace(volume, data=data)


def test_a_run_from_another_day_is_aligned_to_the_calibration_reference(calibrated_phantom):
    volumes = [read_volume(p) for p in calibrated_phantom.live_files]
    centre = CalibrationBundle.open(calibrated_phantom.bundle_dir).reference().affine @ np.r_[
        (np.array(volumes[0].data.shape) - 1) / 2, 1.0]
    today = RigidTransform.from_params(SESSION_SHIFT, centre[:3])
    moved = [_moved(v, today) for v in volumes]

    _, _, same_day = _run_pipeline(calibrated_phantom, volumes, align=False)
    pipeline, status, aligned = _run_pipeline(calibrated_phantom, moved, align=True)
    status = [m for m in status if not m.gap]

    # The one careful registration finds the displacement (to a fraction of the 4 mm voxels and of a degree)...
    found = pipeline.session_transform.matrix
    assert np.abs(found[:3, 3] - today.matrix[:3, 3]).max() < 1.0
    assert np.degrees(np.arccos(np.clip((np.trace(found[:3, :3].T @ today.matrix[:3, :3]) - 1) / 2, -1, 1))) < 1.0
    assert "align" in status[0].stage_ms and "align" not in status[1].stage_ms
    # ...motion correction continues from it (the in-run motion is small again)...
    params = np.array([m.motion for m in status])
    assert np.abs(params[:, :3] - SESSION_SHIFT[:3]).max() < 2.0
    assert max(m.fd for m in status) < 1.0
    # ...and each voxel's betas follow those of the calibration day (12 trials; moving the volumes resamples them
    # once more, and voxels at the slab's edge lose signal, so not all voxels agree perfectly).
    spread_a, spread_s = aligned.astype(np.float64).std(axis=0), same_day.astype(np.float64).std(axis=0)
    inside = (np.all(np.isfinite(aligned), axis=0) & (spread_a > 1e-3 * np.median(spread_a))
              & (spread_s > 1e-3 * np.median(spread_s)))
    r = [np.corrcoef(same_day[:, v], aligned[:, v])[0, 1] for v in np.flatnonzero(inside)]
    assert inside.mean() > 0.9 and np.median(r) > 0.6
