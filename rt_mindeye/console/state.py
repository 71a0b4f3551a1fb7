"""The console's state: an immutable snapshot, advanced by pure functions from incoming messages.

``apply(state, message, now)`` returns a new :class:`ConsoleState`; nothing is mutated, so the view builders and
rich's refresh thread can read a snapshot while the next one is being made (STYLE §6). All times are POSIX seconds;
every latency is measured from the acquisition time of the volume (or, for a trial, of the last volume its estimate
used), never from the moment a file was noticed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from rt_mindeye.console.config import FIRMM_THRESHOLDS_MM
from rt_mindeye.transport import protocol
from rt_mindeye.transport.channel import PeerEvent
from rt_mindeye.transport.messages import (
    DecodeResult, DesignNotice, Feedback, Heartbeat, Message, RunTrigger, StimulusEvent, TrialBetas, VolumeStatus,
)

__all__ = [
    "ConsoleState", "TrialRow", "PeerStatus", "Retrieved", "apply", "apply_event", "tick", "latency_summary",
    "LATENCY_STAGES",
]

#: Latency stages, each measured from acquisition: name -> what it is.
LATENCY_STAGES = {
    "received": "volume complete on the scanner host",
    "volume": "volume processed (motion, GLM update)",
    "betas": "trial estimate sent to the decoder",
    "decoder": "trial estimate received by the decoder",
    "retrieval": "top-k retrieval done",
    "reconstruction": "reconstruction done",
    "feedback": "feedback sent to the stimulus computer",
    "console": "result shown on the console",
}


@dataclass(frozen=True)
class Retrieved:
    id: int
    score: float
    label: str
    image: str = ""


@dataclass(frozen=True)
class TrialRow:
    run: int
    trial: int
    trial_type: str = ""
    estimate_kind: str = ""
    estimate_version: int = 0
    stim_file: str | None = None
    onset: float | None = None
    topk: tuple[Retrieved, ...] = ()
    reconstruction_path: str | None = None
    thumbnail_path: str | None = None
    policy_decision: str = ""
    retrieval_latency_s: float | None = None
    reconstruction_latency_s: float | None = None
    design: str = ""  # what the live events said about this trial against the plan ("not shown", "+0.8 s", ...)
    fd_max_mm: float | None = None  # largest framewise displacement over the trial's window (latest estimate)
    motion_gated: bool = False  # over the motion gate (motion.gate_fd_mm)
    averaged_topk: tuple[Retrieved, ...] = ()
    """Top-k of the image's repeat average (decoder.average_repeats), over ``n_repeats`` trials."""
    n_repeats: int = 0
    feedback: str = ""
    """What the stimulus computer was sent: '' (nothing yet), 'on_time', 'late' or 'late notice'."""
    feedback_latency_s: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.run, self.trial)


@dataclass(frozen=True)
class PeerStatus:
    name: str
    alive: bool
    state: str = ""
    last_seen: float = 0.0
    instance: str = ""
    detail: str = ""

    @property
    def stopped(self) -> bool:
        """Silent after saying it stops (a normal end), as opposed to dead (it went silent without a word)."""
        return not self.alive and self.state in protocol.STOPPED_STATES

    @property
    def status(self) -> str:
        return "ALIVE" if self.alive else "stopped" if self.stopped else "DEAD"


