"""Decoder host -> stimulus computer: each trial's feedback, once, reliably (the closed loop).

:class:`FeedbackServer` is the reliable channel of :mod:`rt_mindeye.transport.channel` pointed the other way: the
decoder host binds a ROUTER (``transport.port_feedback``), journals every :class:`Feedback` before it is sent
(``decoder/feedback.journal``: the session's record of what the participant was shown), and the stimulus computer's
:class:`~rt_mindeye.transport.stimulus_client.StimulusClient` connects a DEALER, acknowledges by seq and, on every
(re)connect, asks for everything after the last feedback it acknowledged. So a stimulus computer that drops off the
network or restarts gets every feedback it missed, once; duplicates of a resend are dropped on its side by seq.

A trial gets at most one feedback, also across decoder restarts: a restarted decoder re-decodes the estimates it had
not acknowledged, and the trials already in the journal are not sent again (:meth:`FeedbackServer.send` returns
None for them).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq

from rt_mindeye.transport import protocol, security
from rt_mindeye.transport.channel import ReliableSender
from rt_mindeye.transport.journal import read_journal
from rt_mindeye.transport.messages import Feedback

__all__ = ["FeedbackServer"]

log = logging.getLogger(__name__)


class FeedbackServer:
    """The decoder's feedback stream to the stimulus computer; ``send(feedback)`` journals and returns at once."""

    def __init__(self, endpoint: str, journal_path: str | Path, *, session: str,
                 server_security: security.ServerSecurity | None = None, fsync: bool = True,
                 heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S,
                 heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS, context: zmq.Context | None = None):
        journal_path = Path(journal_path)
        self._lock = threading.Lock()
        self.sent: set[tuple[int, int]] = set()
        if journal_path.exists():
            self.sent = {(m.run, m.trial) for m in read_journal(journal_path) if isinstance(m, Feedback)}
        self._sender = ReliableSender(endpoint, journal_path, session=session, service="feedback",
                                      server_security=server_security, fsync=fsync,
                                      heartbeat_interval_s=heartbeat_interval_s,
                                      heartbeat_liveness=heartbeat_liveness, context=context)
        self.endpoint = self._sender.last_endpoint

    def send(self, feedback: Feedback) -> Feedback | None:
        """Journal and queue ``feedback``; None (nothing sent) when its trial already had feedback."""
        key = (feedback.run, feedback.trial)
        with self._lock:
            if key in self.sent:
                log.info("feedback for run %d trial %d was sent before (a restarted decoder re-decoded it): not "
                         "sent again", *key)
                return None
            self.sent.add(key)
            return self._sender.send(feedback)

    def has_sent(self, run: int, trial: int) -> bool:
        with self._lock:
            return (run, trial) in self.sent

    @property
    def acked_seq(self) -> int:
        return self._sender.acked_seq

    @property
    def last_seq(self) -> int:
        return self._sender.last_seq

    @property
    def peer_alive(self) -> bool:
        return self._sender.peer_alive

    def wait_acked(self, timeout_s: float) -> bool:
        """Wait (bounded) until the stimulus computer acknowledged everything sent so far (shutdown, tests)."""
        return self._sender.wait_acked(self._sender.last_seq, timeout_s)

    def close(self) -> None:
        self._sender.close()

    def __enter__(self) -> "FeedbackServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
