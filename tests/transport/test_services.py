"""Pub/sub with late-join snapshot, Lazy Pirate status, CURVE, stimulus events and the reconstruction policy."""

from __future__ import annotations

import json

import pytest
import zmq

from rt_mindeye.errors import ConfigError, TransportTimeout
from rt_mindeye.transport import protocol, stimulus_client
from rt_mindeye.transport.messages import Heartbeat, RunTrigger, StimulusEvent, VolumeStatus, decode
from rt_mindeye.transport.policy import ReconstructionQueue
from rt_mindeye.transport.pubsub import SnapshotPublisher, SnapshotSubscriber, Source
from rt_mindeye.transport.reqrep import LazyPirateClient, StatusServer
from rt_mindeye.transport.security import (
    ClientSecurity, InsecureBindError, ServerSecurity, generate_keypair, generate_service_keys, is_loopback,
    load_keypair, load_public_key,
)
from rt_mindeye.transport.channel import ReliableReceiver, ReliableSender
from rt_mindeye.transport.stimulus import StimulusEventServer
from rt_mindeye.transport.stimulus_client import StimulusClient

LOOP = "tcp://127.0.0.1:0"


def _volume(i):
    return VolumeStatus(session="s", run=1, volume=i, acquisition_time=1.7e9 + 1.5 * i, received_at=1.7e9 + 1.5 * i + 0.2,
                        fd=0.1 * i)


def _messages(subscriber, n, helpers, timeout_s=10.0):
    got = []
    deadline_ok = helpers.wait_for
    def pump():
        d = subscriber.recv(0.02)
        if d is not None and d.message is not None and not isinstance(d.message, Heartbeat):
            got.append(d)
        return len(got) >= n
    deadline_ok(pump, timeout_s)
    return got


def test_late_subscriber_gets_the_snapshot_then_updates_once(helpers):
    with SnapshotPublisher(LOOP, LOOP, session="s", service="scanner", heartbeat_interval_s=helpers.hb) as pub:
        for i in range(1, 6):
            pub.publish(_volume(i))
        source = Source("scanner", pub.pub_endpoint, pub.snapshot_endpoint)
        with SnapshotSubscriber([source], heartbeat_interval_s=helpers.hb) as sub:
            first = _messages(sub, 5, helpers)
            assert [d.message.volume for d in first] == [1, 2, 3, 4, 5]
            assert all(d.from_snapshot for d in first)
            assert helpers.wait_for(lambda: not sub._states[0].syncing, 5.0)
            for i in range(6, 9):
                pub.publish(_volume(i))
            more = _messages(sub, 3, helpers)
            assert [d.message.volume for d in more] == [6, 7, 8]
            assert _messages(sub, 1, helpers, timeout_s=0.3) == []


def test_subscriber_reports_a_dead_publisher(helpers):
    pub = SnapshotPublisher(LOOP, LOOP, session="s", service="decoder", heartbeat_interval_s=helpers.hb)
    source = Source("decoder", pub.pub_endpoint, pub.snapshot_endpoint)
    with SnapshotSubscriber([source], heartbeat_interval_s=helpers.hb) as sub:
        events = []

        def pump():
            d = sub.recv(0.02)
            if d is not None and d.event is not None:
                events.append(d.event.alive)
            return events[-1:] == [False]

        assert helpers.wait_for(lambda: sub._states[0].liveness.alive, 5.0)
        pub.close()
        assert helpers.wait_for(pump, 3.0)
        assert events[0] is True and events[-1] is False


def test_lazy_pirate_status_and_timeout(helpers):
    with StatusServer(LOOP, lambda req: ("ready", {"query": req.query}), session="s", service="decoder") as server:
        with LazyPirateClient(server.endpoint, session="s", timeout_s=2.0) as client:
            reply = client.request("ping")
            assert reply.state == "ready" and reply.details == {"query": "ping"}
            assert reply.request_seq == 1
            assert client.request().request_seq == 2
    # nobody listens: bounded retries, then TransportTimeout naming the endpoint
    ctx = zmq.Context()
    port = ctx.socket(zmq.ROUTER)
    free = port.bind_to_random_port("tcp://127.0.0.1")
    port.close(0)
    ctx.term()
    with LazyPirateClient(f"tcp://127.0.0.1:{free}", session="s", timeout_s=0.1, retries=2) as client:
        with pytest.raises(TransportTimeout) as info:
            client.request()
    assert str(free) in info.value.endpoint


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://[::1]:5") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://*:5555") and not is_loopback("tcp://10.1.2.3:5555")
    with pytest.raises(InsecureBindError) as info:
        ReliableSender("tcp://*:0", tmp_path / "j", session="s")
    assert "tcp://*:0" in str(info.value)
    with pytest.raises(InsecureBindError):
        SnapshotPublisher("tcp://0.0.0.0:0", LOOP, session="s", service="x")