@dataclass(frozen=True)
class ConsoleState:
    """Everything the screen shows; build a new one with :func:`apply`, never mutate."""

    session: str = ""
    run: int | None = None
    volumes_in_run: int = 0
    last_volume: int | None = None
    volumes_total: int = 0
    gaps: tuple[tuple[int, int], ...] = ()  # (run, missing volume)
    fd: tuple[float, ...] = ()  # this run, most recent last, at most fd_window
    fd_over: tuple[int, ...] = (0, 0, 0)  # this run: volumes above each threshold
    fd_thresholds: tuple[float, ...] = FIRMM_THRESHOLDS_MM
    motion: tuple[float, ...] = ()
    latencies: tuple[tuple[str, tuple[float, ...]], ...] = ()  # stage -> recent seconds from acquisition
    stage_ms: tuple[tuple[str, tuple[float, ...]], ...] = ()  # per-stage durations (ms) reported by services
    trials: tuple[TrialRow, ...] = ()
    peers: tuple[PeerStatus, ...] = ()
    recon_policy: str = ""
    recon_backlog: int = 0
    recon_skipped: int = 0
    stimulus_events: int = 0
    last_stimulus: str = ""
    clock_offset_s: float | None = None  # the current run's trigger arrival minus its first volume's acquisition
    design_counts: tuple[tuple[str, int], ...] = ()  # disagreements between plan and live events, by kind
    design_notices: tuple[str, ...] = ()  # the most recent ones, newest last
    feedback_sent: int = 0
    feedback_late: int = 0
    updated_at: float = 0.0
    fd_window: int = 120
    latency_window: int = 200

    def latency(self, stage: str) -> tuple[float, ...]:
        return dict(self.latencies).get(stage, ())

    @property
    def gated_trials(self) -> int:
        """Trials of the current run over the motion gate."""
        return sum(1 for row in self.trials if row.motion_gated and row.run == self.run)

    def trial(self, run: int, trial: int) -> TrialRow | None:
        for row in self.trials:
            if row.key == (run, trial):
                return row
        return None


# --- pure updates --------------------------------------------------------------------------------------------------


def _push(series: tuple[tuple[str, tuple[float, ...]], ...], name: str, value: float | None,
          window: int) -> tuple[tuple[str, tuple[float, ...]], ...]:
    if value is None or not math.isfinite(value):
        return series
    table = dict(series)
    table[name] = (table.get(name, ()) + (float(value),))[-window:]
    return tuple(table.items())


def _since(t: float | None, acquisition_time: float) -> float | None:
    return None if t is None else t - acquisition_time


def _upsert_peer(peers: tuple[PeerStatus, ...], name: str, **changes) -> tuple[PeerStatus, ...]:
    out = []
    found = False
    for peer in peers:
        if peer.name == name:
            peer = dataclasses.replace(peer, **changes)
            found = True
        out.append(peer)
    if not found:
        out.append(PeerStatus(name=name, **{"alive": True, **changes}))
    return tuple(sorted(out, key=lambda p: p.name))


def apply(state: ConsoleState, msg: Message, now: float, *, source: str | None = None,
          thumbnail_path: str | None = None) -> ConsoleState:
    """The state after ``msg`` arrived at ``now``. ``source`` names the publisher (for liveness)."""
    state = dataclasses.replace(state, updated_at=now, session=msg.session or state.session)
    if isinstance(msg, VolumeStatus):
        return _apply_volume(state, msg)
    if isinstance(msg, DecodeResult):
        return _apply_result(state, msg, now, thumbnail_path)
    if isinstance(msg, TrialBetas):
        row = state.trial(msg.run, msg.trial) or TrialRow(msg.run, msg.trial)
        row = dataclasses.replace(row, trial_type=msg.trial_type, estimate_kind=msg.estimate_kind,
                                  estimate_version=msg.estimate_version, stim_file=msg.stim_file or row.stim_file,
                                  onset=msg.onset, motion_gated=msg.motion_gated,
                                  fd_max_mm=None if math.isnan(msg.fd_max_mm) else msg.fd_max_mm)
        state = _put_trial(state, row)
        return dataclasses.replace(state, latencies=_push(state.latencies, "betas",
                                                          msg.created_at - msg.acquisition_time,
                                                          state.latency_window))
    if isinstance(msg, Heartbeat):
        name = source or msg.service
        return dataclasses.replace(state, peers=_upsert_peer(state.peers, name, alive=True, state=msg.state,
                                                             last_seen=now, instance=msg.instance,
                                                             detail=msg.detail))
    if isinstance(msg, StimulusEvent):
        row = state.trial(msg.run, msg.trial) or TrialRow(msg.run, msg.trial)
        row = dataclasses.replace(row, trial_type=row.trial_type or msg.trial_type,
                                  stim_file=row.stim_file or msg.stim_file or None, onset=msg.onset)
        state = _put_trial(state, row)
        return dataclasses.replace(state, stimulus_events=state.stimulus_events + 1,
                                   last_stimulus=f"run {msg.run} trial {msg.trial} {msg.trial_type} "
                                                 f"@{msg.onset:.2f}s")
    if isinstance(msg, RunTrigger):
        return dataclasses.replace(state, last_stimulus=f"trigger run {msg.run}")
    if isinstance(msg, DesignNotice):
        return _apply_design(state, msg)
    if isinstance(msg, Feedback):
        return _apply_feedback(state, msg)
    return state


