"""ConsoleState folding and the pure view builders, rendered to text without Live."""

from __future__ import annotations

import dataclasses

import pytest
from rich.console import Console as RichConsole

from rt_mindeye.console.state import ConsoleState, apply, apply_event, latency_summary, tick
from rt_mindeye.console.views import fd_sparkline, fd_style, render
from rt_mindeye.transport.channel import PeerEvent
from rt_mindeye.transport.messages import DesignNotice, Heartbeat, StimulusEvent


def _fold(factories, volumes=range(1, 21), skip=(7, 8)):
    state = ConsoleState()
    for v in volumes:
        if v in skip:
            continue
        msg = factories.volume(v, fd=0.05 * (v % 9))
        state = apply(state, msg, now=msg.created_at + 0.01)
    return state


def test_volume_counter_gaps_and_fd(factories):
    state = _fold(factories)
    assert state.run == 1 and state.last_volume == 20 and state.volumes_in_run == 18
    assert state.gaps == ((1, 7), (1, 8))
    fds = [0.05 * (v % 9) for v in range(1, 21) if v not in (7, 8)]
    assert state.fd == pytest.approx(tuple(fds))
    assert state.fd_over == tuple(sum(f > t for f in fds) for t in (0.2, 0.3, 0.4))
    # latency from acquisition: received 0.25 s and processed 0.4 s after acquisition for every volume
    p50, p99, n = latency_summary(state.latency("received"))
    assert p50 == pytest.approx(0.25) and n == 18
    assert latency_summary(state.latency("volume"))[0] == pytest.approx(0.4)


def test_gap_flag_from_the_scanner_host_is_kept(factories):
    state = apply(ConsoleState(), factories.volume(5, missing=(3, 4)), now=factories.T0)
    assert state.gaps == ((1, 3), (1, 4))
    # a placeholder for a volume declared missing moves the counter but is not a received volume
    state = apply(state, factories.volume(6, fd=float("nan"), missing=(6,)), now=factories.T0 + 1)
    assert state.gaps == ((1, 3), (1, 4), (1, 6)) and state.last_volume == 6 and state.volumes_in_run == 1
    state = apply(state, factories.volume(7), now=factories.T0 + 2)
    assert state.gaps == ((1, 3), (1, 4), (1, 6)) and state.volumes_in_run == 2


def test_new_run_resets_per_run_counters_but_keeps_trials(factories):
    state = _fold(factories)
    state = apply(state, factories.result(1), now=factories.T0 + 11)
    state = apply(state, factories.volume(1, run=2, fd=0.5), now=factories.T0 + 100)
    assert state.run == 2 and state.volumes_in_run == 1 and state.fd == (0.5,) and state.fd_over == (1, 1, 1)
    assert state.volumes_total == 19 and len(state.trials) == 1


def test_state_is_immutable_and_apply_is_pure(factories):
    before = _fold(factories)
    snapshot = dataclasses.replace(before)
    after = apply(before, factories.volume(30), now=factories.T0 + 50)
    assert before == snapshot and after is not before
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.run = 3


def test_retrieval_then_reconstruction_merge_into_one_trial(factories):
    state = apply(ConsoleState(), factories.result(3), now=factories.T0 + 31)
    row = state.trial(1, 3)
    assert [r.label for r in row.topk] == ["dog", "cat", "car", "tree", "boat"]
    assert row.reconstruction_path is None and row.policy_decision == "queued"
    assert row.retrieval_latency_s == pytest.approx(0.6)
    state = apply(state, factories.result(3, recon=True), now=factories.T0 + 35, thumbnail_path="/g/t3.png")
    row = state.trial(1, 3)
    assert len(state.trials) == 1
    assert row.reconstruction_path.endswith("recon_3.png") and row.thumbnail_path == "/g/t3.png"
    assert row.reconstruction_latency_s == pytest.approx(4.5)
    assert latency_summary(state.latency("reconstruction"))[0] == pytest.approx(4.5)
    assert state.recon_policy == "newest" and state.recon_backlog == 1


def test_a_late_result_of_an_older_estimate_adds_its_image_but_keeps_the_newer_estimate(factories):
    newer = dataclasses.replace(factories.result(3, labels=("cat", "dog", "car", "tree", "boat")),
                                estimate_kind="refined", estimate_version=2, policy_decision="retrieval_only")
    state = apply(ConsoleState(), newer, now=factories.T0 + 33)
    late = dataclasses.replace(factories.result(3, recon=True), estimate_kind="early", estimate_version=1)
    state = apply(state, late, now=factories.T0 + 36, thumbnail_path="/g/t3.png")
    row = state.trial(1, 3)
    assert row.estimate_kind == "refined" and row.estimate_version == 2
    assert [r.label for r in row.topk][:2] == ["cat", "dog"] and row.policy_decision == "retrieval_only"
    assert row.reconstruction_path.endswith("recon_3.png") and row.thumbnail_path == "/g/t3.png"


