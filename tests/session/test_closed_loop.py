"""The closed loop on loopback: scanner host and decoder services, the scanner emulator, and the stimulus computer
played through the stimulus API, whose program is restarted in the middle of the run. Every trial's feedback
reaches it exactly once, and the decoder's record says what each trial was sent."""

from __future__ import annotations

import time

from rt_mindeye.replay.emulator import ScannerEmulator
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.decoder_service import run_decoder
from rt_mindeye.runtime.launcher import ServiceThread
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.scanner_service import run_scanner
from rt_mindeye.runtime.stimulus_player import StimulusPlayer
from rt_mindeye.timing import wait_until
from rt_mindeye.transport.journal import Journal, read_journal
from rt_mindeye.transport.messages import Feedback

SPEED = 15.0
DEADLINE_S = 120.0


def test_every_trial_gets_feedback_once_through_a_stimulus_computer_restart(calibrated_phantom, session_yaml,
                                                                            tmp_path):
    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    config = load_session_config(session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 23100))
    t = config.transport
    layout = SessionLayout(session_dir)
    scanner = ServiceThread(run_scanner, config)
    decoder = ServiceThread(run_decoder, config)
    decoder.start()
    scanner.start()
    player = StimulusPlayer(t.connect_endpoint("stimulus"), t.connect_endpoint("feedback"), session=config.session.id,
                            events_dir=phantom.phantom_dir / "events", runs={phantom.session.runs[2].series_number: 3},
                            tr=phantom.session.tr, speed=SPEED, feedback_state=tmp_path / "stimulus.state",
                            heartbeat_interval_s=t.heartbeat_interval_s)
    time.sleep(0.5)
    emulator = ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED,
                               restamp_acquisition=True)
    runner = ServiceThread(lambda _config, _stop: emulator.run(on_progress=player.on_volume), None)
    runner.start()
    expected = set(player.expected_trials())
    assert len(expected) == phantom.live_trials
    wait_until(lambda: len(player.feedback) >= 3, DEADLINE_S, "the first feedback")
    player.disconnect()  # the stimulus program is restarted in the middle of the run
    time.sleep(1.0)  # trials go on being decoded while it is away: their feedback waits in the decoder's journal
    back_at = time.time()
    player.reconnect()
    runner.join(DEADLINE_S)
    scanner.join(DEADLINE_S)
    assert not scanner.is_alive(), "the scanner host did not end the live run"
    scanner.finish()
    assert player.wait_feedback(expected, 60), "a trial got no feedback"
    time.sleep(4 * t.heartbeat_interval_s)  # heartbeats and catch-up requests go on: still nothing twice
    received = [(f.run, f.trial) for f in player.feedback]
    player.close(timeout_s=0.5)
    decoder.finish()
    runner.finish()

    assert sorted(received) == sorted(expected), "a trial's feedback was lost or delivered twice"
    held = [f for f in player.feedback if f.result_done_at < back_at - 0.2 < f.received_at]
    assert held, "no feedback was decided while the stimulus computer was away: the restart tested nothing"
    records = layout.read_jsonl(layout.feedback_jsonl)
    assert sorted((r["run"], r["trial"]) for r in records) == sorted(expected)
    assert all(r["sent"] for r in records)
    journal = [m for m in read_journal(layout.feedback_journal) if isinstance(m, Feedback)]
    assert [m.seq for m in journal] == [r["seq"] for r in sorted(records, key=lambda r: r["seq"])]
    with Journal(layout.feedback_journal, fsync=False) as reopened:
        assert reopened.acked_seq == reopened.last_seq == len(expected)  # everything acknowledged by the client
    for item in player.feedback:
        assert item.has_result and len(item.topk_labels) == 5 and item.score == item.topk_scores[0]
        assert item.estimate_kind in ("early", "refined", "final")
        assert 0.0 < item.latency_s < 30.0
