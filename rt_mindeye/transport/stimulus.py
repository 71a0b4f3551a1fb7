"""Scanner host side of the stimulus events: receive, acknowledge, and place them on the acquisition clock.

The stimulus computer (``stimulus_client.StimulusClient``) reports the run's trigger and each stimulus with an onset in
seconds after that trigger. The scanner's clock for a run is anchored at the acquisition time of the run's first
volume (``set_run_anchor``, called by the scanner service when volume 1 arrives); until then the arrival time of the
trigger message on the scanner host stands in. ``scanner_onset(event)`` gives POSIX seconds on that clock; the GLM
uses ``event.onset`` directly, since the first volume starts at the trigger.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import zmq

from rt_mindeye.errors import MessageError
from rt_mindeye.transport import protocol, security
from rt_mindeye.transport.agent import STOP, InboxAgent
from rt_mindeye.transport.messages import Ack, RunTrigger, StimulusEvent, decode, encode

__all__ = ["StimulusEventServer", "RunClock"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunClock:
    """Where a run's time 0 lies on the scanner host's clock (POSIX s) and what it is based on."""

    run: int
    anchor: float
    source: str  # "first_volume" or "trigger_message"


class StimulusEventServer(InboxAgent):
    """ROUTER socket on the scanner host; ``recv(timeout_s)`` returns StimulusEvent / RunTrigger in arrival order.

    Every message is acknowledged to its client by seq. A re-sent event (same run and trial) replaces the earlier
    copy in ``run_events(run)``, so a client resend never doubles a trial.
    """

    def __init__(self, endpoint: str, *, session: str, server_security: security.ServerSecurity | None = None,
                 context: zmq.Context | None = None):
        security.check_bind(endpoint, server_security)
        super().__init__(context, "stimulus")
        self.session = session
        self._server_security = server_security
        self._socket = self.context.socket(zmq.ROUTER)
        self._socket.linger = 0
        security.bind(self.context, self._socket, endpoint, server_security)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._events: dict[int, dict[int, StimulusEvent]] = {}
        self._clocks: dict[int, RunClock] = {}
        self._trigger_arrivals: dict[int, float] = {}
        self._start_thread()

    # --- caller API -------------------------------------------------------------------------------------------------

    def set_run_anchor(self, run: int, acquisition_time: float) -> None:
        """Anchor ``run`` at its first volume's acquisition time (POSIX s); overrides the trigger-message estimate."""
        with self._lock:
            self._clocks[run] = RunClock(run, float(acquisition_time), "first_volume")

    def trigger_arrival(self, run: int) -> float | None:
        """When the trigger message of ``run`` reached this host (POSIX s; the first one when it was re-sent), kept
        after the run is anchored, so the offset between the two clocks can be measured."""
        with self._lock:
            return self._trigger_arrivals.get(run)

    def run_clock(self, run: int) -> RunClock | None:
        with self._lock:
            return self._clocks.get(run)

    def scanner_onset(self, event: StimulusEvent) -> float | None:
        """The event's onset in POSIX seconds on the scanner's acquisition clock (None before the run is anchored)."""
        if event.clock == "scanner":
            return event.onset
        clock = self.run_clock(event.run)
        return None if clock is None else clock.anchor + event.onset

    def run_events(self, run: int) -> list[StimulusEvent]:
        """The run's events so far, by onset."""
        with self._lock:
            return sorted(self._events.get(run, {}).values(), key=lambda e: (e.onset, e.trial))

    # --- agent ------------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pipe_agent, zmq.POLLIN)
        poller.register(self._socket, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll(protocol.AGENT_POLL_S * 1000):
                if sock is self._pipe_agent:
                    if self._pipe_agent.recv_multipart()[0] == STOP:
                        return
                    continue
                while self._socket.poll(0):
                    identity, *frames = self._socket.recv_multipart()
                    self._on_message(identity, frames)

    def _on_message(self, identity: bytes, frames: list[bytes]) -> None:
        received_at = time.time()
        try:
            msg = decode(frames)
            if not isinstance(msg, (StimulusEvent, RunTrigger)):
                raise MessageError("type", f"expected StimulusEvent or RunTrigger, got {type(msg).__name__}")
        except MessageError as exc:
            log.warning("stimulus: dropping malformed message: %s", exc)
            return
        ack = Ack(session=self.session, ack_seq=msg.seq, receiver="scanner")
        try:
            self._socket.send_multipart([identity, *encode(ack)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client resends and we dedupe
        with self._lock:
            if isinstance(msg, RunTrigger):
                self._trigger_arrivals.setdefault(msg.run, received_at)
                current = self._clocks.get(msg.run)
                if current is None or current.source != "first_volume":
                    self._clocks[msg.run] = RunClock(msg.run, received_at, "trigger_message")
            else:
                run_events = self._events.setdefault(msg.run, {})
                previous = run_events.get(msg.trial)
                run_events[msg.trial] = msg
                if previous is not None and previous.seq == msg.seq and previous.created_at == msg.created_at:
                    return  # a resend of what we already have (our ack was lost)
        self._inbox.put(msg)

    def _close_sockets(self) -> None:
        self._socket.close()
        if self._server_security is not None:
            self._server_security.stop()
