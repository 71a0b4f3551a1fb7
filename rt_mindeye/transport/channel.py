"""Reliable scanner -> decoder stream: journal first, acknowledgements, catch-up after a restart, heartbeats.

Pattern (zguide clone + Paranoid Pirate, adapted): the :class:`ReliableSender` (scanner host) binds a ROUTER socket
and the :class:`ReliableReceiver` (decoder host) connects a DEALER to it. ::

    sender.send(msg)          caller's thread: seq = journal.next_seq(); journal.append(seq, frames)  (durable)
                              then a wake-up on the inproc pipe; never waits for the network
    sender agent thread       sends every journalled message after each live receiver's cursor with NOBLOCK;
                              at the high-water mark it stops and tries again on the next tick
    receiver agent thread     on (re)connect: Ack(ack_seq=<last acked or -1>, catch_up=True)  ("ICANHAZ?")
                              delivers seq == last + 1 in order, drops duplicates (seq <= last), and on a gap asks
                              for a catch-up from its last seq; acknowledges by seq (auto, or by the caller's ack())
    both                      Heartbeat every HEARTBEAT_INTERVAL_S; any message resets the peer's liveness; after
                              HEARTBEAT_LIVENESS silent intervals the peer is dead (a PeerEvent); the receiver then
                              reconnects with exponential back-off, and catches up again

The receiver can keep its last acknowledged seq in a small state file, so that a decoder restart resumes exactly
after the last trial it acknowledged (exactly once across restarts); without one a restarted receiver gets
everything the sender has not seen acknowledged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq

from rt_mindeye.errors import MessageError, SessionError
from rt_mindeye.transport import protocol, security
from rt_mindeye.transport.agent import STOP, WAKE, Agent, InboxAgent, Liveness, PeerEvent
from rt_mindeye.transport.journal import Journal
from rt_mindeye.transport.messages import Ack, Heartbeat, Message, decode, encode

__all__ = ["PeerEvent", "ReliableSender", "ReliableReceiver", "Liveness"]

log = logging.getLogger(__name__)

# --- sender ---------------------------------------------------------------------------------------------------------


@dataclass
class _Receiver:
    identity: bytes
    liveness: Liveness
    cursor: int | None = None  # last seq sent to it; None until it asked for a catch-up


class ReliableSender(Agent):
    """Scanner side of the reliable stream. ``send`` journals and returns at once; an agent thread delivers.

    Parameters: ``endpoint`` to bind (loopback by default; elsewhere CURVE ``server_security`` is required),
    ``journal_path`` the append-only session record (reopened after a restart: numbering continues and whatever was
    never acknowledged is sent again), ``service`` the name in heartbeats.
    """

    def __init__(self, endpoint: str, journal_path: str | Path, *, session: str, service: str = "scanner",
                 server_security: security.ServerSecurity | None = None, fsync: bool = True,
                 heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S,
                 heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS, send_hwm: int = protocol.SEND_HWM,
                 context: zmq.Context | None = None):
        security.check_bind(endpoint, server_security)
        super().__init__(context, f"sender-{service}")
        self.endpoint = endpoint
        self.session = session
        self.service = service
        self.instance = uuid.uuid4().hex[:12]
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.journal = Journal(journal_path, fsync=fsync)
        self._send_lock = threading.Lock()
        self._server_security = server_security
        self._socket = self.context.socket(zmq.ROUTER)
        self._socket.linger = protocol.LINGER_MS
        self._socket.sndhwm = send_hwm
        self._socket.router_mandatory = True  # an unknown peer is an error we see, not a silent drop
        try:
            security.bind(self.context, self._socket, endpoint, server_security)
        except zmq.ZMQError:
            self.close()
            raise
        self.last_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._receivers: dict[bytes, _Receiver] = {}
        self._start_thread()

    # --- caller API ----------------------------------------------------------------------------------------------

    def send(self, msg: Message) -> Message:
        """Journal ``msg`` with the next seq and queue it; returns the numbered message. Never waits on the peer."""
        with self._send_lock:
            numbered = msg.with_seq(self.journal.next_seq())
            self.journal.append(numbered.seq, encode(numbered))
        self._signal(WAKE)
        return numbered

    @property
    def acked_seq(self) -> int:
        return self.journal.acked_seq

    @property
    def last_seq(self) -> int:
        return self.journal.last_seq

    @property
    def peer_alive(self) -> bool:
        return any(r.liveness.alive for r in list(self._receivers.values()))

    def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Wait (bounded) until ``seq`` is acknowledged; for shutdown and tests, never on the acquisition path."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.journal.acked_seq >= seq:
                return True
            time.sleep(0.01)
        return self.journal.acked_seq >= seq

    # --- agent ---------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pipe_agent, zmq.POLLIN)
        poller.register(self._socket, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        while True:
            now = time.monotonic()
            timeout_ms = max(0.0, min(next_heartbeat - now, protocol.AGENT_POLL_S)) * 1000
            for sock, _ in poller.poll(timeout_ms):
                if sock is self._pipe_agent:
                    while self._pipe_agent.poll(0):
                        if self._pipe_agent.recv_multipart()[0] == STOP:
                            return
                else:
                    self._on_socket()
            now = time.monotonic()
            self._flush()
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + self.heartbeat_interval_s
            for identity, receiver in list(self._receivers.items()):
                if receiver.liveness.expired(now):
                    self._emit(identity.decode(errors="replace"), False)
                    del self._receivers[identity]

    def _on_socket(self) -> None:
        while self._socket.poll(0):
            identity, *frames = self._socket.recv_multipart(copy=False)
            identity = identity.bytes
            try:
                msg = decode(frames)
            except MessageError as exc:
                log.warning("%s: dropping malformed message from %r: %s", self.name, identity, exc)
                continue
            receiver = self._receivers.get(identity)
            if receiver is None:
                receiver = self._receivers[identity] = _Receiver(
                    identity, Liveness(self.heartbeat_interval_s, self.heartbeat_liveness))
            if receiver.liveness.heard(time.monotonic()):
                self._emit(identity.decode(errors="replace"), True,
                           getattr(msg, "service", "") or getattr(msg, "receiver", ""))
            if isinstance(msg, Ack):
                if msg.ack_seq > self.journal.last_seq:
                    # An ack for messages this journal never had (a receiver state file from another session):
                    # do not trust it; ask the receiver to resynchronise from scratch.
                    log.warning("%s: %r acknowledged seq %d but the journal ends at %d; ignored", self.name,
                                identity, msg.ack_seq, self.journal.last_seq)
                    self._send_to(receiver, encode(self._heartbeat_msg(protocol.STATE_NEED_SYNC)))
                    continue
                if msg.ack_seq > 0:
                    self.journal.mark_acked(msg.ack_seq)
                if msg.catch_up:
                    receiver.cursor = self.journal.acked_seq if msg.ack_seq < 0 else min(msg.ack_seq,
                                                                                          self.journal.last_seq)
            elif isinstance(msg, Heartbeat) and receiver.cursor is None:
                # A receiver we have no cursor for (we restarted, or we declared it dead): tell it to catch up.
                self._send_to(receiver, encode(self._heartbeat_msg(protocol.STATE_NEED_SYNC)))

    def _flush(self) -> None:
        last = self.journal.last_seq
        for receiver in list(self._receivers.values()):
            if receiver.cursor is None or not receiver.liveness.alive:
                continue
            while receiver.cursor < last:
                seq = receiver.cursor + 1
                try:
                    frames = self.journal.frames(seq)
                except KeyError:  # numbering gap cannot happen in one journal; skip defensively
                    receiver.cursor = seq
                    continue
                if not self._send_to(receiver, frames):
                    break
                receiver.cursor = seq

    def _send_to(self, receiver: _Receiver, frames: list) -> bool:
        try:
            self._socket.send_multipart([receiver.identity, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # high-water mark: keep it in the outbox, try on the next tick
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the peer disconnected; its liveness will expire
                receiver.cursor = None
                return False
            raise

    def _heartbeat_msg(self, state: str = protocol.STATE_READY) -> Heartbeat:
        return Heartbeat(session=self.session, service=self.service, instance=self.instance, state=state,
                         detail=f"last_seq={self.journal.last_seq} acked={self.journal.acked_seq}")

    def _heartbeat(self) -> None:
        ready = encode(self._heartbeat_msg())
        need_sync = encode(self._heartbeat_msg(protocol.STATE_NEED_SYNC))
        for receiver in list(self._receivers.values()):
            self._send_to(receiver, ready if receiver.cursor is not None else need_sync)

    def _close_sockets(self) -> None:
        self._socket.close()
        if self._server_security is not None:
            self._server_security.stop()
        self.journal.close()


# --- receiver -------------------------------------------------------------------------------------------------------


class ReliableReceiver(InboxAgent):
    """Decoder side of the reliable stream: in-order, duplicate-free delivery with acknowledgements.

    ``recv(timeout_s)`` returns the next message or None. With ``auto_ack`` (default) a message is acknowledged as it
    is handed over; otherwise call ``ack(seq)`` once it is processed (everything up to ``seq``). ``state_path``
    keeps the last acknowledged seq across restarts.
    """

    def __init__(self, endpoint: str, *, session: str, service: str = "decoder",
                 client_security: security.ClientSecurity | None = None, state_path: str | Path | None = None,
                 auto_ack: bool = True, heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S,
                 heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS,
                 reconnect_init_s: float = protocol.RECONNECT_INTERVAL_INIT_S,
                 reconnect_max_s: float = protocol.RECONNECT_INTERVAL_MAX_S, context: zmq.Context | None = None):
        super().__init__(context, f"receiver-{service}")
        self.endpoint = endpoint
        self.session = session
        self.service = service
        self.auto_ack = auto_ack
        self.state_path = Path(state_path) if state_path is not None else None
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconnect_init_s = reconnect_init_s
        self.reconnect_max_s = reconnect_max_s
        self._client_security = client_security
        self._liveness = Liveness(heartbeat_interval_s, heartbeat_liveness)
        self.acked_seq = self._load_state()
        self.delivered_seq = self.acked_seq
        self._socket: zmq.Socket | None = None
        self._sender_instance: str | None = None
        self.reconnects = 0
        self.instance = uuid.uuid4().hex[:12]
        self._start_thread()

    # --- caller API ----------------------------------------------------------------------------------------------

    def recv(self, timeout_s: float) -> Message | None:
        """The next message in seq order, or None after ``timeout_s``."""
        return super().recv(timeout_s)

    def ack(self, seq: int) -> None:
        """Acknowledge everything up to and including ``seq`` (only needed with ``auto_ack=False``)."""
        self._signal(b"a", str(int(seq)).encode())

    @property
    def peer_alive(self) -> bool:
        return self._liveness.alive

    # --- state file ----------------------------------------------------------------------------------------------

    def _load_state(self) -> int:
        """The last acknowledged seq from the state file (``<session> <seq>``); -1 without one or for another
        session."""
        if self.state_path is None or not self.state_path.exists():
            return -1  # no state: ask for whatever the sender has not seen acknowledged
        text = self.state_path.read_text().strip()
        session, _, seq = text.rpartition(" ")
        try:
            value = int(seq)
        except ValueError:
            raise SessionError(self.state_path, f"receiver state file holds {text!r:.40}, not '<session> <seq>'"
                               ) from None
        if session != self.session:
            log.warning("%s: state file %s is for session %r, not %r; starting fresh", self.name, self.state_path,
                        session, self.session)
            return -1
        return value

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(f"{self.session} {self.acked_seq}\n")
        os.replace(tmp, self.state_path)

    # --- agent ---------------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = protocol.LINGER_MS
        sock.identity = f"{self.service}-{uuid.uuid4().hex[:8]}".encode()
        security.connect(sock, self.endpoint, self._client_security)
        self._socket = sock
        self._request_catch_up()

    def _request_catch_up(self) -> None:
        # A true acknowledgement (acked, not merely delivered): the sender resends from there and the duplicates of
        # what was delivered but not yet acknowledged are dropped in _on_data.
        ack = Ack(session=self.session, ack_seq=self.acked_seq, catch_up=True, receiver=self.service)
        self._send(encode(ack))

    def _send(self, frames: list) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # nothing connected yet or queue full: heartbeats and catch-ups are repeated anyway

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _run(self) -> None:
        self._connect()
        interval = self.reconnect_init_s
        next_heartbeat = time.monotonic()
        self._liveness.last_seen = time.monotonic()
        while True:
            poller = zmq.Poller()
            poller.register(self._pipe_agent, zmq.POLLIN)
            poller.register(self._socket, zmq.POLLIN)
            now = time.monotonic()
            timeout_ms = max(0.0, min(next_heartbeat - now, protocol.AGENT_POLL_S)) * 1000
            for sock, _ in poller.poll(timeout_ms):
                if sock is self._pipe_agent:
                    while self._pipe_agent.poll(0):
                        command = self._pipe_agent.recv_multipart()
                        if command[0] == STOP:
                            return
                        if command[0] == b"a":
                            self._do_ack(int(command[1]))
                else:
                    self._on_socket()
                    interval = self.reconnect_init_s
            now = time.monotonic()
            if now >= next_heartbeat:
                self._send(encode(Heartbeat(session=self.session, service=self.service, instance=self.instance,
                                            detail=f"acked={self.acked_seq}")))
                next_heartbeat = now + self.heartbeat_interval_s
            if self._liveness.expired(now):
                self._emit(self.endpoint, False)
            if not self._liveness.alive and now - self._liveness.last_seen > self._liveness.timeout_s:
                # Paranoid Pirate: silent too long -> drop the socket, back off, reconnect, catch up.
                self._disconnect()
                if self._wait_or_stop(interval):
                    return
                interval = min(interval * 2, self.reconnect_max_s)
                self.reconnects += 1
                self._connect()
                self._liveness.last_seen = time.monotonic()

    def _wait_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless told to stop (True)."""
        if self._pipe_agent.poll(seconds * 1000):
            command = self._pipe_agent.recv_multipart()
            if command[0] == STOP:
                return True
            if command[0] == b"a":
                self._do_ack(int(command[1]))
        return False

    def _on_socket(self) -> None:
        while self._socket.poll(0):
            frames = self._socket.recv_multipart(copy=False)
            try:
                msg = decode(frames)
            except MessageError as exc:
                log.warning("%s: dropping malformed message: %s", self.name, exc)
                continue
            if self._liveness.heard(time.monotonic()):
                self._emit(self.endpoint, True, getattr(msg, "service", ""))
            if isinstance(msg, Heartbeat):
                restarted = self._sender_instance is not None and msg.instance != self._sender_instance
                self._sender_instance = msg.instance
                if restarted or msg.state == protocol.STATE_NEED_SYNC:
                    self._request_catch_up()
                continue
            self._on_data(msg)

    def _on_data(self, msg: Message) -> None:
        if self.delivered_seq < 0:  # fresh receiver: the sender starts from its acknowledged watermark
            self.delivered_seq = msg.seq - 1
        if msg.seq <= self.delivered_seq:
            return  # duplicate of a resend
        if msg.seq != self.delivered_seq + 1:
            log.warning("%s: gap (got seq %d after %d), asking for a catch-up", self.name, msg.seq,
                        self.delivered_seq)
            self._request_catch_up()
            return
        self.delivered_seq = msg.seq
        self._inbox.put(msg)
        if self.auto_ack:
            self._do_ack(msg.seq)

    def _do_ack(self, seq: int) -> None:
        seq = min(seq, self.delivered_seq)
        if seq <= self.acked_seq:
            return
        self.acked_seq = seq
        self._save_state()
        self._send(encode(Ack(session=self.session, ack_seq=seq, receiver=self.service)))

    def _close_sockets(self) -> None:
        self._disconnect()
