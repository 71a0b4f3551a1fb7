"""Reload between runs: the running scanner host and decoder take a new calibration bundle (made by
`rt-mindeye calibrate` as a process) and a new reconstruction policy without a restart. A bad bundle is refused with
a named error and changes nothing; the session records which bundle decoded which run; no trial is lost or decoded
twice across the reload, nor across a decoder restart after it."""

from __future__ import annotations

import json
import shutil
import time

from rt_mindeye.replay.emulator import ScannerEmulator
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.decoder_service import run_decoder
from rt_mindeye.runtime.launcher import ServiceThread
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.reload import bundle_id, request_reload
from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.runtime.scanner_service import run_scanner
from rt_mindeye.timing import wait_until
from rt_mindeye.transport.journal import read_journal
from rt_mindeye.transport.messages import TrialBetas

SPEED = 15.0
DEADLINE_S = 120.0


def _journal(layout):
    return [m for m in read_journal(layout.betas_dir / "trials.journal") if isinstance(m, TrialBetas)]


def _decoded(layout):
    return [r for r in layout.read_decoder_results() if "event" not in r]


def test_bundle_and_policy_reload_between_runs(calibrated_phantom, cli_bundle, session_yaml, new_series, tmp_path):
    phantom = calibrated_phantom
    new_bundle, made = cli_bundle
    assert made.returncode == 0, made.stderr[-2000:]
    old_id = bundle_id(CalibrationBundle.open(phantom.bundle_dir))
    new_id = bundle_id(CalibrationBundle.open(new_bundle))
    assert old_id != new_id
    # A second live run of the same images (series + 1, planned as run 4), and a bundle for someone else.
    series = phantom.session.runs[2].series_number
    run4 = new_series(phantom.live_files, series + 1, tmp_path / "run4")
    events = tmp_path / "events"
    events.mkdir()
    shutil.copy(phantom.phantom_dir / "events" / "run-03_events.tsv", events / "run-03_events.tsv")
    shutil.copy(phantom.phantom_dir / "events" / "run-03_events.tsv", events / "run-04_events.tsv")
    foreign = tmp_path / "foreign_bundle"
    shutil.copytree(new_bundle, foreign)
    info = json.loads((foreign / "bundle.json").read_text())
    (foreign / "bundle.json").write_text(json.dumps({**info, "subject": "someone-else"}))

    session_dir = tmp_path / "session"
    path = session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 23200, live_runs=2,
                        events_dir=str(events))
    config = load_session_config(path)
    layout = SessionLayout(session_dir)
    scanner = ServiceThread(run_scanner, config)
    decoder = ServiceThread(run_decoder, config)
    decoder.start()
    scanner.start()
    time.sleep(0.5)
    ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED).run()
    wait_until(lambda: any(m.run == 3 and m.estimate_kind == "final" for m in _journal(layout)), DEADLINE_S,
               "run 3 to end")

    # Between the runs: a bad bundle is refused by the decoder (asked first), and nothing changes.
    answers = request_reload(config, bundle=foreign, timeout_s=30)
    assert [(a.service, a.state) for a in answers] == [("decoder", "refused")]
    assert answers[0].details["error_type"] == "BundleMismatchError" and "someone-else" in answers[0].details["error"]
    answers = request_reload(config, bundle=tmp_path / "no_such_bundle", timeout_s=30)
    assert answers[0].state == "refused" and "not a calibration bundle" in answers[0].details["error"]
    # The new bundle and policy: accepted by both services, applied from the next run.
    answers = request_reload(config, bundle=new_bundle, recon_policy="skip", timeout_s=60)
    assert [(a.service, a.state) for a in answers] == [("decoder", "accepted"), ("scanner", "accepted")], answers
    assert all(a.details["bundle_id"] == new_id for a in answers)

    emulator = ScannerEmulator(run4, tmp_path / "export", tr=phantom.session.tr, speed=SPEED).start()
    wait_until(lambda: any(r["run"] == 4 for r in _decoded(layout)), DEADLINE_S, "run 4's first result")
    decoder.finish()  # the decoder dies after the switch; its successor must go on with the new bundle
    restarted = ServiceThread(run_decoder, config)
    restarted.start()
    assert emulator.join(DEADLINE_S)
    scanner.join(DEADLINE_S)
    assert not scanner.is_alive(), "the scanner host did not end the second run"
    scanner.finish()
    sent = _journal(layout)
    wait_until(lambda: len(layout.read_decoder_results()) and len(_decoded(layout)) >= len(sent), 60,
               "the decoder to catch up")
    restarted.finish()

    # Nothing lost, nothing twice; each run decoded with the bundle that made its estimates.
    decoded = _decoded(layout)
    assert sorted(r["seq"] for r in decoded) == [m.seq for m in sent], "a trial was lost or decoded twice"
    assert not [r for r in decoded if "failed" in r]
    for run, wanted in ((3, old_id), (4, new_id)):
        assert {m.bundle_id for m in sent if m.run == run} == {wanted}
        assert {r["bundle"] for r in decoded if r["run"] == run and "superseded_by" not in r} == {wanted}
        finals = {m.trial for m in sent if m.run == run and m.estimate_kind == "final"}
        assert finals == set(range(phantom.live_trials))
    assert layout.bundles_by_run("decoder") == {3: [old_id], 4: [new_id]}
    assert layout.bundles_by_run("scanner") == {3: [old_id], 4: [new_id]}
    records = layout.read_jsonl(layout.bundles_jsonl)
    refused = [r for r in records if r["event"] == "refused"]
    assert [r["service"] for r in refused] == ["decoder", "decoder"]  # the scanner host was never asked
    run4_records = [r for r in records if r["event"] == "run" and r["service"] == "decoder" and r["run"] == 4]
    assert run4_records and all(r["recon_policy"] == "skip" for r in run4_records)
    restarts = [r for r in records if r["service"] == "decoder" and r["event"] == "start"]
    assert [r["bundle_id"] for r in restarts] == [old_id, new_id]  # the restarted decoder started on the new one
