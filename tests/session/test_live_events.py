"""Live stimulus events drive the design: on the phantom's live run, reports with jittered onsets, a planned trial
that was not shown, a trial shown but not planned and a report that comes after its volumes give the betas of a run
planned with what was actually shown; disagreements and the clock offset are reported."""

from __future__ import annotations

import csv
import json
import math

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.glm.estimator import GLMCalibration
from rt_mindeye.glm.realtime import RealtimeGLM
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.series import RunEnded, RunStarted, VolumeReady
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.motion import MotionCorrector
from rt_mindeye.runtime.events_planner import EventsPlanner
from rt_mindeye.runtime.live_events import LiveRunDesign, TriggerSeen
from rt_mindeye.runtime.scanner import ScannerPipeline
from rt_mindeye.timing import volume_epoch
from rt_mindeye.transport.messages import DesignNotice, StimulusEvent, TrialBetas

RUN = 3
TRIGGER_DELAY_S = 0.037  # the trigger message reaches the scanner host this long after the first volume starts


def _read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _pipeline(phantom, events_dir, tmp_path, name):
    bundle = CalibrationBundle.open(phantom.bundle_dir)
    pipeline = ScannerPipeline(
        reference=bundle.reference(), mask=bundle.glm_mask(),
        glm=RealtimeGLM(GLMCalibration.load(bundle.glm_dir)), motion=MotionCorrector(MotionConfig()),
        planner=EventsPlanner(events_dir, RUN), session="live", func_dir=tmp_path / name / "func",
        design_dir=tmp_path / name / "design")
    pipeline.warm_up()
    return pipeline


def _drive(pipeline, volumes, reports_before):
    """Feed the run; ``reports_before[i]``: stimulus messages handed over just before volume ``i``."""
    series = volumes[0].series
    out = pipeline.handle(RunStarted(series, 0.0))
    for i, volume in enumerate(volumes):
        for message in reports_before.get(i, ()):
            out += pipeline.handle(message)
        out += pipeline.handle(VolumeReady(volume, 0.0))
    out += pipeline.handle(RunEnded(series, 0.0, len(volumes), 0, "closed"))
    return out


