"""Motion gating: every trial estimate carries the largest framewise displacement over its window, trials over
``motion.gate_fd_mm`` are marked, and calibration leaves them out of fine-tuning and counts them."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.calibration.workflow import _motion_gate
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.estimator import GLMCalibration
from rt_mindeye.glm.realtime import RealtimeGLM
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.series import RunEnded, RunStarted, VolumeReady
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.geometry import RigidTransform
from rt_mindeye.preprocess.motion import MotionCorrector, resample_to_target
from rt_mindeye.runtime.events_planner import EventsPlanner
from rt_mindeye.runtime.scanner import ScannerPipeline
from rt_mindeye.transport.messages import TrialBetas, VolumeStatus

JERK = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.5])  # mm, degrees: FD about 1.4 mm at the jerk, far over any gate


def test_a_head_jerk_gates_the_trials_whose_window_it_falls_in(calibrated_phantom):
    phantom = calibrated_phantom
    volumes = [read_volume(p) for p in phantom.live_files]
    at = len(volumes) // 2
    bundle = CalibrationBundle.open(phantom.bundle_dir)
    centre = bundle.reference().affine @ np.r_[(np.array(volumes[0].data.shape) - 1) / 2, 1.0]
    moved = RigidTransform.from_params(JERK, centre[:3])
    volumes = volumes[:at] + [dataclasses.replace(v, data=resample_to_target(v.data, v.affine, v.data.shape, v.affine,
                                                                             moved, order=1)) for v in volumes[at:]]
    motion = MotionConfig()
    pipeline = ScannerPipeline(reference=bundle.reference(), mask=bundle.glm_mask(),
                               glm=RealtimeGLM(GLMCalibration.load(bundle.glm_dir)), motion=MotionCorrector(motion),
                               planner=EventsPlanner(phantom.phantom_dir / "events", 3), session="gate")
    pipeline.warm_up()
    out = pipeline.handle(RunStarted(volumes[0].series, 0.0))
    for volume in volumes:
        out += pipeline.handle(VolumeReady(volume, 0.0))
    out += pipeline.handle(RunEnded(volumes[0].series, 0.0, len(volumes), 0, "closed"))

    fd = np.array([m.fd for m in out if isinstance(m, VolumeStatus)])
    fd[0] = 0.0
    assert fd[at] > 1.0 and np.argmax(fd) == at
    tr = pipeline.glm.tr_
    trials = [m for m in out if isinstance(m, TrialBetas)]
    gated_trials = set()
    for m in trials:
        # The window: from the volume of the onset to gate_window_s later, up to the estimate's newest volume.
        first = int(math.floor(m.onset / tr))
        newest = int(math.ceil(m.onset / tr)) + m.n_volumes - 1  # n_volumes counts the volumes from the onset on
        last = min(int(math.floor((m.onset + motion.gate_window_s) / tr)), newest, len(fd) - 1)
        expected = float(np.max(fd[first:last + 1]))
        assert abs(m.fd_max_mm - expected) < 1e-9
        assert m.motion_gated == (expected > motion.gate_fd_mm)
        if m.motion_gated and m.estimate_kind == "final":
            gated_trials.add(m.trial)
    finals = {m.trial: m for m in trials if m.estimate_kind == "final"}
    hit = {t for t, m in finals.items() if math.floor(m.onset / tr) <= at <= (m.onset + motion.gate_window_s) / tr}
    assert hit and hit <= gated_trials
    assert len(gated_trials) < len(finals)  # trials far from the jerk (and the phantom's own small jerks) pass


def test_calibration_counts_and_leaves_out_the_gated_trials(calibrated_phantom):
    # The gate on the calibration runs' estimated motion: a jerk in the second run gates its trials around it.
    tr = 1.5
    still = np.zeros((60, 6))
    jerky = still.copy()
    jerky[30:, 0] = 0.8  # a 0.8 mm step at volume 30
    events = [RunEvents(np.array([3.0, 20.0, 38.0, 44.0, 70.0]), np.full(5, 3.0), ("a",) * 5)] * 2
    gate = _motion_gate(MotionConfig(), [still, jerky], events, tr)
    assert gate.tolist() == [False] * 5 + [False, False, True, True, False]
    assert not _motion_gate(MotionConfig(gate_fd_mm=1.0), [still, jerky], events, tr).any()
    # The calibration the session tests use reports the count; by default the gated trials are left out.
    report = json.loads((calibrated_phantom.bundle_dir / "report.json").read_text())
    assert report["n_excluded_from_finetuning"] == report["n_motion_gated"] <= report["n_trials"]
    assert "motion gate:" in (calibrated_phantom.bundle_dir / "report.md").read_text()
