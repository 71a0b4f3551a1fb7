"""Stimulus computer -> scanner host: a tiny client for PsychoPy (or any Python) experiments.

This file depends on pyzmq and the standard library only, so it can be copied next to an experiment script on the
stimulus computer. It speaks the rt-mindeye wire format (docs/transport.md) for two messages: ``RunTrigger`` (the
scanner trigger was seen) and ``StimulusEvent`` (a stimulus was shown, ``onset`` seconds after that trigger). ::

    from stimulus_client import StimulusClient          # or: from rt_mindeye.transport.stimulus_client import ...
    client = StimulusClient("tcp://scanner-host:5560", session="sub-01_ses-02", run=1)
    client.trigger()                                     # at the scanner's first trigger pulse of the run
    client.event(trial=1, duration=3.0, trial_type="image", stim_file="shared0001.png")   # onset = now - trigger
    client.close()                                       # waits (bounded) for the scanner host's acknowledgements

Nothing here blocks the experiment: a send that cannot go out at once is kept and retried on the next call or in
``wait_acks``; the scanner host acknowledges each message by seq.

Closed loop: with ``feedback_endpoint`` (the decoder host's ``transport.port_feedback``) a background thread receives
the decoder's :class:`FeedbackItem` for each trial (top-k, score, reconstruction path and PNG bytes, on time or
late), acknowledges it, and after a disconnect (or a restart of this program, with ``feedback_state``) asks for
everything it missed: every trial's feedback arrives once. ::

    client = StimulusClient("tcp://scanner-host:5560", session="sub-01_ses-02", run=1,
                            feedback_endpoint="tcp://decoder-host:5562")
    item = client.feedback(trial=1, timeout_s=0.5)       # None if nothing came within 0.5 s
    if item is not None and not item.late: show(item.topk_labels[0], item.image_png)
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.auth

__all__ = ["StimulusClient", "FeedbackItem"]

# Mirrors of rt_mindeye.transport.protocol (this file must not need the rest of the package); a test keeps them equal.
SCHEMA_VERSION = 1
PROTOCOL_NAME = "rtm"
TOPIC_STIMULUS = b"stim"
TOPIC_TRIGGER = b"trigger"
TOPIC_ACK = b"ack"
TOPIC_FEEDBACK = b"feedback"
TOPIC_HEARTBEAT = b"hb"
STATE_NEED_SYNC = "need-sync"
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_LIVENESS = 3
RECONNECT_INTERVAL_INIT_S = 0.25
RECONNECT_INTERVAL_MAX_S = 8.0
RESEND_AFTER_S = 1.0


@dataclass(frozen=True)
class FeedbackItem:
    """The decoder's feedback for one trial, as received (see ``Feedback`` in docs/transport.md).

    ``status`` is ``on_time`` or ``late``; a late notice without a result has no ``topk_labels`` and ``text`` says
    what to show instead. ``image_png`` holds the reconstruction's PNG bytes when the decoder sends them, else None
    (``image_path`` is a path on the decoder host). ``received_at`` is this computer's ``time.time()`` on arrival.
    """

    seq: int
    run: int
    trial: int
    trial_type: str
    estimate_kind: str
    status: str
    topk_labels: tuple[str, ...]
    topk_scores: tuple[float, ...]
    score: float
    averaged: bool
    n_repeats: int
    image_path: str | None
    image_png: bytes | None
    text: str
    acquisition_time: float
    deadline_s: float
    result_done_at: float
    received_at: float

    @property
    def late(self) -> bool:
        return self.status != "on_time"

    @property
    def has_result(self) -> bool:
        return bool(self.topk_labels)

    @property
    def latency_s(self) -> float:
        """From the acquisition of the trial's last needed volume to its arrival here (clocks in step, e.g. NTP)."""
        return self.received_at - self.acquisition_time


def _secure(socket: zmq.Socket, curve: tuple[str, str] | None) -> None:
    if curve is None:
        return
    public, secret = zmq.auth.load_certificate(curve[0])
    server_public, _ = zmq.auth.load_certificate(curve[1])
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public