def test_peer_liveness(factories):
    state = apply(ConsoleState(), Heartbeat(session="s", service="decoder", state="busy"), now=100.0,
                  source="decoder")
    assert state.peers[0].alive and state.peers[0].state == "busy"
    assert tick(state, 101.0, dead_after_s=1.5) is state
    state = tick(state, 102.0, dead_after_s=1.5)
    assert not state.peers[0].alive
    state = apply_event(state, PeerEvent("decoder", True, 103.0))
    assert state.peers[0].alive
    state = apply_event(state, PeerEvent("scanner", False, 104.0))
    assert [(p.name, p.alive) for p in state.peers] == [("decoder", True), ("scanner", False)]


def test_stimulus_event_fills_the_seen_image(factories):
    event = StimulusEvent(session="s", run=1, trial=4, onset=12.5, duration=3.0, trial_type="image",
                          stim_file="shared0004.png")
    state = apply(ConsoleState(), event, now=1.0)
    state = apply(state, factories.result(4), now=2.0)
    assert state.trial(1, 4).stim_file == "shared0004.png" and state.stimulus_events == 1


def test_plan_and_live_event_disagreements_are_shown(factories):
    notice = dict(session="sub-01_ses-01", run=1)
    state = apply(ConsoleState(), factories.result(2), now=1.0)
    for msg in (DesignNotice(kind="clock", offset_s=0.037, detail="trigger reached the scanner host +37 ms after "
                                                                  "the first volume's acquisition time", **notice),
                DesignNotice(kind="onset", trial=2, offset_s=0.8, detail="shown at 12.80 s, planned at 12.00 s",
                             **notice),
                DesignNotice(kind="not_shown", trial=3, detail="planned at 16.00 s, not reported", **notice),
                DesignNotice(kind="unplanned", trial=12, detail="reported trial 4 was not planned", **notice)):
        state = apply(state, msg, now=2.0)
    assert state.clock_offset_s == pytest.approx(0.037)
    assert dict(state.design_counts) == {"onset": 1, "not_shown": 1, "unplanned": 1}
    assert state.trial(1, 2).design == "shown +0.8 s" and state.trial(1, 2).topk  # the result is kept
    assert state.trial(1, 3).design == "not shown" and state.trial(1, 12).design == "not planned"
    console = RichConsole(record=True, width=180, height=45, color_system=None)
    console.print(render(state, now=3.0))
    text = console.export_text()
    assert "+37 ms" in text and "not shown 1" in text and "not planned" in text and "shown +0.8 s" in text
    assert "reported trial 4 was not planned" in text  # the latest notice


def test_trials_over_the_motion_gate_are_marked(factories):
    import numpy as np

    from rt_mindeye.transport.messages import TrialBetas

    state = apply(ConsoleState(), factories.volume(3), now=1.0)
    for trial, fd in ((1, 0.12), (2, 0.63)):
        state = apply(state, TrialBetas(session="s", run=1, trial=trial, trial_type="image", onset=3.0 * trial,
                                        estimate_kind="early", estimate_version=5, n_volumes=5, acquisition_time=1.0,
                                        betas=np.zeros(0, np.float32), fd_max_mm=fd, motion_gated=fd > 0.4), now=2.0)
    assert state.gated_trials == 1 and state.trial(1, 2).motion_gated and not state.trial(1, 1).motion_gated
    assert state.trial(1, 1).fd_max_mm == pytest.approx(0.12)
    console = RichConsole(record=True, width=180, height=45, color_system=None)
    console.print(render(state, now=3.0))
    text = console.export_text()
    assert "FD 0.63 mm" in text and "FD 0.12 mm" not in text and "over the motion gate: 1" in text


def test_fd_sparkline_colours_by_firmm_threshold():
    line = fd_sparkline((0.1, 0.25, 0.35, 0.8), (0.2, 0.3, 0.4))
    assert len(line.plain) == 4 and line.plain[-1] == "█"
    assert [fd_style(v, (0.2, 0.3, 0.4)) for v in (0.1, 0.25, 0.35, 0.8)] == \
        ["green", "yellow", "dark_orange", "bold red"]


def test_render_a_snapshot_to_text(factories):
    state = _fold(factories)
    state = apply(state, factories.result(2, recon=True), now=factories.T0 + 25, thumbnail_path="/g/run01_t2.png")
    state = apply(state, factories.result(3, labels=("zebra", "lion", "owl", "cup", "hat")), now=factories.T0 + 31)
    state = apply(state, Heartbeat(session="sub-01_ses-01", service="decoder", state="busy"), now=factories.T0 + 31,
                  source="decoder")
    state = apply_event(state, PeerEvent("scanner", False, factories.T0 + 31))
    console = RichConsole(record=True, width=180, height=45, color_system=None)
    console.print(render(state, now=factories.T0 + 32))
    text = console.export_text()
    assert "sub-01_ses-01" in text
    assert "volume 20" in text and "18 received" in text
    assert "1:7" in text and "1:8" in text  # missing volumes listed
    assert "zebra (0.91)" in text and "dog (0.91)" in text
    assert "DEAD" in text and "ALIVE" in text and "busy" in text
    assert "newest" in text
    assert "250 ms" in text  # received p50 from acquisition
    assert "run01_t2.png" in text
    assert "▁" in text or "▂" in text


def test_console_and_transport_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, rt_mindeye.console, rt_mindeye.transport; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'diffusers')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