def test_reported_onsets_drive_the_design(calibrated_phantom, tmp_path):
    phantom = calibrated_phantom
    volumes = [read_volume(p) for p in phantom.live_files]
    tr = float(RealtimeGLM(GLMCalibration.load(CalibrationBundle.open(phantom.bundle_dir).glm_dir))._resolve()[0].tr)
    planned = sorted(_read_rows(phantom.phantom_dir / "events" / f"run-{RUN:02d}_events.tsv"),
                     key=lambda r: float(r["onset"]))
    n = len(planned)
    rng = np.random.default_rng(11)
    jitter = rng.uniform(-0.9, 0.9, n)
    skipped, late = 5, 8  # planned trial 5 is not shown; trial 8's report comes 8 volumes after its onset
    # What the stimulus computer showed: jittered onsets, trial 5 left out, an unplanned image after trial 2.
    shown = [dict(r, onset=f"{float(r['onset']) + jitter[i]:.4f}") for i, r in enumerate(planned) if i != skipped]
    extra_onset = (float(planned[2]["onset"]) + float(planned[3]["onset"])) / 2 + 0.2
    shown.append(dict(planned[2], onset=f"{extra_onset:.4f}", stim_file="stimuli/not_in_the_plan.png"))
    shown.sort(key=lambda r: float(r["onset"]))
    truth_dir = tmp_path / "as_shown"
    _write_rows(truth_dir / f"run-{RUN:02d}_events.tsv", shown)

    anchor = volume_epoch(volumes[0])
    reports = {0: [TriggerSeen(RUN, anchor + TRIGGER_DELAY_S)]}
    for number, row in enumerate(shown, start=1):
        onset = float(row["onset"])
        # A report leaves the stimulus computer when the image appears: it is here before the volume that follows.
        arrival = int(math.floor(onset / tr)) + 1 + (8 if row["stim_file"] == planned[late]["stim_file"] else 0)
        event = StimulusEvent(session="live", run=RUN, trial=number, onset=onset, duration=float(row["duration"]),
                              trial_type=row["trial_type"], stim_file=row["stim_file"])
        reports.setdefault(min(arrival, len(volumes) - 1), []).append(event)

    live = _drive(_pipeline(phantom, phantom.phantom_dir / "events", tmp_path, "live"), volumes, reports)
    fitted = _drive(_pipeline(phantom, truth_dir, tmp_path, "fitted"), volumes, {})

    def by_onset(messages, kind):
        return {round(m.onset, 3): m for m in messages if isinstance(m, TrialBetas) and m.estimate_kind == kind}

    # The final betas are those of a run planned with what was shown, trial for trial.
    final_live, final_fitted = by_onset(live, "final"), by_onset(fitted, "final")
    assert sorted(final_live) == sorted(final_fitted) and len(final_live) == n
    for onset, m in final_live.items():
        np.testing.assert_allclose(m.betas, final_fitted[onset].betas, rtol=1e-4, atol=1e-4)
    # So are the live estimates: the early estimate of a trial reported before its volumes is the one a run planned
    # with what was shown gives, unless it was made while the late trial was missing from the design: then a
    # revision follows once that report comes. The late trial's own estimate comes at once from all its volumes.
    early_live, early_fitted = by_onset(live, "early"), by_onset(fitted, "early")
    late_onset = round(float(shown[[r["stim_file"] for r in shown].index(planned[late]["stim_file"])]["onset"]), 3)
    revised = [m for m in live if isinstance(m, TrialBetas) and m.estimate_kind == "revised"]
    revised_onsets = {round(m.onset, 3) for m in revised}
    same = 0
    for onset, m in early_fitted.items():
        if onset == late_onset:
            continue
        assert early_live[onset].n_volumes == m.n_volumes
        if np.allclose(early_live[onset].betas, m.betas, rtol=1e-4, atol=1e-4):
            same += 1
        else:
            assert onset in revised_onsets and abs(onset - late_onset) < 40.0
    assert same >= n // 2
    assert early_live[late_onset].n_volumes >= 8
    assert revised and all(m.trial != skipped for m in revised)

    # Ids: planned trials keep their plan position, the unplanned one comes after them, the skipped one has none.
    ids = {m.trial for m in live if isinstance(m, TrialBetas) and m.estimate_kind == "final"}
    assert ids == (set(range(n)) - {skipped}) | {n}
    stims = {m.trial: m.stim_file for m in live if isinstance(m, TrialBetas)}
    assert stims[n] == "stimuli/not_in_the_plan.png" and stims[0] == planned[0]["stim_file"]

    notices = [m for m in live if isinstance(m, DesignNotice)]
    kinds = {}
    for m in notices:
        kinds.setdefault(m.kind, []).append(m)
    # Trial 8 looked skipped while its report was late (trial 9's came first), and came back with it.
    assert [m.trial for m in kinds["not_shown"]] == [skipped, late]
    assert [m.trial for m in kinds["late"]] == [late]
    assert [m.trial for m in kinds["unplanned"]] == [n]
    assert {m.trial for m in kinds["onset"]} == {i for i in range(n) if i != skipped and abs(jitter[i]) > 0.5}
    assert abs(kinds["clock"][0].offset_s - TRIGGER_DELAY_S) < 1e-6
    assert kinds["refit"]

    record = json.loads((tmp_path / "live" / "design" / f"run-{RUN:02d}_design.json").read_text())
    assert abs(record["clock_offset_s"] - TRIGGER_DELAY_S) < 1e-6 and record["live"]
    analysed = _read_rows(tmp_path / "live" / "func" / f"run-{RUN:02d}_events.tsv")
    assert [round(float(r["onset"]), 3) for r in analysed] == sorted(final_live)
    assert {r["source"] for r in analysed} == {"reported", "unplanned"}


def test_the_plan_stands_until_the_stimulus_computer_reports():
    from rt_mindeye.glm.design import RunEvents

    plan = RunEvents(np.array([2.0, 6.0, 10.0]), np.full(3, 3.0), ("a", "b", "c"))
    design = LiveRunDesign(1, plan, ("s/a.png", "s/b.png", "s/c.png"))
    assert design.finish() == [] and [t.source for t in design.trials()] == ["planned"] * 3
    # A re-sent report replaces the first copy; the same image shown again is a trial of its own.
    shown = dict(session="x", run=1, duration=3.0, trial_type="img")
    design.report(StimulusEvent(trial=7, onset=2.4, stim_file="a.png", **shown), 2.4)
    design.report(StimulusEvent(trial=7, onset=2.5, stim_file="a.png", **shown), 2.5)
    again = design.report(StimulusEvent(trial=8, onset=5.0, stim_file="other/a.png", **shown), 5.0)
    assert [d.kind for d in again] == ["unplanned"] and design.trial_of(8) == 3
    events, modelled = design.design()
    assert [t.id for t in modelled] == [0, 3, 1, 2] and events.onsets.tolist() == [2.5, 5.0, 6.0, 10.0]
    assert [d.trial for d in design.finish()] == [1, 2]
    assert [t.id for t in design.design()[1]] == [0, 3]