class StimulusClient:
    """Sends triggers and stimulus events; ``clock`` is the experiment's clock (default ``time.perf_counter``).

    ``curve`` = (client ``.key_secret`` file, server ``.key`` file) when the scanner host listens beyond loopback.
    ``feedback_endpoint`` (decoder host, ``transport.port_feedback``) turns on the feedback receiver, with
    ``feedback_curve`` (client ``.key_secret``, decoder ``.key``) beyond loopback and ``feedback_state`` a file that
    keeps the last acknowledged feedback across restarts of this program.
    """

    def __init__(self, endpoint: str, *, session: str = "", run: int = 1, clock: Callable[[], float] | None = None,
                 curve: tuple[str, str] | None = None, context: zmq.Context | None = None,
                 feedback_endpoint: str | None = None, feedback_curve: tuple[str, str] | None = None,
                 feedback_state: str | None = None, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S):
        self.endpoint = endpoint
        self.session = session
        self.run = run
        self.clock = clock or time.perf_counter
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        _secure(self._socket, curve)
        self._socket.connect(endpoint)
        self._seq = 0
        self._trigger_time: float | None = None
        self._unacked: dict[int, tuple[list[bytes], float]] = {}  # seq -> (frames, last send time)
        self._feedback: _FeedbackReceiver | None = None
        if feedback_endpoint is not None:
            self._feedback = _FeedbackReceiver(self._context, feedback_endpoint, session, feedback_curve,
                                               feedback_state, heartbeat_interval_s)
            self._feedback.start()

    # --- public API -----------------------------------------------------------------------------------------------

    def trigger(self, run: int | None = None, t: float | None = None) -> float:
        """Mark the scanner trigger of ``run`` (default: the current run) at ``t`` (default: now); returns ``t``."""
        if run is not None:
            self.run = run
        self._trigger_time = self.clock() if t is None else float(t)
        self._send(TOPIC_TRIGGER, "RunTrigger", {"run": self.run, "client_time": self._trigger_time})
        return self._trigger_time

    def event(self, *, trial: int, onset: float | None = None, duration: float = 0.0, trial_type: str = "",
              stim_file: str = "", run: int | None = None, clock: str = "trigger") -> int:
        """Report a stimulus; ``onset`` in seconds after the trigger (default: now - trigger). Returns its seq."""
        now = self.clock()
        if onset is None:
            if self._trigger_time is None:
                raise RuntimeError("StimulusClient.event: call trigger() first or pass onset")
            onset = now - self._trigger_time
        fields = {"run": self.run if run is None else run, "trial": int(trial), "onset": float(onset),
                  "duration": float(duration), "trial_type": str(trial_type), "stim_file": str(stim_file),
                  "clock": clock, "client_time": now}
        return self._send(TOPIC_STIMULUS, "StimulusEvent", fields)

    @property
    def unacked(self) -> int:
        self._poll_acks()
        return len(self._unacked)

    def wait_acks(self, timeout_s: float = 2.0) -> bool:
        """Wait at most ``timeout_s`` until every message is acknowledged (resending the silent ones)."""
        deadline = time.monotonic() + timeout_s
        while self._unacked and time.monotonic() < deadline:
            self._resend_due()
            if self._socket.poll(min(50, max(1, int((deadline - time.monotonic()) * 1000)))):
                self._poll_acks()
        return not self._unacked

    # --- feedback ---------------------------------------------------------------------------------------------------

    def feedback(self, trial: int, run: int | None = None, timeout_s: float = 0.0) -> FeedbackItem | None:
        """The feedback of ``trial`` (of ``run``, default the current run), waiting at most ``timeout_s``; None if
        it has not arrived (show your own placeholder). Needs ``feedback_endpoint``."""
        return self._receiver().wait(self.run if run is None else run, int(trial), timeout_s)

    def poll_feedback(self) -> list[FeedbackItem]:
        """Feedback that arrived since the last call, in arrival order (never waits)."""
        return self._receiver().take_new()

    @property
    def feedback_received(self) -> list[FeedbackItem]:
        """Every feedback received so far, in arrival order."""
        return self._receiver().items()

    @property
    def feedback_connected(self) -> bool:
        """The decoder's feedback stream is alive (heard within its heartbeat timeout)."""
        return self._receiver().alive

    def _receiver(self) -> "_FeedbackReceiver":
        if self._feedback is None:
            raise RuntimeError("StimulusClient: no feedback_endpoint was given")
        return self._feedback

    def close(self, timeout_s: float = 2.0) -> bool:
        """Wait (bounded) for outstanding acknowledgements, then close; True if everything was acknowledged."""
        done = self.wait_acks(timeout_s)
        self._socket.close(linger=0)
        if self._feedback is not None:
            self._feedback.stop()
        if self._own_context:
            self._context.term()
        return done

    def __enter__(self) -> "StimulusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- wire -------------------------------------------------------------------------------------------------------

    def _send(self, topic: bytes, type_name: str, fields: dict) -> int:
        self._seq += 1
        header = {"proto": PROTOCOL_NAME, "schema_version": SCHEMA_VERSION, "type": type_name,
                  "fields": {"session": self.session, "seq": self._seq, "created_at": time.time(), **fields},
                  "arrays": []}
        frames = [topic, json.dumps(header, separators=(",", ":")).encode("utf-8")]
        self._unacked[self._seq] = (frames, float("-inf"))
        self._poll_acks()
        self._try_send(self._seq)
        return self._seq

    def _try_send(self, seq: int) -> None:
        frames, _ = self._unacked[seq]
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            self._unacked[seq] = (frames, time.monotonic())
        except zmq.Again:
            pass  # retried by _resend_due

    def _resend_due(self) -> None:
        now = time.monotonic()
        for seq, (_frames, sent) in sorted(self._unacked.items()):
            if now - sent > RESEND_AFTER_S:
                self._try_send(seq)

    def _poll_acks(self) -> None:
        while self._socket.poll(0):
            frames = self._socket.recv_multipart()
            if len(frames) < 2 or frames[0] != TOPIC_ACK:
                continue
            try:
                seq = json.loads(frames[1])["fields"]["ack_seq"]
            except (ValueError, KeyError, TypeError):
                continue
            self._unacked.pop(seq, None)


