"""The operator console process: subscribe, fold messages into snapshots, show them (Live) or log them (headless).

One loop owns the state: it takes a :class:`~rt_mindeye.transport.pubsub.Delivery` from the subscriber, computes the
next immutable :class:`ConsoleState`, and at most ``refresh_per_second`` times a second fills the layout (declared
once) and repaints with ``Live(auto_refresh=False)`` (STYLE §6: Live's own thread never sees a half-built state).
The HTML gallery is rewritten when trials changed, at most once per refresh.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from rich.console import Console as RichConsole
from rich.live import Live

from rt_mindeye.console.config import ConsoleConfig
from rt_mindeye.console.gallery import Gallery
from rt_mindeye.console.state import ConsoleState, apply, apply_event, tick
from rt_mindeye.console.views import make_layout, update_layout
from rt_mindeye.transport import protocol
from rt_mindeye.transport.messages import (
    DecodeResult, DesignNotice, Feedback, Heartbeat, StimulusEvent, TrialBetas, VolumeStatus,
)
from rt_mindeye.transport.pubsub import Delivery, SnapshotSubscriber, Source

__all__ = ["OperatorConsole", "Console", "fold"]

log = logging.getLogger("rt_mindeye.console")


def fold(state: ConsoleState, delivery: Delivery, now: float, gallery: Gallery | None = None) -> ConsoleState:
    """The next state after one delivery (writes the reconstruction thumbnail first when there is a gallery)."""
    if delivery.event is not None:
        return apply_event(state, delivery.event)
    msg = delivery.message
    thumbnail = gallery.write_thumbnail(msg) if gallery is not None and isinstance(msg, DecodeResult) else None
    return apply(state, msg, now, source=delivery.source, thumbnail_path=thumbnail)


class OperatorConsole:
    """Follows the scanner and decoder publishers and shows the session.

    ``sources`` are the publishers to follow (see :class:`~rt_mindeye.transport.pubsub.Source`); ``receive`` may
    replace the subscriber (any callable ``timeout_s -> Delivery | None``, e.g. for replaying a recording).
    """

    def __init__(self, config: ConsoleConfig, sources: list[Source] | None = None, *,
                 receive: Callable[[float], Delivery | None] | None = None, rich_console: RichConsole | None = None,
                 heartbeat_interval_s: float = protocol.HEARTBEAT_INTERVAL_S,
                 heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS):
        if (sources is None) == (receive is None):
            raise ValueError("OperatorConsole needs either sources or receive")
        self.config = config
        self._subscriber = (SnapshotSubscriber(sources, heartbeat_interval_s=heartbeat_interval_s,
                                               heartbeat_liveness=heartbeat_liveness) if sources else None)
        self._receive = receive or self._subscriber.recv
        self._dead_after_s = heartbeat_interval_s * heartbeat_liveness
        self.rich_console = rich_console or RichConsole()
        self.gallery = (Gallery(config.gallery_dir, stimulus_dir=config.stimulus_dir,
                                thumbnail_px=config.thumbnail_px, refresh_s=config.gallery_refresh_s)
                        if config.gallery_dir is not None else None)
        self.state = ConsoleState(fd_thresholds=tuple(config.fd_thresholds_mm), fd_window=config.fd_window,
                                  latency_window=config.latency_window,
                                  fd_over=tuple(0 for _ in config.fd_thresholds_mm))
        self._stop = False
        self._until: Callable[[ConsoleState], bool] | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to return after its current wait."""
        self._stop = True

    def run(self, duration_s: float | None = None, *, headless: bool | None = None,
            until: Callable[[ConsoleState], bool] | None = None) -> ConsoleState:
        """Show the session until :meth:`stop`, Ctrl-C, ``duration_s`` or ``until(state)``; returns the last
        state."""
        headless = self.config.headless if headless is None else headless
        end = None if duration_s is None else time.monotonic() + duration_s
        self._until = until
        try:
            if headless:
                self._loop(end, repaint=None)
            else:
                layout = make_layout()
                with Live(layout, console=self.rich_console, auto_refresh=False, screen=False,
                          redirect_stderr=False) as live:
                    def repaint(state: ConsoleState) -> None:
                        update_layout(layout, state, now=time.time(), trials_shown=self.config.trials_shown)
                        live.refresh()

                    self._loop(end, repaint)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()
        return self.state

    def _loop(self, end: float | None, repaint: Callable[[ConsoleState], None] | None) -> None:
        period = 1.0 / self.config.refresh_per_second
        next_paint = time.monotonic()
        trials_written = None
        while not self._stop and (end is None or time.monotonic() < end):
            if self._until is not None and self._until(self.state):
                break
            delivery = self._receive(min(period, max(0.0, next_paint - time.monotonic())) or 0.001)
            # Fold everything that is waiting before painting: a slow repaint must not make the console fall behind.
            while delivery is not None:
                before = self.state
                self.state = fold(self.state, delivery, time.time(), self.gallery)
                if repaint is None:
                    self._log(delivery)
                    self._log_peers(before, self.state)
                if time.monotonic() >= next_paint + period:
                    break  # a flood: paint now and then go on
                delivery = self._receive(0.0)
            if time.monotonic() >= next_paint:
                before = self.state
                self.state = tick(self.state, time.time(), self._dead_after_s)
                if repaint is None:
                    self._log_peers(before, self.state)
                if self.gallery is not None and self.state.trials != trials_written:
                    self.gallery.update(self.state)
                    trials_written = self.state.trials
                if repaint is not None:
                    repaint(self.state)
                next_paint = time.monotonic() + period
        # The last state is always shown and written, whenever the loop ended.
        if self.gallery is not None and self.state.trials != trials_written:
            self.gallery.update(self.state)
        if repaint is not None:
            repaint(self.state)

    @staticmethod
    def _log_peers(before: ConsoleState, after: ConsoleState) -> None:
        """Headless mode: a line for each peer whose liveness changed, whichever way the state learnt it (the
        subscriber's peer event, or the console's own silence check, which can come first and would otherwise leave
        a normal stop without its line)."""
        was_alive = {p.name: p.alive for p in before.peers}
        for peer in after.peers:
            if was_alive.get(peer.name) != peer.alive:
                status = "alive" if peer.alive else "stopped" if peer.stopped else "DEAD"
                log.log(logging.WARNING if status == "DEAD" else logging.INFO, "%s is %s", peer.name, status)

    def _log(self, delivery: Delivery) -> None:
        """Headless mode: one log line per message worth an operator's attention (peers: :meth:`_log_peers`)."""
        if delivery.event is not None:
            return
        msg = delivery.message
        if isinstance(msg, (Heartbeat, TrialBetas)):  # an estimate's line is its result's
            return
        if isinstance(msg, VolumeStatus):
            log.info("run %d volume %d fd %.3f mm%s latency %.0f ms", msg.run, msg.volume, msg.fd,
                     f" GAP {list(msg.missing)}" if msg.gap or msg.missing else "",
                     (msg.created_at - msg.acquisition_time) * 1000)
        elif isinstance(msg, DecodeResult):
            top = ", ".join(f"{label}:{score:.2f}" for label, score in zip(msg.topk_labels, msg.topk_scores))
            log.info("run %d trial %d %s top-5 [%s] recon %s (%s)", msg.run, msg.trial, msg.estimate_kind, top,
                     msg.reconstruction_path or "-", msg.policy_decision)
        elif isinstance(msg, DesignNotice):
            level = logging.INFO if msg.kind in ("clock", "refit") else logging.WARNING
            log.log(level, "run %d%s plan vs shown: %s: %s", msg.run,
                    f" trial {msg.trial}" if msg.trial >= 0 else "", msg.kind, msg.detail)
        elif isinstance(msg, Feedback):
            log.info("run %d trial %d feedback %s (%s) %.0f ms after acquisition", msg.run, msg.trial, msg.status,
                     ", ".join(msg.topk_labels[:1]) or msg.text or "-", (msg.created_at - msg.acquisition_time) * 1e3)
        elif isinstance(msg, StimulusEvent):
            log.info("run %d trial %d shown at %.2f s: %s", msg.run, msg.trial, msg.onset, msg.stim_file or
                     msg.trial_type)
        else:
            log.info("%s: %s", delivery.source, type(msg).__name__)

    def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None


#: The name the issue uses for the runner.
Console = OperatorConsole
