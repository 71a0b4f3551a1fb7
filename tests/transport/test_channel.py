"""Reliable scanner -> decoder stream over real loopback tcp: journal first, acks, catch-up, heartbeats."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rt_mindeye.transport.channel import ReliableReceiver, ReliableSender
from rt_mindeye.transport.journal import Journal, JournalError, read_journal
from rt_mindeye.transport.messages import encode

ENDPOINT = "tcp://127.0.0.1:0"


def _sender(tmp_path, helpers, endpoint=ENDPOINT, **kw):
    return ReliableSender(endpoint, tmp_path / "trials.journal", session="ses-test", fsync=False,
                          heartbeat_interval_s=helpers.hb, **kw)


def _receiver(endpoint, helpers, **kw):
    return ReliableReceiver(endpoint, session="ses-test", heartbeat_interval_s=helpers.hb, reconnect_init_s=0.05,
                            reconnect_max_s=0.2, **kw)


def test_journal_is_written_before_sending_and_reads_back_bit_exactly(tmp_path, helpers):
    with _sender(tmp_path, helpers) as sender:  # nobody listens: send must still journal and return
        sent = [sender.send(helpers.make_trial(i, n_voxels=300)) for i in range(1, 6)]
        on_disk = list(read_journal(tmp_path / "trials.journal"))
    assert [m.seq for m in sent] == [1, 2, 3, 4, 5]
    assert on_disk == sent
    for a, b in zip(sent, on_disk):
        assert a.betas.tobytes() == b.betas.tobytes()


def test_sender_never_blocks_without_a_receiver(tmp_path, helpers):
    # A high-water mark of 1 and no receiver at all: 200 sends must return one after another.
    with _sender(tmp_path, helpers, send_hwm=1) as sender:
        for i in range(200):
            sender.send(helpers.make_trial(i, n_voxels=2000))
        assert sender.last_seq == 200
        assert sender.acked_seq == 0
        assert not sender.peer_alive


def test_in_order_delivery_and_acknowledgement(tmp_path, helpers):
    with _sender(tmp_path, helpers) as sender:
        for i in range(1, 21):
            sender.send(helpers.make_trial(i))
        with _receiver(sender.last_endpoint, helpers) as receiver:
            got = helpers.drain(receiver, 20, 10.0)
            assert [m.seq for m in got] == list(range(1, 21))
            assert [m.trial for m in got] == list(range(1, 21))
            assert sender.wait_acked(20, 5.0)
            assert helpers.drain(receiver, 1, 0.3) == []  # nothing twice


def test_receiver_killed_mid_stream_catches_up_exactly_once(tmp_path, helpers):
    state = tmp_path / "decoder.ack"
    delivered = []
    with _sender(tmp_path, helpers) as sender:
        endpoint = sender.last_endpoint
        first = _receiver(endpoint, helpers, state_path=state)
        for i in range(1, 11):
            sender.send(helpers.make_trial(i))
        delivered += helpers.drain(first, 10, 10.0)
        first.close()  # the decoder dies
        for i in range(11, 31):  # acquisition goes on meanwhile
            sender.send(helpers.make_trial(i))
        assert sender.acked_seq <= 10
        second = _receiver(endpoint, helpers, state_path=state)  # restarted decoder
        try:
            for i in range(31, 41):
                sender.send(helpers.make_trial(i))
            delivered += helpers.drain(second, 30, 15.0)
            delivered += helpers.drain(second, 1, 0.3)  # and nothing more
            assert sender.wait_acked(40, 5.0)
        finally:
            second.close()
    assert [m.seq for m in delivered] == list(range(1, 41))
    expected = [helpers.make_trial(i) for i in range(1, 41)]
    for got, want in zip(delivered, expected):
        assert got.trial == want.trial and np.array_equal(got.betas, want.betas)


def test_unacknowledged_messages_are_resent_after_restart_without_state(tmp_path, helpers):
    with _sender(tmp_path, helpers) as sender:
        endpoint = sender.last_endpoint
        first = _receiver(endpoint, helpers, auto_ack=False)
        for i in range(1, 6):
            sender.send(helpers.make_trial(i))
        got = helpers.drain(first, 5, 10.0)
        assert [m.seq for m in got] == [1, 2, 3, 4, 5]
        first.ack(3)  # the decoder finished trials 1..3, then crashes
        assert sender.wait_acked(3, 5.0)
        first.close()
        second = _receiver(endpoint, helpers)
        try:
            again = helpers.drain(second, 2, 10.0)
            assert [m.seq for m in again] == [4, 5]
            assert helpers.drain(second, 1, 0.3) == []
        finally:
            second.close()


def test_sender_restart_resumes_from_its_journal(tmp_path, helpers):
    first = _sender(tmp_path, helpers)
    endpoint = first.last_endpoint
    for i in range(1, 4):
        first.send(helpers.make_trial(i))
    first.close()  # scanner host restarts before anyone received anything
    port_endpoint = endpoint  # rebind the same port
    second = _sender(tmp_path, helpers, endpoint=port_endpoint)
    try:
        assert second.last_seq == 3 and second.acked_seq == 0
        second.send(helpers.make_trial(4))
        with _receiver(second.last_endpoint, helpers) as receiver:
            got = helpers.drain(receiver, 4, 10.0)
            assert [m.trial for m in got] == [1, 2, 3, 4]
            assert second.wait_acked(4, 5.0)
    finally:
        second.close()
    reopened = Journal(tmp_path / "trials.journal", fsync=False)
    assert reopened.acked_seq == 4 and reopened.unacked() == []
    reopened.close()


def test_heartbeats_detect_a_dead_peer_within_the_configured_time(tmp_path, helpers):
    sender = _sender(tmp_path, helpers, heartbeat_liveness=3)
    receiver = _receiver(sender.last_endpoint, helpers, heartbeat_liveness=3)
    try:
        assert helpers.wait_for(lambda: receiver.peer_alive and sender.peer_alive, 5.0)
        sender.close()
        started = time.monotonic()
        # dead after liveness * interval (0.15 s); allow generous slack for a loaded machine, but bounded
        assert helpers.wait_for(lambda: not receiver.peer_alive, 3.0)
        events = [receiver.events.get_nowait() for _ in range(receiver.events.qsize())]
        assert events[0].alive and not events[-1].alive
        assert time.monotonic() - started < 3.0
    finally:
        receiver.close()
        sender.close()


def test_torn_last_record_is_dropped_and_corruption_inside_is_an_error(tmp_path, helpers):
    path = tmp_path / "j.journal"
    with Journal(path, fsync=False) as journal:
        for seq in (1, 2):
            journal.append(seq, encode(helpers.make_trial(seq).with_seq(seq)))
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"RTMR\x4d")  # a crash in the middle of writing record 3
    with Journal(path, fsync=False) as journal:
        assert journal.last_seq == 2
    assert path.stat().st_size == size
    original = path.read_bytes()
    for where in (40, 200):  # a frame length of record 1, then a byte of its payload
        data = bytearray(original)
        data[where] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(JournalError):
            Journal(path, fsync=False)


def test_receiver_started_before_the_sender_catches_up(tmp_path, helpers):
    import zmq

    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    ctx.term()
    endpoint = f"tcp://127.0.0.1:{port}"
    receiver = _receiver(endpoint, helpers)  # the decoder is up first, nobody listens yet
    try:
        time.sleep(0.3)  # it retries (with back-off) meanwhile
        with _sender(tmp_path, helpers, endpoint=endpoint) as sender:
            for i in range(1, 4):
                sender.send(helpers.make_trial(i))
            got = helpers.drain(receiver, 3, 10.0)
            assert [m.seq for m in got] == [1, 2, 3]
    finally:
        receiver.close()


def test_state_file_of_another_session_is_not_trusted(tmp_path, helpers):
    state = tmp_path / "decoder.ack"
    state.write_text("ses-old 40\n")
    with _sender(tmp_path, helpers) as sender:
        for i in range(1, 4):
            sender.send(helpers.make_trial(i))
        with _receiver(sender.last_endpoint, helpers, state_path=state) as receiver:
            got = helpers.drain(receiver, 3, 10.0)
            assert [m.seq for m in got] == [1, 2, 3]
            assert sender.wait_acked(3, 5.0)
    assert state.read_text().split() == ["ses-test", "3"]


def test_caller_may_reuse_its_array_after_send(tmp_path, helpers):
    with _sender(tmp_path, helpers) as sender:
        msg = helpers.make_trial(1)
        expected = msg.betas.copy()
        sender.send(msg)
        msg.betas[:] = -1.0  # e.g. the GLM reuses its output buffer
        with _receiver(sender.last_endpoint, helpers) as receiver:
            got = helpers.drain(receiver, 1, 10.0)
    assert np.array_equal(got[0].betas, expected)