def _apply_feedback(state: ConsoleState, msg: Feedback) -> ConsoleState:
    row = state.trial(msg.run, msg.trial) or TrialRow(msg.run, msg.trial)
    late = msg.status == protocol.FEEDBACK_LATE
    label = "late notice" if late and not msg.topk_labels else msg.status
    latency = msg.created_at - msg.acquisition_time
    state = _put_trial(state, dataclasses.replace(row, feedback=label, feedback_latency_s=latency))
    return dataclasses.replace(state, feedback_sent=state.feedback_sent + 1, feedback_late=state.feedback_late + late,
                               latencies=_push(state.latencies, "feedback", latency, state.latency_window))


#: How a design notice marks its trial's row.
_DESIGN_MARKS = {"not_shown": "not shown", "unplanned": "not planned", "late": "reported late"}
DESIGN_NOTICES_KEPT = 5


def _apply_design(state: ConsoleState, msg: DesignNotice) -> ConsoleState:
    if msg.kind == "clock":
        offset = None if math.isnan(msg.offset_s) else msg.offset_s
        return dataclasses.replace(state, clock_offset_s=offset,
                                   design_notices=(state.design_notices + (f"run {msg.run}: {msg.detail}",))
                                   [-DESIGN_NOTICES_KEPT:])
    counts = dict(state.design_counts)
    counts[msg.kind] = counts.get(msg.kind, 0) + 1
    where = f"run {msg.run}" + (f" trial {msg.trial}" if msg.trial >= 0 else "")
    state = dataclasses.replace(state, design_counts=tuple(sorted(counts.items())),
                                design_notices=(state.design_notices + (f"{where}: {msg.detail}",))
                                [-DESIGN_NOTICES_KEPT:])
    mark = _DESIGN_MARKS.get(msg.kind)
    if msg.kind == "onset":
        mark = f"shown {msg.offset_s:+.1f} s"
    if mark is None or msg.trial < 0:
        return state
    row = state.trial(msg.run, msg.trial) or TrialRow(msg.run, msg.trial)
    return _put_trial(state, dataclasses.replace(row, design=mark))


def _apply_volume(state: ConsoleState, msg: VolumeStatus) -> ConsoleState:
    if state.run != msg.run:  # a new run: per-run counters start over
        state = dataclasses.replace(state, run=msg.run, volumes_in_run=0, last_volume=None, fd=(),
                                    fd_over=tuple(0 for _ in state.fd_thresholds), motion=())
    missing = set(msg.missing)
    if state.last_volume is not None and msg.volume > state.last_volume + 1:
        missing.update(range(state.last_volume + 1, msg.volume))
    known = set(state.gaps)
    gaps = state.gaps + tuple((msg.run, v) for v in sorted(missing) if (msg.run, v) not in known)
    if msg.volume in msg.missing:
        # A placeholder for a volume declared missing: no data, no latency, but the counter moves past it.
        last = msg.volume if state.last_volume is None else max(state.last_volume, msg.volume)
        return dataclasses.replace(state, gaps=gaps, last_volume=last)
    fd_over = state.fd_over
    fd = state.fd
    if math.isfinite(msg.fd):
        fd = (fd + (msg.fd,))[-state.fd_window:]
        fd_over = tuple(n + (msg.fd > t) for n, t in zip(state.fd_over, state.fd_thresholds))
    latencies = _push(state.latencies, "received", msg.received_at - msg.acquisition_time, state.latency_window)
    latencies = _push(latencies, "volume", msg.created_at - msg.acquisition_time, state.latency_window)
    stage_ms = state.stage_ms
    for name, ms in msg.stage_ms.items():
        stage_ms = _push(stage_ms, name, ms, state.latency_window)
    last = msg.volume if state.last_volume is None else max(state.last_volume, msg.volume)
    return dataclasses.replace(state, volumes_in_run=state.volumes_in_run + 1, last_volume=last,
                               volumes_total=state.volumes_total + 1, gaps=gaps, fd=fd, fd_over=fd_over,
                               motion=msg.motion, latencies=latencies, stage_ms=stage_ms)