@pytest.fixture
def curve_keys(tmp_path):
    keys = generate_service_keys(tmp_path / "keys", ("scanner", "decoder"))
    generate_keypair(keys, "intruder")  # a key pair nobody authorised
    return keys


def test_curve_handshake_works_and_a_wrong_key_is_refused(tmp_path, curve_keys, helpers):
    server = ServerSecurity.from_dir(curve_keys, "scanner")
    # CURVE lets us listen on every interface; bind loopback anyway so the test stays local.
    with ReliableSender("tcp://127.0.0.1:0", tmp_path / "j", session="s", fsync=False, server_security=server,
                        heartbeat_interval_s=helpers.hb) as sender:
        sender.send(helpers.make_trial(1))
        good = ClientSecurity.from_dir(curve_keys, "decoder", "scanner")
        with ReliableReceiver(sender.last_endpoint, session="s", client_security=good,
                              heartbeat_interval_s=helpers.hb) as receiver:
            got = helpers.drain(receiver, 1, 10.0)
            assert [m.trial for m in got] == [1]
        intruder = ClientSecurity(keys=load_keypair(curve_keys / "intruder.key_secret"),
                                  server_public=load_public_key(curve_keys / "scanner.key"))
        with ReliableReceiver(sender.last_endpoint, session="s", client_security=intruder,
                              heartbeat_interval_s=helpers.hb) as receiver:
            assert helpers.drain(receiver, 1, 1.0) == []
            assert not receiver.peer_alive
        wrong_server = ClientSecurity(keys=load_keypair(curve_keys / "decoder.key_secret"),
                                      server_public=load_public_key(curve_keys / "intruder.key"))
        with ReliableReceiver(sender.last_endpoint, session="s", client_security=wrong_server,
                              heartbeat_interval_s=helpers.hb) as receiver:
            assert helpers.drain(receiver, 1, 1.0) == []


def test_missing_key_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_keypair(tmp_path / "none.key_secret")
    with pytest.raises(ConfigError):
        ServerSecurity.from_dir(tmp_path, "scanner")


def test_stimulus_client_to_server_on_the_scanner_clock(helpers):
    with StimulusEventServer(LOOP, session="s") as server:
        fake_clock = iter([100.0, 110.5, 112.0, 113.0, 114.0, 115.0]).__next__
        client = StimulusClient(server.endpoint, session="s", run=1, clock=fake_clock)
        client.trigger()
        seq = client.event(trial=1, duration=3.0, trial_type="image", stim_file="a.png")  # onset = 110.5 - 100
        client.event(trial=2, onset=20.0, duration=3.0, trial_type="blank")
        assert client.close(5.0)
        got = [server.recv(5.0) for _ in range(3)]
        assert isinstance(got[0], RunTrigger) and got[0].client_time == 100.0
        assert [type(m) for m in got[1:]] == [StimulusEvent, StimulusEvent]
        assert got[1].seq == seq and got[1].onset == pytest.approx(10.5) and got[1].stim_file == "a.png"
        assert server.run_clock(1).source == "trigger_message"
        server.set_run_anchor(1, 1.7e9)
        assert server.scanner_onset(got[1]) == pytest.approx(1.7e9 + 10.5)
        assert [e.trial for e in server.run_events(1)] == [1, 2]


