"""Building blocks shared by the transport components: the agent thread, liveness bookkeeping, peer events.

Every component (reliable sender/receiver, publisher, subscriber, status server, stimulus server) is an
:class:`Agent`: a background thread that alone owns the component's ZeroMQ sockets and is driven by the caller through
an inproc PAIR pipe (the zguide ``clone`` agent), so no socket is ever touched by two threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import zmq

__all__ = ["Agent", "Liveness", "PeerEvent", "STOP", "WAKE"]

log = logging.getLogger(__name__)

WAKE = b"w"
STOP = b"s"


@dataclass(frozen=True)
class PeerEvent:
    """A peer came alive or was declared dead (``at`` POSIX seconds)."""

    peer: str
    alive: bool
    at: float
    service: str = ""


class Liveness:
    """Heartbeat bookkeeping for one peer: alive until ``liveness`` intervals pass without any message."""

    def __init__(self, interval_s: float, liveness: int):
        self.interval_s = interval_s
        self.liveness = liveness
        self.last_seen = time.monotonic()
        self.alive = False

    @property
    def timeout_s(self) -> float:
        return self.interval_s * self.liveness

    def heard(self, now: float) -> bool:
        """Record a message; True when this brings a dead (or new) peer to life."""
        self.last_seen = now
        if not self.alive:
            self.alive = True
            return True
        return False

    def expired(self, now: float) -> bool:
        """True once, when the peer has been silent past its timeout."""
        if self.alive and now - self.last_seen > self.timeout_s:
            self.alive = False
            return True
        return False


class Agent:
    """A background thread that owns the sockets, fed through an inproc PAIR pipe (zguide ``clone`` agent)."""

    def __init__(self, context: zmq.Context | None, name: str):
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.name = name
        address = f"inproc://rtm-{name}-{uuid.uuid4().hex}"
        self._pipe_agent = self.context.socket(zmq.PAIR)
        self._pipe_agent.linger = 0
        self._pipe_agent.bind(address)
        self._pipe_caller = self.context.socket(zmq.PAIR)
        self._pipe_caller.linger = 0
        self._pipe_caller.sndhwm = 0
        self._pipe_caller.connect(address)
        self._pipe_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: the exception that stopped the agent thread, if one did (its peers then see it as dead)
        self.failure: Exception | None = None
        self.events: queue.Queue[PeerEvent] = queue.Queue()
        self.on_peer_change: Callable[[PeerEvent], None] | None = None

    def _signal(self, *frames: bytes) -> None:
        with self._pipe_lock:
            if not self._closed:
                self._pipe_caller.send_multipart(list(frames))

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run_safely, name=f"rtm-{self.name}", daemon=True)
        self._thread.start()

    def _run_safely(self) -> None:
        try:
            self._run()
        except zmq.ContextTerminated:
            pass
        except Exception as exc:  # the agent must report, not vanish silently (cf. pyneal's dying threads)
            self.failure = exc
            log.exception("%s agent thread failed", self.name)
            raise

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _emit(self, peer: str, alive: bool, service: str = "") -> None:
        event = PeerEvent(peer=peer, alive=alive, at=time.time(), service=service)
        self.events.put(event)
        log.info("%s: peer %s %s", self.name, peer, "alive" if alive else "dead")
        if self.on_peer_change is not None:
            self.on_peer_change(event)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the agent thread and close every socket (idempotent)."""
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive():
            self._signal(STOP)
            self._thread.join(timeout_s)
        with self._pipe_lock:
            self._closed = True
            self._pipe_caller.close()
        self._pipe_agent.close()
        self._close_sockets()
        if self._own_context:
            self.context.term()

    def _close_sockets(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InboxAgent(Agent):
    """An agent whose thread hands what it receives (messages, deliveries) to the caller, in order."""

    def __init__(self, context: zmq.Context | None, name: str):
        super().__init__(context, name)
        self._inbox: queue.Queue = queue.Queue()

    def recv(self, timeout_s: float):
        """The next item the agent received, or None after ``timeout_s``."""
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
