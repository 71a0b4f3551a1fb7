"""The live session end to end on loopback: scanner host and decoder services, the scanner emulator, a real
watcher on a temp folder, real ZeroMQ sockets, the calibrated phantom's bundle. Fault cases: a decoder killed in
the middle of a run, and a replay of the recorded session that must reproduce the betas bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from rt_mindeye.replay.emulator import ScannerEmulator
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.launcher import ServiceThread
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.decoder_service import run_decoder
from rt_mindeye.runtime.scanner_service import run_scanner
from rt_mindeye.transport.journal import read_journal
from rt_mindeye.timing import wait_until
from rt_mindeye.transport.messages import TrialBetas

SPEED = 15.0
DEADLINE_S = 120.0


def journal_trials(session_dir: Path) -> list[TrialBetas]:
    layout = SessionLayout(session_dir)
    return [m for m in read_journal(layout.betas_dir / "trials.journal") if isinstance(m, TrialBetas)]


def results(session_dir: Path) -> list[dict]:
    return SessionLayout(session_dir).read_decoder_results()


def test_live_run_end_to_end(calibrated_phantom, session_yaml, tmp_path):
    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 47000))
    scanner = ServiceThread(run_scanner, config)
    decoder = ServiceThread(run_decoder, config)
    decoder.start()
    scanner.start()
    time.sleep(0.5)
    ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED,
                    restamp_acquisition=True).run()
    scanner.join(DEADLINE_S)
    assert not scanner.is_alive(), "the scanner host did not end the live run"
    summary = scanner.finish()
    sent = journal_trials(session_dir)
    wait_until(lambda: len(results(session_dir)) >= len(sent), 60, "the decoder to catch up")
    decoder.finish()

    # Every volume arrived, was recorded and analysed; every trial got a final estimate, decoded exactly once.
    assert summary["volumes"] == len(phantom.live_files)
    recorded = list(SessionLayout(session_dir).dicom_dir.glob("*.dcm"))
    assert len(recorded) == len(phantom.live_files)
    finals = {m.trial for m in sent if m.estimate_kind == "final"}
    assert finals == set(range(phantom.live_trials))
    early = {m.trial for m in sent if m.estimate_kind == "early"}
    assert len(early) >= phantom.live_trials - 2  # the last trials may only reach their final estimate
    seqs = [r["seq"] for r in results(session_dir)]
    assert sorted(seqs) == [m.seq for m in sent]
    n_candidates = len(list((phantom.phantom_dir / "stimuli").glob("*.png")))
    decoded = [r for r in results(session_dir) if "superseded_by" not in r]
    assert {(r["run"], r["trial"]) for r in decoded} == {(3, t) for t in range(phantom.live_trials)}
    assert all(len(r["topk"]) == 5 and set(r["topk"]) <= {p.name for p in (phantom.phantom_dir / "stimuli").iterdir()}
               for r in decoded)
    for r in results(session_dir):  # a superseded estimate names a newer estimate of the same trial
        if "superseded_by" in r:
            assert r["superseded_by"] > r["seq"]
    assert n_candidates > 5
    # Latency is measured from the (restamped) acquisition time and is positive and bounded.
    rows = [json.loads(line) for line in SessionLayout(session_dir).timings_jsonl.read_text().splitlines()]
    assert len(rows) == len(phantom.live_files)
    latency = np.array([r["done"] - r["acquired"] for r in rows])
    assert np.all(latency > 0) and np.all(latency < 60)
    motion = SessionLayout(session_dir).motion_tsv(3).read_text().splitlines()
    assert len(motion) == len(phantom.live_files) + 1


def test_decoder_killed_mid_run_catches_up_without_loss(calibrated_phantom, session_yaml, tmp_path):
    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 47100))
    scanner = ServiceThread(run_scanner, config)
    first = ServiceThread(run_decoder, config)
    first.start()
    scanner.start()
    time.sleep(0.5)
    emulator = ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED).start()
    wait_until(lambda: len(results(session_dir)) >= 3, DEADLINE_S, "the first decoded trials")
    first.finish()  # the decoder dies in the middle of the run
    decoded_before = len(results(session_dir))
    time.sleep(1.0)  # the scanner host goes on journaling while no decoder is there
    second = ServiceThread(run_decoder, config)
    second.start()
    assert emulator.join(DEADLINE_S)
    scanner.join(DEADLINE_S)
    scanner.finish()
    sent = journal_trials(session_dir)
    wait_until(lambda: len(results(session_dir)) >= len(sent), 60, "the restarted decoder to catch up")
    second.finish()
    seqs = [r["seq"] for r in results(session_dir)]
    assert decoded_before < len(sent)
    assert sorted(seqs) == [m.seq for m in sent], "a trial was lost or decoded twice"
    assert len(seqs) == len(set(seqs))


def test_replay_of_the_recorded_session_reproduces_the_betas_bit_for_bit(calibrated_phantom, session_yaml,
                                                                          tmp_path):
    phantom = calibrated_phantom
    live_dir, replay_dir = tmp_path / "live", tmp_path / "replay"
    live = load_session_config(session_yaml(tmp_path / "a.yaml", phantom, live_dir, tmp_path / "export1", 47200))
    scanner = ServiceThread(run_scanner, live)
    scanner.start()
    time.sleep(0.5)
    ScannerEmulator(phantom.live_files, tmp_path / "export1", tr=phantom.session.tr, speed=SPEED,
                    faults=None, seed=1).run()
    scanner.join(DEADLINE_S)
    scanner.finish()
    # Offline: replay what the live scanner host recorded, through the same stack, as fast as it goes.
    replay = load_session_config(session_yaml(tmp_path / "b.yaml", phantom, replay_dir, tmp_path / "export2", 47300))
    scanner = ServiceThread(run_scanner, replay)
    scanner.start()
    time.sleep(0.5)
    ScannerEmulator(SessionLayout(live_dir).dicom_dir, tmp_path / "export2", tr=phantom.session.tr,
                    speed=SPEED).run()
    scanner.join(DEADLINE_S)
    scanner.finish()
    a, b = journal_trials(live_dir), journal_trials(replay_dir)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.run, x.trial, x.estimate_kind, x.n_volumes) == (y.run, y.trial, y.estimate_kind, y.n_volumes)
        assert x.betas.tobytes() == y.betas.tobytes()