def test_stimulus_client_mirrors_the_protocol_constants():
    assert stimulus_client.SCHEMA_VERSION == protocol.SCHEMA_VERSION
    assert stimulus_client.PROTOCOL_NAME == protocol.PROTOCOL_NAME
    assert stimulus_client.TOPIC_STIMULUS == protocol.TOPIC_STIMULUS
    assert stimulus_client.TOPIC_TRIGGER == protocol.TOPIC_TRIGGER
    assert stimulus_client.TOPIC_ACK == protocol.TOPIC_ACK
    assert stimulus_client.TOPIC_FEEDBACK == protocol.TOPIC_FEEDBACK
    assert stimulus_client.TOPIC_HEARTBEAT == protocol.TOPIC_HEARTBEAT
    assert stimulus_client.STATE_NEED_SYNC == protocol.STATE_NEED_SYNC
    assert stimulus_client.HEARTBEAT_INTERVAL_S == protocol.HEARTBEAT_INTERVAL_S
    assert stimulus_client.HEARTBEAT_LIVENESS == protocol.HEARTBEAT_LIVENESS
    assert stimulus_client.RECONNECT_INTERVAL_INIT_S == protocol.RECONNECT_INTERVAL_INIT_S
    assert stimulus_client.RECONNECT_INTERVAL_MAX_S == protocol.RECONNECT_INTERVAL_MAX_S


def test_stimulus_client_never_blocks_without_a_server():
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    free = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    client = StimulusClient(f"tcp://127.0.0.1:{free}", session="s", context=ctx)
    client.trigger()
    for trial in range(50):
        client.event(trial=trial, duration=1.0, trial_type="image")
    assert client.unacked == 51
    assert client.close(0.2) is False
    ctx.term()


@pytest.mark.parametrize("policy, expect_next, expect_skipped", [
    ("newest", [5, 4], [1, 2, 3]),
    ("skip", [1, 2], [3, 4, 5]),
    ("fifo", [1, 2, 3, 4, 5], []),
])
def test_reconstruction_policies(policy, expect_next, expect_skipped):
    queue = ReconstructionQueue(policy=policy, max_pending=2)
    skipped = []
    for trial in range(1, 6):
        for decision in queue.submit(trial):
            if decision.decision == "skipped":
                skipped.append(decision.item)
    order = []
    while (item := queue.next()) is not None:
        order.append(item)
    assert order == expect_next
    assert sorted(skipped) == expect_skipped
    assert queue.n_skipped == len(expect_skipped) and queue.backlog == 0


def test_reconstruction_policy_is_validated():
    with pytest.raises(ConfigError):
        ReconstructionQueue(policy="oldest")


def test_psychopy_example_dry_run_reaches_the_server():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "psychopy_stimulus.py"
    with StimulusEventServer(LOOP, session="s") as server:
        done = subprocess.run([sys.executable, str(example), "--dry-run", "--scanner", server.endpoint],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "all acknowledged: True" in done.stdout
        assert [e.stim_file for e in server.run_events(1)] == ["shared0001.png", "shared0002.png", "shared0003.png"]


def test_transport_config_endpoints_and_validation():
    from rt_mindeye.config import from_mapping
    from rt_mindeye.transport.config import TransportConfig, client_security, server_security

    cfg = from_mapping(TransportConfig, {"scanner_host": "10.0.0.5", "decoder_host": "::1", "port_trials": 6000},
                       source="x.yaml", prefix="transport")
    assert cfg.connect_endpoint("trials") == "tcp://10.0.0.5:6000"
    assert cfg.connect_endpoint("decoder_pub") == "tcp://[::1]:5558"
    assert cfg.bind_endpoint("stimulus") == "tcp://127.0.0.1:5560"
    assert server_security(cfg, "scanner") is None and client_security(cfg, "decoder", "scanner") is None
    with pytest.raises(ConfigError) as info:
        from_mapping(TransportConfig, {"recon_policy": "oldest"}, source="x.yaml", prefix="transport")
    assert info.value.key == "transport.recon_policy"


def test_subscriber_resynchronises_after_a_publisher_restart(helpers):
    first = SnapshotPublisher(LOOP, LOOP, session="s", service="scanner", heartbeat_interval_s=helpers.hb)
    pub_endpoint, snapshot_endpoint = first.pub_endpoint, first.snapshot_endpoint
    for i in range(1, 4):
        first.publish(_volume(i))
    with SnapshotSubscriber([Source("scanner", pub_endpoint, snapshot_endpoint)],
                            heartbeat_interval_s=helpers.hb) as sub:
        assert [d.message.volume for d in _messages(sub, 3, helpers)] == [1, 2, 3]
        first.close()  # the scanner service restarts: its numbering starts again at 1
        second = SnapshotPublisher(pub_endpoint, snapshot_endpoint, session="s", service="scanner",
                                   heartbeat_interval_s=helpers.hb)
        try:
            for i in (10, 11):
                second.publish(_volume(i))
            got = _messages(sub, 2, helpers)
            assert [d.message.volume for d in got] == [10, 11]
        finally:
            second.close()
