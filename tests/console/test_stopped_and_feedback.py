"""A service that stops normally is shown as "stopped", one that goes silent as "DEAD"; the feedback sent to the
stimulus computer shows per trial."""

from __future__ import annotations

import logging
import time

from rich.console import Console as RichConsole

from rt_mindeye.console.config import ConsoleConfig
from rt_mindeye.console.runner import OperatorConsole
from rt_mindeye.console.state import ConsoleState, apply, latency_summary
from rt_mindeye.console.views import render
from rt_mindeye.transport.agent import Agent
from rt_mindeye.transport.messages import Feedback
from rt_mindeye.transport.pubsub import SnapshotPublisher, Source

LOOP = "tcp://127.0.0.1:0"


def test_normal_stop_is_stopped_and_silence_is_dead(factories, caplog):
    hb = 0.05
    scanner = SnapshotPublisher(LOOP, LOOP, session="s", service="scanner", heartbeat_interval_s=hb)
    decoder = SnapshotPublisher(LOOP, LOOP, session="s", service="decoder", heartbeat_interval_s=hb)
    sources = [Source("scanner", scanner.pub_endpoint, scanner.snapshot_endpoint),
               Source("decoder", decoder.pub_endpoint, decoder.snapshot_endpoint)]
    console = OperatorConsole(ConsoleConfig(headless=True, refresh_per_second=20.0), sources, heartbeat_interval_s=hb)
    seen_both = {"done": False, "silent_at": None}

    def until(state: ConsoleState) -> bool:
        peers = {p.name: p for p in state.peers}
        if not seen_both["done"] and len(peers) == 2 and all(p.alive for p in peers.values()):
            seen_both["done"] = True
            scanner.close()  # a normal stop: says goodbye
            Agent.close(decoder)  # as if killed: its sockets go away without a word
        if seen_both["done"] and len(peers) == 2 and not any(p.alive for p in peers.values()):
            # The screen's own clock saw both go silent; the subscriber's liveness events follow at the same timeout.
            seen_both["silent_at"] = seen_both["silent_at"] or time.monotonic()
            return time.monotonic() - seen_both["silent_at"] > 10 * hb
        return False

    with caplog.at_level(logging.INFO, logger="rt_mindeye.console"):
        state = console.run(duration_s=20.0, until=until)
    peers = {p.name: p for p in state.peers}
    assert peers["scanner"].status == "stopped" and peers["scanner"].stopped
    assert peers["decoder"].status == "DEAD" and not peers["decoder"].stopped
    lines = [r.getMessage() for r in caplog.records]
    assert "scanner is stopped" in lines and "decoder is DEAD" in lines
    screen = RichConsole(record=True, width=180, height=45, color_system=None)
    screen.print(render(state))
    text = screen.export_text()
    assert "stopped" in text and "DEAD" in text


def test_feedback_is_shown_per_trial_with_its_latency(factories):
    state = apply(ConsoleState(), factories.result(3), now=factories.T0 + 31)
    acquired = factories.result(3).acquisition_time
    on_time = Feedback(session="s", run=1, trial=3, estimate_kind="fast", topk_labels=("dog",), topk_scores=(0.9,),
                       score=0.9, acquisition_time=acquired, deadline_s=1.0, result_done_at=acquired + 0.3,
                       created_at=acquired + 0.32)
    late = Feedback(session="s", run=1, trial=4, estimate_kind="fast", status="late", text="no result in time",
                    acquisition_time=acquired, deadline_s=1.0, result_done_at=acquired + 3.0, created_at=acquired + 3.0)
    state = apply(apply(state, on_time, now=acquired + 0.4), late, now=acquired + 3.1)
    assert state.trial(1, 3).feedback == "on_time" and state.trial(1, 4).feedback == "late notice"
    assert state.feedback_sent == 2 and state.feedback_late == 1
    assert latency_summary(state.latency("feedback"))[2] == 2
    screen = RichConsole(record=True, width=200, height=45, color_system=None)
    screen.print(render(state, now=acquired + 4))
    text = screen.export_text()
    assert "on_time 320 ms" in text and "late notice" in text and "feedback sent 2" in text
