"""Faults around a live session: bad events, a session disk running full, a share that pauses, a console that is
dropped and comes back. Real services on loopback, a real watcher, the scanner emulator."""

from __future__ import annotations

import shutil
import time

from rt_mindeye.replay.emulator import FaultPlan, ScannerEmulator
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.launcher import ServiceThread
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.console_service import run_console
from rt_mindeye.runtime.scanner_service import run_scanner
from rt_mindeye.transport.journal import read_journal
from rt_mindeye.transport.messages import TrialBetas

SPEED = 15.0
DEADLINE_S = 120.0


def _scan(config, phantom, export, faults=None) -> dict:
    worker = ServiceThread(run_scanner, config)
    worker.start()
    time.sleep(0.5)
    ScannerEmulator(phantom.live_files, export, tr=phantom.session.tr, speed=SPEED, faults=faults).run()
    worker.join(DEADLINE_S)
    return worker.finish(timeout_s=10)


def _trials(session_dir):
    return [m for m in read_journal(SessionLayout(session_dir).betas_dir / "trials.journal")
            if isinstance(m, TrialBetas)]


def test_unusable_events_file_loses_the_betas_not_the_volumes(calibrated_phantom, session_yaml, tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    (events / "run-03_events.tsv").write_text("onset\tstim_file\n1.0\tx.png\n")  # no duration, no trial_type
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", calibrated_phantom, session_dir,
                                              tmp_path / "export", 47400, events_dir=str(events)))
    summary = _scan(config, calibrated_phantom, tmp_path / "export")
    assert summary["run_errors"] == 1
    assert summary["volumes"] == len(calibrated_phantom.live_files)  # every volume still arrived
    assert len(list(SessionLayout(session_dir).dicom_dir.glob("*.dcm"))) == len(calibrated_phantom.live_files)
    assert _trials(session_dir) == []
    log = (SessionLayout(session_dir).logs_dir / "scanner.log").read_text()
    assert "run 3 (series" in log and "run-03_events.tsv" in log and "cannot be analysed" in log


def test_low_disk_is_warned_before_data_is_lost(calibrated_phantom, session_yaml, tmp_path):
    session_dir = tmp_path / "session"
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    config = load_session_config(session_yaml(tmp_path / "s.yaml", calibrated_phantom, session_dir,
                                              tmp_path / "export", 47500, min_free_gb=free_gb * 10))
    summary = _scan(config, calibrated_phantom, tmp_path / "export")
    assert summary["low_disk_warning"] is True
    assert "GB free" in (SessionLayout(session_dir).logs_dir / "scanner.log").read_text()
    # The warning costs nothing: the run is analysed completely.
    assert {m.trial for m in _trials(session_dir) if m.estimate_kind == "final"} == \
        set(range(calibrated_phantom.live_trials))


def test_share_pause_and_partial_writes_lose_nothing(calibrated_phantom, session_yaml, tmp_path):
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", calibrated_phantom, session_dir,
                                              tmp_path / "export", 47600))
    faults = FaultPlan(pause_at=10, pause_trs=6, partial_writes=0.3, jitter_s=0.02)
    summary = _scan(config, calibrated_phantom, tmp_path / "export", faults)
    assert summary["volumes"] == len(calibrated_phantom.live_files)
    motion = SessionLayout(session_dir).motion_tsv(3).read_text().splitlines()[1:]
    assert all(row.split("\t")[-1] == "0" for row in motion), "a paused share must not turn volumes into gaps"
    assert {m.trial for m in _trials(session_dir) if m.estimate_kind == "final"} == \
        set(range(calibrated_phantom.live_trials))


def test_console_dropped_and_restarted_gets_the_session_so_far(calibrated_phantom, session_yaml, tmp_path):
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", calibrated_phantom, session_dir,
                                              tmp_path / "export", 47700))
    scanner = ServiceThread(run_scanner, config)
    scanner.start()
    first = run_console(config, headless=True, duration_s=1.0)  # a console that goes away early
    emulator = ScannerEmulator(calibrated_phantom.live_files, tmp_path / "export", tr=calibrated_phantom.session.tr,
                               speed=SPEED).start()
    assert emulator.join(DEADLINE_S)
    late = run_console(config, headless=True, duration_s=2.0)  # a new console joins after the run
    scanner.join(DEADLINE_S)
    summary = scanner.finish(timeout_s=10)
    assert any(p.name == "scanner" for p in first.peers)  # the first console saw the scanner host alive
    assert summary["volumes"] == len(calibrated_phantom.live_files)
    # The console that joined late was given the whole run from the scanner host's snapshot.
    assert late.run == 3
    assert late.volumes_total == len(calibrated_phantom.live_files)
