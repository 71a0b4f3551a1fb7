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
"""

from __future__ import annotations

import json
import time
from typing import Callable

import zmq
import zmq.auth

__all__ = ["StimulusClient"]

# Mirrors of rt_mindeye.transport.protocol (this file must not need the rest of the package); a test keeps them equal.
SCHEMA_VERSION = 1
PROTOCOL_NAME = "rtm"
TOPIC_STIMULUS = b"stim"
TOPIC_TRIGGER = b"trigger"
TOPIC_ACK = b"ack"
RESEND_AFTER_S = 1.0


class StimulusClient:
    """Sends triggers and stimulus events; ``clock`` is the experiment's clock (default ``time.perf_counter``).

    ``curve`` = (client ``.key_secret`` file, server ``.key`` file) when the scanner host listens beyond loopback.
    """

    def __init__(self, endpoint: str, *, session: str = "", run: int = 1, clock: Callable[[], float] | None = None,
                 curve: tuple[str, str] | None = None, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.session = session
        self.run = run
        self.clock = clock or time.perf_counter
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        if curve is not None:
            public, secret = zmq.auth.load_certificate(curve[0])
            server_public, _ = zmq.auth.load_certificate(curve[1])
            self._socket.curve_publickey = public
            self._socket.curve_secretkey = secret
            self._socket.curve_serverkey = server_public
        self._socket.connect(endpoint)
        self._seq = 0
        self._trigger_time: float | None = None
        self._unacked: dict[int, tuple[list[bytes], float]] = {}  # seq -> (frames, last send time)

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

    def close(self, timeout_s: float = 2.0) -> bool:
        """Wait (bounded) for outstanding acknowledgements, then close; True if everything was acknowledged."""
        done = self.wait_acks(timeout_s)
        self._socket.close(linger=0)
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
