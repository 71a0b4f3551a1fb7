"""The real entry points as processes, as an operator runs them: `rt-mindeye session` (both services spawned, a
decoder killed with kill -9 restarted without loss, the stimulus computer's program restarted, an ordered shutdown
on SIGTERM with every journal complete), `rt-mindeye calibrate`, `rt-mindeye preflight`, `rt-mindeye demo --quick`,
and `python -m services.scanner|decoder|console`. Every child inherits this environment (PYTHONPATH included), so it
runs the code under test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.replay.emulator import ScannerEmulator
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.reload import bundle_id
from rt_mindeye.runtime.stimulus_player import StimulusPlayer
from rt_mindeye.timing import wait_until
from rt_mindeye.transport.config import TransportConfig
from rt_mindeye.transport.journal import Journal, read_journal
from rt_mindeye.transport.messages import Feedback, TrialBetas

SPEED = 15.0
DEADLINE_S = 120.0
REPO = Path(__file__).resolve().parents[2]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rt_mindeye", *args]


def _start(cmd: list[str], out: Path, cwd: Path) -> subprocess.Popen:
    with out.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=cwd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_ready(layout: SessionLayout, launcher: subprocess.Popen) -> None:
    def ready():
        assert launcher.poll() is None, "rt-mindeye session exited early"
        logs = {s: layout.logs_dir / f"{s}.log" for s in ("scanner", "decoder")}
        return (logs["scanner"].exists() and "scanner host watching" in logs["scanner"].read_text()
                and logs["decoder"].exists() and "decoder ready" in logs["decoder"].read_text())

    wait_until(ready, DEADLINE_S, "both services to be ready")


def test_session_process_kill_restart_and_ordered_shutdown(calibrated_phantom, session_yaml, tmp_path):
    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    path = session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 23300, live_runs=0)
    config = load_session_config(path)
    t = config.transport
    layout = SessionLayout(session_dir)
    launcher = _start(_command("session", "--config", str(path), "--headless"), tmp_path / "session.out", tmp_path)
    try:
        _wait_ready(layout, launcher)
        first_decoder = int((layout.logs_dir / "decoder.pid").read_text())
        player = StimulusPlayer(t.connect_endpoint("stimulus"), t.connect_endpoint("feedback"),
                                session=config.session.id, events_dir=phantom.phantom_dir / "events",
                                runs={phantom.session.runs[2].series_number: 3}, tr=phantom.session.tr, speed=SPEED,
                                feedback_state=tmp_path / "stimulus.state", heartbeat_interval_s=t.heartbeat_interval_s)
        emulator = ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED,
                                   restamp_acquisition=True)
        done = {}
        runner = threading.Thread(target=lambda: done.update(sent=emulator.run(on_progress=player.on_volume)))
        runner.start()
        wait_until(lambda: len(player.feedback) >= 2, DEADLINE_S, "the first feedback")
        os.kill(first_decoder, signal.SIGKILL)  # the decoder dies in the middle of the run
        player.disconnect()  # and the stimulus program is restarted while it is down
        time.sleep(1.0)
        player.reconnect()
        runner.join(DEADLINE_S)
        expected = set(player.expected_trials())
        journal = layout.betas_dir / "trials.journal"
        wait_until(lambda: any(m.estimate_kind == "final" for m in read_journal(journal) if isinstance(m, TrialBetas)),
                   DEADLINE_S, "the run's final estimates")
        assert player.wait_feedback(expected, 60), "a trial got no feedback"
        restarted_decoder = int((layout.logs_dir / "decoder.pid").read_text())
        assert restarted_decoder != first_decoder and _alive(restarted_decoder)
        scanner_pid = int((layout.logs_dir / "scanner.pid").read_text())
        launcher.send_signal(signal.SIGTERM)  # the operator (or a service manager) ends the session
        assert launcher.wait(60) == 0
        received = [(f.run, f.trial) for f in player.feedback]
        player.close(timeout_s=0.5)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = (tmp_path / "session.out").read_text()

    # Both children are gone; the decoder was restarted once and caught up from the journal.
    assert not _alive(scanner_pid) and not _alive(restarted_decoder)
    assert "decoder is DEAD" in output  # the kill -9 showed on the console
    assert "restarting" in (layout.logs_dir / "launcher.log").read_text()
    sent = [m for m in read_journal(journal) if isinstance(m, TrialBetas)]
    decoded = [r for r in layout.read_decoder_results() if "event" not in r]
    assert sorted(r["seq"] for r in decoded) == [m.seq for m in sent], "a trial was lost or decoded twice"
    assert {m.trial for m in sent if m.estimate_kind == "final"} == set(range(phantom.live_trials))
    # Every journal is complete and acknowledged: nothing waits to be re-sent.
    with Journal(journal, fsync=False) as trials:
        assert trials.acked_seq == trials.last_seq == len(sent)
    with Journal(layout.feedback_journal, fsync=False) as feedback:
        assert feedback.acked_seq == feedback.last_seq == len(expected)
    # Every trial's feedback reached the stimulus computer once, through the decoder kill and its own restart.
    assert sorted(received) == sorted(expected), "a trial's feedback was lost or delivered twice"
    assert sorted((m.run, m.trial) for m in read_journal(layout.feedback_journal) if isinstance(m, Feedback)) == \
        sorted(expected)
    records = layout.read_jsonl(layout.feedback_jsonl)
    assert sorted((r["run"], r["trial"]) for r in records) == sorted(expected) and all(r["sent"] for r in records)
    # Both services ended normally and said what they had done: the scanner host after its decoder acknowledged all.
    scanner_out = (layout.logs_dir / "scanner.stdout").read_text()
    assert f"acked={len(sent)}, last_seq={len(sent)}" in scanner_out
    assert "rt-mindeye decoder: decoded=" in (layout.logs_dir / "decoder.stdout").read_text()


def test_calibrate_process_writes_a_bundle(calibrated_phantom, cli_bundle):
    bundle_dir, done = cli_bundle  # `rt-mindeye calibrate SESSION --config --out --dicom-dir`, run as a process
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    bundle = CalibrationBundle.open(bundle_dir)
    bundle.check(subject="phantom01", volume=None)
    assert bundle.info.calibration_runs and (bundle_dir / "model" / "last.pth").is_file()
    assert "decoder voxels" in done.stdout  # the report is printed
    assert bundle_id(bundle) != bundle_id(CalibrationBundle.open(calibrated_phantom.bundle_dir))


def test_preflight_process_fails_naming_the_fix(calibrated_phantom, session_yaml, tmp_path):
    """Every check's logic is tested in-process (test_preflight.py); here the command: its table and exit status."""
    bad = session_yaml(tmp_path / "bad.yaml", calibrated_phantom, tmp_path / "session", tmp_path / "export", 23400,
                       subject="someone-else")
    done = subprocess.run(_command("preflight", "--config", str(bad)), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="1000"), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "someone-else" in done.stdout and "calibrate this subject first" in done.stdout
    assert "│ fail " in done.stdout and "decoder checkpoint" in done.stdout and "│ pass " in done.stdout  # all ran


