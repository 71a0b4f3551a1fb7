"""Which trials get a reconstruction when the decoder falls behind (retrieval is never skipped).

Retrieval takes milliseconds and goes out for every trial; a reconstruction takes seconds, so trials can arrive faster
than they are reconstructed. :class:`ReconstructionQueue` decides, under one of three policies (shown on the console):

``newest``  reconstruct the most recent trial first; when more than ``max_pending`` wait, the oldest are skipped.
            The operator always sees the latest trial soon.
``skip``    while ``max_pending`` trials wait, a new trial is skipped; the waiting ones are done oldest first.
``fifo``    every trial is reconstructed, oldest first; nothing is skipped and the backlog may grow without bound.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

from rt_mindeye.errors import ConfigError
from rt_mindeye.transport import protocol

__all__ = ["ReconstructionQueue", "ReconDecision", "QUEUED", "SKIPPED"]

T = TypeVar("T", bound=Hashable)

QUEUED = "queued"
SKIPPED = "skipped"


@dataclass(frozen=True)
class ReconDecision(Generic[T]):
    """``item`` was ``queued`` or ``skipped`` under ``policy``."""

    item: T
    decision: str
    policy: str


class ReconstructionQueue(Generic[T]):
    """Thread-safe pending set of trials to reconstruct; ``submit`` on arrival, ``next`` when the GPU is free."""

    def __init__(self, policy: str = "newest", max_pending: int = 2):
        if policy not in protocol.RECON_POLICIES:
            raise ConfigError(None, "decoder.recon_policy", f"must be one of {list(protocol.RECON_POLICIES)}, "
                                                            f"got {policy!r}")
        if max_pending < 1:
            raise ConfigError(None, "decoder.recon_max_pending", f"must be >= 1, got {max_pending}")
        self.policy = policy
        self.max_pending = max_pending
        self._pending: deque[T] = deque()
        self._lock = threading.Lock()
        self.n_submitted = 0
        self.n_skipped = 0

    def submit(self, item: T) -> list[ReconDecision[T]]:
        """Offer a new trial; returns its decision plus any earlier trial this evicts (``skipped``)."""
        with self._lock:
            self.n_submitted += 1
            decisions: list[ReconDecision[T]] = []
            if self.policy == "skip" and len(self._pending) >= self.max_pending:
                self.n_skipped += 1
                return [ReconDecision(item, SKIPPED, self.policy)]
            self._pending.append(item)
            decisions.append(ReconDecision(item, QUEUED, self.policy))
            if self.policy == "newest":
                while len(self._pending) > self.max_pending:
                    evicted = self._pending.popleft()
                    self.n_skipped += 1
                    decisions.append(ReconDecision(evicted, SKIPPED, self.policy))
            return decisions

    def next(self) -> T | None:
        """The trial to reconstruct now, or None when nothing waits."""
        with self._lock:
            if not self._pending:
                return None
            return self._pending.pop() if self.policy == "newest" else self._pending.popleft()

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._pending)

    def pending(self) -> tuple[T, ...]:
        with self._lock:
            return tuple(self._pending)
