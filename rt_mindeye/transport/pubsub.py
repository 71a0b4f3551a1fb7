"""Publish/subscribe with heartbeats and a late-join snapshot (zguide clone pattern), for the console streams.

:class:`SnapshotPublisher` (scanner host: volume status and stimulus events; decoder host: results) numbers each
message, keeps the last ``history`` of them, publishes them on a PUB socket and a :class:`Heartbeat` every interval,
and answers ``ICANHAZ?`` on a ROUTER snapshot socket with the whole history followed by ``[KTHXBAI, last seq]``.

:class:`SnapshotSubscriber` (console) connects to any number of such sources from one agent thread: it connects its
SUB socket first, asks for the snapshot, hands over the snapshot, then only updates with a seq above it; it reports a
source silent for ``interval * liveness`` seconds as dead and, when a source comes back as a new instance (a
restart, seen in its heartbeat), takes a new snapshot. Publishing never blocks: PUB drops at its high-water mark.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from rt_mindeye.errors import MessageError
from rt_mindeye.transport import protocol, security
from rt_mindeye.transport.agent import STOP, WAKE, Agent, InboxAgent, Liveness, PeerEvent
from rt_mindeye.transport.messages import Heartbeat, Message, decode, encode

__all__ = ["SnapshotPublisher", "SnapshotSubscriber", "Source", "Delivery"]

log = logging.getLogger(__name__)

_GOODBYE = b"g"
#: How long a closing publisher's socket keeps trying to deliver its goodbye heartbeat (milliseconds).
GOODBYE_LINGER_MS = 200


class SnapshotPublisher(Agent):
    """PUB + snapshot ROUTER. ``publish(msg)`` numbers and queues a message and returns at once."""

    def __init__(self, pub_endpoint: str, snapshot_endpoint: str, *, session: str, service: str,
                 server_security: security.ServerSecurity | None = None, history: int = protocol.SNAPSHOT_HISTORY,
                 heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S, send_hwm: int = protocol.SEND_HWM,
                 context: zmq.Context | None = None):
        security.check_bind(pub_endpoint, server_security)
        security.check_bind(snapshot_endpoint, server_security)
        super().__init__(context, f"pub-{service}")
        self.session = session
        self.service = service
        self.instance = uuid.uuid4().hex[:12]
        self.heartbeat_interval_s = heartbeat_interval_s
        self.state = protocol.STATE_READY
        self._server_security = server_security
        self._history: collections.deque[list] = collections.deque(maxlen=history)
        self._outgoing: collections.deque[list] = collections.deque()
        self._seq = 0
        self._lock = threading.Lock()
        self._pub = self.context.socket(zmq.PUB)
        self._pub.linger = protocol.LINGER_MS
        self._pub.sndhwm = send_hwm
        self._snapshot = self.context.socket(zmq.ROUTER)
        self._snapshot.linger = protocol.LINGER_MS
        security.bind(self.context, self._pub, pub_endpoint, server_security)
        security.bind(self.context, self._snapshot, snapshot_endpoint, server_security)
        self.pub_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.snapshot_endpoint = self._snapshot.getsockopt_string(zmq.LAST_ENDPOINT)
        self._start_thread()

    def publish(self, msg: Message) -> Message:
        """Number ``msg``, keep it for late joiners and queue it for the PUB socket; returns the numbered message."""
        with self._lock:
            self._seq += 1
            numbered = msg.with_seq(self._seq)
            frames = encode(numbered)
            self._history.append(frames)
            self._outgoing.append(frames)
        self._signal(WAKE)
        return numbered

    @property
    def last_seq(self) -> int:
        return self._seq

    def close(self, timeout_s: float = 5.0) -> None:
        """Say goodbye (one last heartbeat in state ``stopped``: subscribers show a normal stop, not a dead
        service), then stop the agent and close the sockets."""
        if not self._closed and self._thread is not None and self._thread.is_alive():
            self.state = protocol.STATE_STOPPED
            self._signal(_GOODBYE)
        super().close(timeout_s)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pipe_agent, zmq.POLLIN)
        poller.register(self._snapshot, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        while True:
            timeout_ms = max(0.0, min(next_heartbeat - time.monotonic(), protocol.AGENT_POLL_S)) * 1000
            for sock, _ in poller.poll(timeout_ms):
                if sock is self._pipe_agent:
                    while self._pipe_agent.poll(0):
                        command = self._pipe_agent.recv_multipart()[0]
                        if command == STOP:
                            return
                        if command == _GOODBYE:
                            # Everything queued, then the goodbye heartbeat, given a moment on the wire when the
                            # socket closes.
                            while self._outgoing:
                                self._send_pub(self._outgoing.popleft())
                            self._send_heartbeat()
                            self._pub.linger = GOODBYE_LINGER_MS
                else:
                    self._answer_snapshots()
            while self._outgoing:
                self._send_pub(self._outgoing.popleft())
            now = time.monotonic()
            if now >= next_heartbeat:
                self._send_heartbeat()
                next_heartbeat = now + self.heartbeat_interval_s

    def _send_heartbeat(self) -> None:
        self._send_pub(encode(Heartbeat(session=self.session, service=self.service, state=self.state,
                                        instance=self.instance, detail=f"seq={self._seq}")))

    def _send_pub(self, frames: list) -> None:
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("%s: PUB high-water mark reached, message dropped (late joiners still get it)", self.name)

    def _answer_snapshots(self) -> None:
        while self._snapshot.poll(0):
            identity, *request = self._snapshot.recv_multipart()
            if not request or request[0] != protocol.SNAPSHOT_REQUEST:
                log.warning("%s: unknown snapshot request %r", self.name, request[:1])
                continue
            with self._lock:
                history = list(self._history)
                seq = self._seq
            for frames in history:
                self._snapshot.send_multipart([identity, *frames], copy=False)
            self._snapshot.send_multipart([identity, protocol.SNAPSHOT_END, str(seq).encode(),
                                           self.instance.encode()])

    def _close_sockets(self) -> None:
        self._pub.close()
        self._snapshot.close()
        if self._server_security is not None:
            self._server_security.stop()


@dataclass(frozen=True)
class Source:
    """One publisher the subscriber follows."""

    name: str
    pub_endpoint: str
    snapshot_endpoint: str
    client_security: security.ClientSecurity | None = None


@dataclass(frozen=True)
class Delivery:
    """What the subscriber hands over: a message (``event`` None) or a liveness change (``message`` None)."""

    source: str
    message: Message | None = None
    event: PeerEvent | None = None
    from_snapshot: bool = False


@dataclass
class _SourceState:
    source: Source
    liveness: Liveness
    sub: zmq.Socket | None = None
    snapshot: zmq.Socket | None = None
    syncing: bool = True
    snapshot_asked_at: float = 0.0
    last_seq: int = 0
    instance: str | None = None
    buffered: list = field(default_factory=list)
    gaps: int = 0


class SnapshotSubscriber(InboxAgent):
    """Follows several :class:`SnapshotPublisher` sources; ``recv(timeout_s)`` returns the next :class:`Delivery`."""

    def __init__(self, sources: list[Source], *, heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S,
                 heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS,
                 snapshot_timeout_s: float = protocol.REQUEST_TIMEOUT_S, context: zmq.Context | None = None):
        super().__init__(context, "subscriber")
        self.snapshot_timeout_s = snapshot_timeout_s
        self._states = [_SourceState(s, Liveness(heartbeat_interval_s, heartbeat_liveness)) for s in sources]
        self._start_thread()

    def _open(self, state: _SourceState) -> None:
        self._close_source(state)
        src = state.source
        state.sub = self.context.socket(zmq.SUB)
        state.sub.linger = 0
        state.sub.setsockopt(zmq.SUBSCRIBE, b"")
        security.connect(state.sub, src.pub_endpoint, src.client_security)
        state.snapshot = self.context.socket(zmq.DEALER)
        state.snapshot.linger = 0
        security.connect(state.snapshot, src.snapshot_endpoint, src.client_security)
        self._ask_snapshot(state)

    def _ask_snapshot(self, state: _SourceState) -> None:
        state.syncing = True
        state.buffered = []
        state.snapshot_asked_at = time.monotonic()
        try:
            state.snapshot.send(protocol.SNAPSHOT_REQUEST, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # retried after snapshot_timeout_s

    def _close_source(self, state: _SourceState) -> None:
        for name in ("sub", "snapshot"):
            sock = getattr(state, name)
            if sock is not None:
                sock.close(linger=0)
                setattr(state, name, None)

    def _run(self) -> None:
        for state in self._states:
            self._open(state)
            state.liveness.last_seen = time.monotonic()
        while True:
            poller = zmq.Poller()
            poller.register(self._pipe_agent, zmq.POLLIN)
            owner = {}
            for state in self._states:
                for sock in (state.sub, state.snapshot):
                    poller.register(sock, zmq.POLLIN)
                    owner[sock] = state
            for sock, _ in poller.poll(protocol.AGENT_POLL_S * 1000):
                if sock is self._pipe_agent:
                    if self._pipe_agent.recv_multipart()[0] == STOP:
                        return
                    continue
                state = owner[sock]
                if sock is state.snapshot:
                    self._on_snapshot(state)
                else:
                    self._on_update(state)
            now = time.monotonic()
            for state in self._states:
                if state.liveness.expired(now):
                    self._event(state, False)
                if state.syncing and now - state.snapshot_asked_at > self.snapshot_timeout_s:
                    # Lazy Pirate on the snapshot: a fresh DEALER, ask again.
                    self._open(state)

    def _event(self, state: _SourceState, alive: bool, service: str = "") -> None:
        self._emit(state.source.name, alive, service)
        self._inbox.put(Delivery(state.source.name, event=PeerEvent(state.source.name, alive, time.time(), service)))

    def _heard(self, state: _SourceState, service: str = "") -> None:
        if state.liveness.heard(time.monotonic()):
            self._event(state, True, service)

    def _on_snapshot(self, state: _SourceState) -> None:
        while state.snapshot is not None and state.snapshot.poll(0):
            frames = state.snapshot.recv_multipart(copy=False)
            if frames[0].bytes == protocol.SNAPSHOT_END:
                state.last_seq = int(frames[1].bytes)
                state.instance = frames[2].bytes.decode() if len(frames) > 2 else None
                state.syncing = False
                self._heard(state)
                for msg in state.buffered:
                    self._accept(state, msg)
                state.buffered = []
                continue
            try:
                msg = decode(frames)
            except MessageError as exc:
                log.warning("subscriber: malformed snapshot message from %s: %s", state.source.name, exc)
                continue
            self._inbox.put(Delivery(state.source.name, message=msg, from_snapshot=True))

    def _on_update(self, state: _SourceState) -> None:
        while state.sub is not None and state.sub.poll(0):
            try:
                msg = decode(state.sub.recv_multipart(copy=False))
            except MessageError as exc:
                log.warning("subscriber: malformed message from %s: %s", state.source.name, exc)
                continue
            self._heard(state, getattr(msg, "service", ""))
            if isinstance(msg, Heartbeat):
                if state.instance is not None and msg.instance != state.instance and not state.syncing:
                    log.info("subscriber: %s restarted (instance %s), taking a new snapshot", state.source.name,
                             msg.instance)
                    state.instance = msg.instance
                    state.last_seq = 0
                    self._ask_snapshot(state)
                self._inbox.put(Delivery(state.source.name, message=msg))
                continue
            if state.syncing:
                state.buffered.append(msg)
            else:
                self._accept(state, msg)

    def _accept(self, state: _SourceState, msg: Message) -> None:
        if msg.seq <= state.last_seq:
            return  # already in the snapshot
        if msg.seq != state.last_seq + 1:
            state.gaps += 1
            log.warning("subscriber: %s skipped seq %d..%d (publisher dropped at its high-water mark)",
                        state.source.name, state.last_seq + 1, msg.seq - 1)
        state.last_seq = msg.seq
        self._inbox.put(Delivery(state.source.name, message=msg))

    def _close_sockets(self) -> None:
        for state in self._states:
            self._close_source(state)