class _FeedbackReceiver(threading.Thread):
    """Receives the decoder's feedback stream on its own DEALER socket and thread (so the experiment never waits
    on the network): acknowledges every feedback by seq, drops the duplicates of a resend, sends heartbeats, and
    on silence reconnects and asks for everything after the last feedback it acknowledged (the receiving half of
    rt-mindeye's reliable channel, docs/transport.md)."""

    def __init__(self, context: zmq.Context, endpoint: str, session: str, curve: tuple[str, str] | None,
                 state_path: str | None, heartbeat_interval_s: float):
        super().__init__(name="rtm-feedback", daemon=True)
        self.context = context
        self.endpoint = endpoint
        self.session = session
        self.curve = curve
        self.state_path = state_path
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timeout_s = heartbeat_interval_s * HEARTBEAT_LIVENESS
        self.instance = uuid.uuid4().hex[:12]
        self.last_seq = self._load_state()
        self.reconnects = 0
        self._socket: zmq.Socket | None = None
        self._sender_instance: str | None = None
        self._last_heard = 0.0  # last message, or the last (re)connect: when to give up on a silent decoder
        self._last_message_at: float | None = None
        self._stop_event = threading.Event()
        self._cond = threading.Condition()
        self._items: list[FeedbackItem] = []
        self._by_trial: dict[tuple[int, int], FeedbackItem] = {}
        self._taken = 0

    # --- caller side (experiment thread) ------------------------------------------------------------------------

    def wait(self, run: int, trial: int, timeout_s: float) -> FeedbackItem | None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while (run, trial) not in self._by_trial:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._by_trial[(run, trial)]

    def take_new(self) -> list[FeedbackItem]:
        with self._cond:
            new = self._items[self._taken:]
            self._taken = len(self._items)
            return new

    def items(self) -> list[FeedbackItem]:
        with self._cond:
            return list(self._items)

    @property
    def alive(self) -> bool:
        heard = self._last_message_at
        return heard is not None and time.monotonic() - heard <= self.timeout_s

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop_event.set()
        self.join(timeout_s)

    # --- state file -------------------------------------------------------------------------------------------------

    def _load_state(self) -> int:
        if not self.state_path or not os.path.exists(self.state_path):
            return -1
        session, _, seq = open(self.state_path).read().strip().rpartition(" ")
        try:
            return int(seq) if session == self.session else -1
        except ValueError:
            return -1

    def _save_state(self) -> None:
        if not self.state_path:
            return
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.session} {self.last_seq}\n")
        os.replace(tmp, self.state_path)

    # --- thread -----------------------------------------------------------------------------------------------------

    def run(self) -> None:
        interval = RECONNECT_INTERVAL_INIT_S
        self._connect()
        next_heartbeat = time.monotonic()
        try:
            while not self._stop_event.is_set():
                if self._socket.poll(50):
                    self._receive_all()
                    interval = RECONNECT_INTERVAL_INIT_S
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._send("Heartbeat", TOPIC_HEARTBEAT, {"service": "stimulus", "state": "ready",
                                                              "instance": self.instance,
                                                              "detail": f"acked={self.last_seq}"})
                    next_heartbeat = now + self.heartbeat_interval_s
                if now - self._last_heard > self.timeout_s:
                    # Silent too long: drop the socket, back off, reconnect and ask for what we missed.
                    self._socket.close(linger=0)
                    if self._stop_event.wait(interval):
                        return
                    interval = min(2 * interval, RECONNECT_INTERVAL_MAX_S)
                    self.reconnects += 1
                    self._connect()
        finally:
            if self._socket is not None:
                self._socket.close(linger=0)

    def _connect(self) -> None:
        self._socket = self.context.socket(zmq.DEALER)
        self._socket.linger = 0
        _secure(self._socket, self.curve)
        self._socket.connect(self.endpoint)
        self._last_heard = time.monotonic()
        self._ask_catch_up()

    def _ask_catch_up(self) -> None:
        self._send("Ack", TOPIC_ACK, {"ack_seq": self.last_seq, "catch_up": True, "receiver": "stimulus"})

    def _send(self, type_name: str, topic: bytes, fields: dict) -> None:
        header = {"proto": PROTOCOL_NAME, "schema_version": SCHEMA_VERSION, "type": type_name,
                  "fields": {"session": self.session, "seq": 0, "created_at": time.time(), **fields}, "arrays": []}
        try:
            self._socket.send_multipart([topic, json.dumps(header, separators=(",", ":")).encode("utf-8")],
                                        flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: heartbeats and catch-up requests are repeated anyway

    def _receive_all(self) -> None:
        while self._socket.poll(0):
            frames = self._socket.recv_multipart()
            received_at = time.time()
            self._last_heard = self._last_message_at = time.monotonic()
            try:
                header = json.loads(frames[1])
                fields = header["fields"]
                if header.get("schema_version") != SCHEMA_VERSION:
                    continue
            except (IndexError, ValueError, KeyError, TypeError):
                continue
            if frames[0] == TOPIC_HEARTBEAT:
                restarted = self._sender_instance is not None and fields.get("instance") != self._sender_instance
                self._sender_instance = fields.get("instance")
                if restarted or fields.get("state") == STATE_NEED_SYNC:
                    self._ask_catch_up()
            elif frames[0] == TOPIC_FEEDBACK and header.get("type") == "Feedback":
                self._on_feedback(header, fields, frames[2:], received_at)

    def _on_feedback(self, header: dict, fields: dict, buffers: list[bytes], received_at: float) -> None:
        seq = int(fields["seq"])
        if self.last_seq < 0:  # no state: the decoder starts from what it has not seen acknowledged
            self.last_seq = seq - 1
        if seq <= self.last_seq:
            return  # a resend we already have
        if seq != self.last_seq + 1:
            self._ask_catch_up()  # a gap: ask again from the last one we have
            return
        arrays = {spec["name"]: bytes(buffer) for spec, buffer in zip(header.get("arrays", []), buffers)}
        item = FeedbackItem(
            seq=seq, run=int(fields["run"]), trial=int(fields["trial"]), trial_type=fields.get("trial_type", ""),
            estimate_kind=fields.get("estimate_kind", ""), status=fields.get("status", "on_time"),
            topk_labels=tuple(fields.get("topk_labels", ())), topk_scores=tuple(fields.get("topk_scores", ())),
            score=float(fields.get("score", float("nan"))), averaged=bool(fields.get("averaged", False)),
            n_repeats=int(fields.get("n_repeats", 1)), image_path=fields.get("image_path"),
            image_png=arrays.get("image_png"), text=fields.get("text", ""),
            acquisition_time=float(fields["acquisition_time"]), deadline_s=float(fields["deadline_s"]),
            result_done_at=float(fields["result_done_at"]), received_at=received_at)
        self.last_seq = seq
        self._save_state()
        self._send("Ack", TOPIC_ACK, {"ack_seq": seq, "catch_up": False, "receiver": "stimulus"})
        with self._cond:
            self._items.append(item)
            self._by_trial[(item.run, item.trial)] = item
            self._cond.notify_all()