def test_demo_quick_process_runs_every_step_and_the_closed_loop(tmp_path):
    import socket

    out = tmp_path / "demo"
    # Another program (another demo, a running session) holds one of the default ports: the demo takes free ones.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", TransportConfig().port_trials))
            busy.listen()
        except OSError:
            pass  # already taken by something else: the same situation
        done = subprocess.run(_command("demo", "--quick", "--out", str(out), "--headless"), capture_output=True,
                              text=True, timeout=300, env=dict(os.environ), cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ports = yaml.safe_load((out / "session.yaml").read_text())["transport"]
    assert ports["port_trials"] != TransportConfig().port_trials and len(set(ports) - {"journal_fsync"}) == 9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_decoded"] == summary["trials_total"] > 0
    feedback = summary["feedback"]
    assert feedback["received"] == feedback["trials"] == summary["trials_total"] and feedback["duplicates"] == 0
    assert feedback["missing"] == []
    latency = summary["latency_s"]["feedback"]
    assert latency["n"] == summary["trials_total"] and 0 < latency["p50"] <= latency["p99"] < 30
    assert "decoder is stopped" in done.stdout and "scanner is stopped" in done.stdout  # a normal end is no crash
    assert (out / "grid.png").is_file()


def test_services_as_processes(calibrated_phantom, session_yaml, tmp_path):
    """`python -m services.scanner` stopped with Ctrl-C in the middle of a run ends the run and journals its final
    estimates; `python -m services.console` shows a normal stop as stopped and exits on SIGTERM; a service given a
    bad configuration exits 2 naming the key."""
    from rt_mindeye.transport.pubsub import SnapshotPublisher

    phantom = calibrated_phantom
    session_dir = tmp_path / "session"
    path = session_yaml(tmp_path / "s.yaml", phantom, session_dir, tmp_path / "export", 23500, live_runs=0)
    config = load_session_config(path)
    layout = SessionLayout(session_dir)
    t = config.transport
    scanner = subprocess.Popen([sys.executable, "-m", "services.scanner", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                               cwd=REPO)
    # The console follows the scanner host's publisher (no decoder here) and a stand-in decoder publisher.
    decoder = SnapshotPublisher(t.bind_endpoint("decoder_pub"), t.bind_endpoint("decoder_snapshot"), session="test",
                                service="decoder", heartbeat_interval_s=t.heartbeat_interval_s)
    console = subprocess.Popen([sys.executable, "-m", "services.console", "--config", str(path), "--headless"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                               cwd=REPO)
    try:
        wait_until(lambda: (layout.logs_dir / "scanner.log").exists()
                   and "scanner host watching" in (layout.logs_dir / "scanner.log").read_text(), DEADLINE_S,
                   "the scanner host")
        emulator = ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=SPEED).start()
        journal = layout.betas_dir / "trials.journal"
        wait_until(lambda: journal.exists() and sum(isinstance(m, TrialBetas) for m in read_journal(journal)) >= 3,
                   DEADLINE_S, "the first estimates")
        scanner.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the run
        scanner_out, _ = scanner.communicate(timeout=60)
        emulator.stop()
        decoder.close()  # a normal stop of the other service the console follows
        time.sleep(3 * t.heartbeat_interval_s * t.heartbeat_liveness)  # the console's liveness timeout, and more
        console.send_signal(signal.SIGTERM)
        console_out, _ = console.communicate(timeout=60)
    finally:
        for proc in (scanner, console):
            if proc.poll() is None:
                proc.kill()
    assert scanner.returncode == 0, scanner_out
    sent = [m for m in read_journal(journal) if isinstance(m, TrialBetas)]  # every record reads back: none torn
    finals = {m.trial for m in sent if m.estimate_kind == "final"}
    assert finals and finals == {m.trial for m in sent}  # the interrupted run's trials got their final estimates
    assert len(finals) < phantom.live_trials  # ... and it was interrupted
    assert f"last_seq={len(sent)}" in scanner_out
    assert console.returncode == 0, console_out
    assert "scanner is alive" in console_out and "scanner is stopped" in console_out
    assert "decoder is stopped" in console_out and "DEAD" not in console_out
    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder:\n  devise: cpu\n")
    done = subprocess.run([sys.executable, "-m", "services.decoder", "--config", str(bad)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ), cwd=REPO)
    assert done.returncode == 2 and "decoder.devise" in done.stderr and "Traceback" not in done.stderr