def _put_trial(state: ConsoleState, row: TrialRow) -> ConsoleState:
    rows = [r for r in state.trials if r.key != row.key]
    rows.append(row)
    rows.sort(key=lambda r: r.key)
    return dataclasses.replace(state, trials=tuple(rows))


def _apply_result(state: ConsoleState, msg: DecodeResult, now: float, thumbnail_path: str | None) -> ConsoleState:
    row = state.trial(msg.run, msg.trial) or TrialRow(msg.run, msg.trial)
    topk = tuple(Retrieved(int(i), float(s), str(label), msg.topk_images[n] if msg.topk_images else "")
                 for n, (i, s, label) in enumerate(zip(msg.topk_ids, msg.topk_scores, msg.topk_labels)))
    if msg.averaged:
        # Shown beside the trial's own result, never instead of it; its timing is not the trial's latency.
        if msg.estimate_version < row.estimate_version and row.averaged_topk:
            return state
        return _put_trial(state, dataclasses.replace(row, averaged_topk=topk, n_repeats=msg.n_repeats,
                                                     stim_file=msg.stim_file or row.stim_file))
    acq = msg.acquisition_time
    # A result for an older estimate than the row shows (a reconstruction finishing late, a decoder catching up)
    # adds its images but does not take the row back to that estimate's kind and top-k.
    stale = msg.estimate_version < row.estimate_version
    changes = dict(trial_type=msg.trial_type or row.trial_type, stim_file=msg.stim_file or row.stim_file)
    if not stale:
        changes.update(estimate_kind=msg.estimate_kind, estimate_version=msg.estimate_version,
                       policy_decision=msg.policy_decision)
    if topk and not stale:
        if not msg.topk_images and [r.id for r in row.topk] == [r.id for r in topk]:
            topk = tuple(dataclasses.replace(new, image=old.image) for new, old in zip(topk, row.topk))
        changes["topk"] = topk
    if msg.retrieval_done_at is not None:
        changes["retrieval_latency_s"] = msg.retrieval_done_at - acq
    if msg.reconstruction_path is not None:
        changes["reconstruction_path"] = msg.reconstruction_path
    if msg.reconstruction_done_at is not None:
        changes["reconstruction_latency_s"] = msg.reconstruction_done_at - acq
    if thumbnail_path is not None:
        changes["thumbnail_path"] = thumbnail_path
    state = _put_trial(state, dataclasses.replace(row, **changes))
    window = state.latency_window
    latencies = state.latencies
    latencies = _push(latencies, "betas", _since(msg.betas_sent_at, acq), window)
    latencies = _push(latencies, "decoder", _since(msg.received_at, acq), window)
    latencies = _push(latencies, "retrieval", _since(msg.retrieval_done_at, acq), window)
    latencies = _push(latencies, "reconstruction", _since(msg.reconstruction_done_at, acq), window)
    latencies = _push(latencies, "console", now - acq, window)
    stage_ms = state.stage_ms
    for name, ms in msg.stage_ms.items():
        stage_ms = _push(stage_ms, name, ms, window)
    skipped = state.recon_skipped + (msg.policy_decision == "skipped")
    return dataclasses.replace(state, latencies=latencies, stage_ms=stage_ms, recon_policy=msg.policy,
                               recon_backlog=msg.backlog, recon_skipped=skipped)


def apply_event(state: ConsoleState, event: PeerEvent) -> ConsoleState:
    """A peer came alive or was declared dead."""
    return dataclasses.replace(state, peers=_upsert_peer(state.peers, event.peer, alive=event.alive,
                                                         **({"last_seen": event.at} if event.alive else {})),
                               updated_at=max(state.updated_at, event.at))


def tick(state: ConsoleState, now: float, dead_after_s: float) -> ConsoleState:
    """Mark peers silent for more than ``dead_after_s`` dead (also covers a console that lost its subscription)."""
    if not any(p.alive and now - p.last_seen > dead_after_s for p in state.peers):
        return state
    peers = tuple(dataclasses.replace(p, alive=False) if p.alive and now - p.last_seen > dead_after_s else p
                  for p in state.peers)
    return dataclasses.replace(state, peers=peers)


def latency_summary(samples: Iterable[float]) -> tuple[float, float, int] | None:
    """(p50, p99, n) of latency samples in seconds, or None without samples."""
    values = np.asarray(tuple(samples), dtype=np.float64)
    if values.size == 0:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99), int(values.size)