def test_live_reports_from_a_stimulus_client_reach_the_scanner_service(calibrated_phantom, session_yaml, tmp_path):
    """The scanner service with the scanner emulator and a real StimulusClient over ZeroMQ: the trigger is measured
    against the first volume's acquisition time, the reported onsets are analysed, a trial not shown is dropped."""
    import threading
    import time

    from rt_mindeye.replay.emulator import ScannerEmulator
    from rt_mindeye.runtime.config import load_session_config
    from rt_mindeye.runtime.launcher import ServiceThread
    from rt_mindeye.runtime.layout import SessionLayout
    from rt_mindeye.runtime.scanner_service import run_scanner
    from rt_mindeye.transport.journal import read_journal
    from rt_mindeye.transport.stimulus_client import StimulusClient

    speed = 15.0
    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 47300))
    planned = sorted(_read_rows(phantom.phantom_dir / "events" / f"run-{RUN:02d}_events.tsv"),
                     key=lambda r: float(r["onset"]))
    skipped = 4
    jitter = np.random.default_rng(2).uniform(-0.8, 0.8, len(planned))
    scanner = ServiceThread(run_scanner, config)
    scanner.start()
    time.sleep(1.0)
    emulator = ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=speed,
                               restamp_acquisition=True)

    def stimulus_computer():
        # The emulator writes its first volume now, stamped one (accelerated) TR earlier: the trigger comes late by
        # about that much, as a trigger relayed through a slow stimulus computer would.
        client = StimulusClient(config.transport.connect_endpoint("stimulus"), session="test", run=RUN)
        client.trigger()
        started = time.monotonic()
        for number, row in enumerate(planned, start=1):
            if number - 1 == skipped:
                continue
            onset = float(row["onset"]) + jitter[number - 1]
            time.sleep(max(0.0, started + onset / speed - time.monotonic()))
            client.event(trial=number, onset=onset, duration=float(row["duration"]), trial_type=row["trial_type"],
                         stim_file=row["stim_file"])
        assert client.close(5.0)

    sender = threading.Thread(target=stimulus_computer, daemon=True)
    emulator.start()
    sender.start()
    assert emulator.join(120)
    sender.join(30)
    scanner.join(120)
    assert not scanner.is_alive()
    scanner.finish()

    layout = SessionLayout(session_dir)
    sent = [m for m in read_journal(layout.betas_dir / "trials.journal") if isinstance(m, TrialBetas)]
    assert {m.trial for m in sent if m.estimate_kind == "final"} == set(range(len(planned))) - {skipped}
    analysed = _read_rows(layout.events_tsv(RUN))
    assert {r["source"] for r in analysed} == {"reported"}
    expected = sorted(float(r["onset"]) + jitter[i] for i, r in enumerate(planned) if i != skipped)
    np.testing.assert_allclose([float(r["onset"]) for r in analysed], expected, atol=1e-3)
    record = json.loads((layout.design_dir / f"run-{RUN:02d}_design.json").read_text())
    # The trigger left when the first volume's acquisition began; it arrives within a TR (and some scheduling).
    offset = record["clock_offset_s"]
    print(f"measured trigger - first volume offset: {offset * 1e3:+.1f} ms")
    assert offset is not None and -0.5 < offset < phantom.session.tr / speed + 0.5
    assert [n["trial"] for n in record["notices"] if n["kind"] == "not_shown"] == [skipped]


def test_without_a_plan_every_trial_comes_from_the_reports(calibrated_phantom, tmp_path):
    """A participant-paced run with no planned events file: trial ids in report order, the betas of the plan."""
    phantom = calibrated_phantom
    volumes = [read_volume(p) for p in phantom.live_files]
    tr = float(GLMCalibration.load(CalibrationBundle.open(phantom.bundle_dir).glm_dir).tr)
    shown = sorted(_read_rows(phantom.phantom_dir / "events" / f"run-{RUN:02d}_events.tsv"),
                   key=lambda r: float(r["onset"]))
    reports = {}
    for number, row in enumerate(shown):
        onset = float(row["onset"])
        event = StimulusEvent(session="live", run=RUN, trial=100 + number, onset=onset,
                              duration=float(row["duration"]), trial_type=row["trial_type"], stim_file=row["stim_file"])
        reports.setdefault(int(math.floor(onset / tr)) + 1, []).append(event)
    live = _drive(_pipeline(phantom, None, tmp_path, "unplanned"), volumes, reports)
    planned = _drive(_pipeline(phantom, phantom.phantom_dir / "events", tmp_path, "planned"), volumes, {})
    finals = {m.trial: m for m in live if isinstance(m, TrialBetas) and m.estimate_kind == "final"}
    reference = {m.trial: m for m in planned if isinstance(m, TrialBetas) and m.estimate_kind == "final"}
    assert sorted(finals) == sorted(reference) == list(range(len(shown)))
    for trial, m in finals.items():
        assert m.stim_file == shown[trial]["stim_file"]
        np.testing.assert_allclose(m.betas, reference[trial].betas, rtol=1e-4, atol=1e-4)
    kinds = {m.kind for m in live if isinstance(m, DesignNotice)}
    assert kinds == {"clock"}  # with no plan nothing disagrees; no trigger came, which the clock notice says
