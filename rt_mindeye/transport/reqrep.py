"""Request/reply with Lazy Pirate retries: the decoder's status query and the preflight ping.

:class:`LazyPirateClient` sends a :class:`StatusRequest`, polls for ``timeout_s``; on silence it closes the REQ socket
(linger 0), opens a new one and resends, at most ``retries`` times, then raises
:class:`~rt_mindeye.errors.TransportTimeout`. A reply counts only if it echoes the request's seq. :class:`StatusServer`
answers on a REP socket from its own thread with whatever the service's ``handler`` returns.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import zmq

from rt_mindeye.errors import MessageError, TransportTimeout
from rt_mindeye.transport import protocol, security
from rt_mindeye.transport.agent import STOP, Agent
from rt_mindeye.transport.messages import StatusReply, StatusRequest, decode, encode

__all__ = ["LazyPirateClient", "StatusServer"]

log = logging.getLogger(__name__)


class LazyPirateClient:
    """Reliable request/reply over REQ: bounded wait, bounded retries, reply checked against the request's seq."""

    def __init__(self, endpoint: str, *, session: str, service: str = "console",
                 client_security: security.ClientSecurity | None = None,
                 timeout_s: float = protocol.REQUEST_TIMEOUT_S, retries: int = protocol.REQUEST_RETRIES,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.session = session
        self.service = service
        self.timeout_s = timeout_s
        self.retries = retries
        self._client_security = client_security
        self._own_context = context is None
        self.context = context or zmq.Context()
        self._seq = 0
        self._socket: zmq.Socket | None = None

    def _open(self) -> None:
        self._socket = self.context.socket(zmq.REQ)
        self._socket.linger = 0
        security.connect(self._socket, self.endpoint, self._client_security)

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, query: str = "status", args: dict[str, str] | None = None) -> StatusReply:
        """Send one request; returns the matching reply or raises TransportTimeout after every retry."""
        self._seq += 1
        request = StatusRequest(session=self.session, seq=self._seq, service=self.service, query=query,
                                args=dict(args or {}))
        frames = encode(request)
        started = time.monotonic()
        for _attempt in range(self.retries):
            if self._socket is None:
                self._open()
            self._socket.send_multipart(frames)
            deadline = time.monotonic() + self.timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                if not self._socket.poll(remaining * 1000):
                    break
                try:
                    reply = decode(self._socket.recv_multipart())
                except MessageError as exc:
                    log.warning("lazy pirate: malformed reply from %s: %s", self.endpoint, exc)
                    break
                if isinstance(reply, StatusReply) and reply.request_seq == request.seq:
                    return reply
                log.warning("lazy pirate: reply for seq %s, expected %d; ignored", getattr(reply, "request_seq", "?"),
                            request.seq)
                break  # REQ allows one reply per request: resend on a fresh socket
            # No (good) reply: the socket is confused, drop it and resend on a new one (Lazy Pirate).
            self._drop()
        raise TransportTimeout(self.endpoint, time.monotonic() - started)

    def close(self) -> None:
        self._drop()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "LazyPirateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StatusServer(Agent):
    """REP socket answering :class:`StatusRequest` with ``handler(request) -> (state, details)`` from a thread."""

    def __init__(self, endpoint: str, handler: Callable[[StatusRequest], tuple[str, dict[str, str]]], *,
                 session: str, service: str, server_security: security.ServerSecurity | None = None,
                 context: zmq.Context | None = None):
        security.check_bind(endpoint, server_security)
        super().__init__(context, f"status-{service}")
        self.session = session
        self.service = service
        self.handler = handler
        self._server_security = server_security
        self._socket = self.context.socket(zmq.REP)
        self._socket.linger = 0
        security.bind(self.context, self._socket, endpoint, server_security)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replies = 0
        self._start_thread()

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
                frames = self._socket.recv_multipart()
                try:
                    request = decode(frames)
                    if not isinstance(request, StatusRequest):
                        raise MessageError("type", f"expected StatusRequest, got {type(request).__name__}")
                    state, details = self.handler(request)
                    request_seq = request.seq
                except MessageError as exc:
                    state, details, request_seq = "error", {"error": str(exc)}, -1
                self._replies += 1
                reply = StatusReply(session=self.session, seq=self._replies, request_seq=request_seq,
                                    service=self.service, state=state, details=details)
                self._socket.send_multipart(encode(reply))

    def _close_sockets(self) -> None:
        self._socket.close()
        if self._server_security is not None:
            self._server_security.stop()
