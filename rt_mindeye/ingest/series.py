"""Turn volumes in arrival order into runs of volumes in acquisition order.

:class:`SeriesAssembler` is a pure state machine: it never reads a clock, a file or a thread. Callers hand it each
accepted :class:`~rt_mindeye.volume.Volume` with :meth:`~SeriesAssembler.push` and advance time-based decisions with
:meth:`~SeriesAssembler.poll`, passing the current time (``time.monotonic()`` in the watcher, any number in tests).
It returns small frozen event dataclasses, in an order downstream stages can consume as is:

* ``RunStarted(series)`` when a volume of a new, higher series number arrives (``RunEnded`` of the previous run
  comes first). A restarted run has a new series number, so it is simply a new run.
* exactly one of ``VolumeReady`` or ``VolumeGap`` for every volume number of a run from ``first_volume`` up to the
  highest one received, in increasing order. A volume that arrives ahead of an earlier missing one is held until
  the earlier one arrives or until ``gap_timeout_s`` has passed since the first held volume arrived; then the missing
  ones are declared (``VolumeGap``) and the held ones released, so one lost file never stalls the run.
* ``LateVolume`` for a volume whose slot was already declared a gap, or whose run has already ended: it is reported
  (and the watcher has recorded it) but not put back into the stream.
* ``DuplicateDropped`` for a second file with an already-seen SOPInstanceUID (the scanner or a share re-sent it,
  perhaps under another name), or a different file claiming a volume number already taken.
* ``GeometryRejected`` (loudly, with the :class:`~rt_mindeye.errors.GeometryMismatchError` fields) for a volume
  whose shape, affine or TR differs from the first volume of its series; its slot becomes a ``VolumeGap`` with
  reason ``"geometry_rejected"``.

Volume numbers are the scanner's (``Volume.volume``, from the DICOM header), never the file name: the name is only
a hint that a file belongs to the export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from rt_mindeye.errors import GeometryMismatchError
from rt_mindeye.volume import Volume

log = logging.getLogger(__name__)

# TR assumed for the gap timeout when neither the configuration nor the DICOM gives one.
FALLBACK_TR_S = 2.0


# --- events ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStarted:
    """The first volume of a new series arrived: a new run begins."""

    series: int
    at: float


@dataclass(frozen=True)
class VolumeReady:
    """The next volume of the run, in acquisition order, complete and checked."""

    volume: Volume
    received_at: float
    """Time (caller's clock) the volume was pushed into the assembler."""
    recorded_path: Path | None = None
    """Where the raw DICOM was copied in the session folder, if recording is on."""

    @property
    def series(self) -> int:
        return self.volume.series

    @property
    def number(self) -> int:
        return self.volume.volume

    def __repr__(self) -> str:  # the default would print the whole array
        return (f"VolumeReady(series={self.series}, volume={self.number}, received_at={self.received_at:.3f}, "
                f"source={self.volume.source}, recorded_path={self.recorded_path})")


@dataclass(frozen=True)
class VolumeGap:
    """Volume ``volume`` of ``series`` will not be delivered in order; downstream treats it as missing."""

    series: int
    volume: int
    declared_at: float
    reason: str
    """``"timeout"`` (a later volume waited ``gap_timeout_s``), ``"held_limit"`` (too many volumes held),
    ``"run_ended"`` (a new series began or the assembler closed) or ``"geometry_rejected"``."""


@dataclass(frozen=True)
class LateVolume:
    """A volume that arrived after its slot was declared a gap or after its run ended; reported, not re-inserted."""

    volume: Volume
    received_at: float
    reason: str
    """``"after_gap"``, ``"run_ended"`` or ``"before_first"`` (numbered below the first volume the run delivered)."""
    recorded_path: Path | None = None

    @property
    def series(self) -> int:
        return self.volume.series

    @property
    def number(self) -> int:
        return self.volume.volume

    def __repr__(self) -> str:
        return (f"LateVolume(series={self.series}, volume={self.number}, reason={self.reason!r}, "
                f"received_at={self.received_at:.3f}, source={self.volume.source})")


@dataclass(frozen=True)
class DuplicateDropped:
    """A file that repeats an earlier one; dropped."""

    sop_uid: str
    path: Path | None
    series: int
    volume: int
    first_path: Path | None
    """The file that was kept."""
    reason: str
    """``"same_sop_uid"`` or ``"same_volume_number"`` (different SOPInstanceUID, slot already filled)."""
    at: float


@dataclass(frozen=True)
class GeometryRejected:
    """A volume whose geometry differs from its series' first volume; rejected, its slot becomes a gap."""

    path: Path | None
    series: int
    volume: int
    field: str
    """``"shape"``, ``"affine"`` or ``"tr"``."""
    expected: object
    got: object
    at: float

    def error(self) -> GeometryMismatchError:
        return GeometryMismatchError(self.path, self.field, self.expected, self.got)


@dataclass(frozen=True)
class RunEnded:
    """No more volumes of ``series`` will be delivered."""

    series: int
    at: float
    n_ready: int
    n_gaps: int
    reason: str
    """``"new_series"`` or ``"closed"``."""


SeriesEvent = Union[RunStarted, VolumeReady, VolumeGap, LateVolume, DuplicateDropped, GeometryRejected, RunEnded]


# --- state machine --------------------------------------------------------------------------------------------------


@dataclass
class _Held:
    received_at: float
    volume: Volume | None  # None: rejected for its geometry, the slot only awaits its VolumeGap
    recorded_path: Path | None = None


@dataclass
class _Run:
    series: int
    next_expected: int
    tr: float | None
    shape: tuple | None = None
    affine: np.ndarray | None = None
    held: dict[int, _Held] = field(default_factory=dict)
    filled: set[int] = field(default_factory=set)
    gaps: set[int] = field(default_factory=set)
    n_ready: int = 0


class SeriesAssembler:
    """Order, de-duplicate and check volumes; declare missing ones after a timeout.

    Parameters
    ----------
    gap_timeout_tr:
        A missing volume is declared this many TRs after the first later volume of its series arrived.
    tr_s:
        Repetition time; ``None`` takes it from the first volume of each run that carries one
        (``FALLBACK_TR_S`` if none does).
    first_volume:
        Number of the first volume of a run (Siemens InstanceNumber starts at 1).
    max_held_volumes:
        Most volumes held behind a missing one; past this the missing ones are declared at once.
    geometry_atol_mm:
        Largest change of any affine entry still accepted inside a series.
    """

    def __init__(self, gap_timeout_tr: float = 2.0, tr_s: float | None = None, first_volume: int = 1,
                 max_held_volumes: int = 64, geometry_atol_mm: float = 0.01):
        if gap_timeout_tr <= 0:
            raise ValueError(f"gap_timeout_tr must be positive, got {gap_timeout_tr!r}")
        if tr_s is not None and tr_s <= 0:
            raise ValueError(f"tr_s must be positive, got {tr_s!r}")
        if max_held_volumes < 1:
            raise ValueError(f"max_held_volumes must be >= 1, got {max_held_volumes!r}")
        self.gap_timeout_tr = float(gap_timeout_tr)
        self.tr_s = tr_s
        self.first_volume = int(first_volume)
        self.max_held_volumes = int(max_held_volumes)
        self.geometry_atol_mm = float(geometry_atol_mm)
        self._run: _Run | None = None
        self._ended: set[int] = set()
        self._seen_sops: dict[str, Path | None] = {}
        self._warned_no_tr = False

    @classmethod
    def from_config(cls, config) -> "SeriesAssembler":
        """Build from a :class:`~rt_mindeye.ingest.config.WatcherConfig`."""
        return cls(gap_timeout_tr=config.gap_timeout_tr, tr_s=config.tr_s, first_volume=config.first_volume,
                   max_held_volumes=config.max_held_volumes, geometry_atol_mm=config.geometry_atol_mm)

    # -- read-only state ---------------------------------------------------------------------------------------------

    @property
    def current_series(self) -> int | None:
        return self._run.series if self._run else None

    @property
    def next_expected(self) -> int | None:
        """The volume number the current run waits for."""
        return self._run.next_expected if self._run else None

    @property
    def held(self) -> tuple[int, ...]:
        """Volume numbers received ahead of a missing one, waiting."""
        return tuple(sorted(self._run.held)) if self._run else ()

    @property
    def gap_timeout_s(self) -> float:
        """The current run's gap timeout in seconds."""
        tr = self._run.tr if self._run and self._run.tr else (self.tr_s or FALLBACK_TR_S)
        return self.gap_timeout_tr * tr

    def next_deadline(self) -> float | None:
        """When :meth:`poll` will next have something to decide (``None``: nothing pending)."""
        if not self._run or not self._run.held:
            return None
        return min(h.received_at for h in self._run.held.values()) + self.gap_timeout_s

    # -- input -------------------------------------------------------------------------------------------------------

    def push(self, volume: Volume, now: float, recorded_path: Path | None = None) -> list[SeriesEvent]:
        """Hand over one accepted volume received at ``now``; returns the events it (and the passing time) causes."""
        events = self.poll(now)
        sop = volume.sop_instance_uid
        if sop:  # a file without SOPInstanceUID can only be checked by its volume number, below
            if sop in self._seen_sops:
                events.append(DuplicateDropped(sop, volume.source, volume.series, volume.volume,
                                               self._seen_sops[sop], "same_sop_uid", now))
                return events
            self._seen_sops[sop] = volume.source

        run = self._run
        if run is None or volume.series > run.series:
            if self._ended and volume.series <= max(self._ended):  # closed, or a stale series from an older scan
                events.append(LateVolume(volume, now, "run_ended", recorded_path))
                return events
            if run is not None:
                events.extend(self._end_run(now, "new_series"))
            self._run = run = _Run(volume.series, self.first_volume, self.tr_s)
            events.append(RunStarted(volume.series, now))
        elif volume.series < run.series:
            # An ended run, or a stale series from an earlier scan left in the folder.
            events.append(LateVolume(volume, now, "run_ended", recorded_path))
            return events

        number = volume.volume
        if number < run.next_expected and not run.filled and not run.gaps:
            # Nothing of this run has been delivered yet: the scanner simply counts from a lower number than
            # first_volume (0-based numbering). Start the run there instead of calling the volume late.
            run.next_expected = number
        if number in run.filled or number in run.held:
            first = run.held[number].volume.source if number in run.held and run.held[number].volume else None
            events.append(DuplicateDropped(sop, volume.source, volume.series, number, first,
                                           "same_volume_number", now))
            return events

        rejection = self._check_geometry(run, volume, now)
        if rejection is not None:
            events.append(rejection)
            if number >= run.next_expected:
                run.held[number] = _Held(now, None)
            events.extend(self._release(now))
            return events

        if number < run.next_expected:
            reason = "after_gap" if number in run.gaps else "before_first"
            run.filled.add(number)
            events.append(LateVolume(volume, now, reason, recorded_path))
            return events

        run.held[number] = _Held(now, volume, recorded_path)
        events.extend(self._release(now))
        events.extend(self._enforce_held_limit(now))
        return events

    def poll(self, now: float) -> list[SeriesEvent]:
        """Declare the gaps whose timeout has passed at ``now`` and release the volumes held behind them."""
        events: list[SeriesEvent] = []
        run = self._run
        while run is not None and run.held:
            deadline = self.next_deadline()
            if deadline is None or now < deadline:
                break
            events.extend(self._skip_to_first_held(now, "timeout"))
        return events

    def close(self, now: float) -> list[SeriesEvent]:
        """End the current run: declare what is still missing below held volumes, release them, ``RunEnded``."""
        if self._run is None:
            return []
        return self._end_run(now, "closed")

    # -- internals ---------------------------------------------------------------------------------------------------

    def _run_tr(self, run: _Run, volume: Volume) -> None:
        if run.tr is None:
            if volume.tr:
                run.tr = float(volume.tr)
            elif not self._warned_no_tr:
                self._warned_no_tr = True
                log.warning("series %d: no TR in the configuration or the DICOM; gap timeout uses %.1f s TR",
                            run.series, FALLBACK_TR_S)

    def _check_geometry(self, run: _Run, volume: Volume, now: float) -> GeometryRejected | None:
        shape = tuple(volume.shape)
        affine = np.asarray(volume.affine, dtype=float)
        if run.shape is None:
            run.shape, run.affine = shape, affine
            self._run_tr(run, volume)
            return None
        problem = None
        if shape != run.shape:
            problem = ("shape", run.shape, shape)
        elif not np.allclose(affine, run.affine, rtol=0.0, atol=self.geometry_atol_mm):
            problem = ("affine", np.round(run.affine, 4).tolist(), np.round(affine, 4).tolist())
        elif self.tr_s is None and run.tr and volume.tr and abs(float(volume.tr) - run.tr) > 1e-3:
            problem = ("tr", run.tr, float(volume.tr))
        if problem is None:
            return None
        event = GeometryRejected(volume.source, volume.series, volume.volume, *problem, at=now)
        log.error("%s", event.error())
        return event

    def _release(self, now: float) -> list[SeriesEvent]:
        """Emit every held volume that is next in line."""
        run = self._run
        events: list[SeriesEvent] = []
        while run.next_expected in run.held:
            number = run.next_expected
            held = run.held.pop(number)
            run.filled.add(number)
            if held.volume is None:
                run.gaps.add(number)
                events.append(VolumeGap(run.series, number, now, "geometry_rejected"))
            else:
                run.n_ready += 1
                events.append(VolumeReady(held.volume, held.received_at, held.recorded_path))
            run.next_expected += 1
        return events

    def _skip_to_first_held(self, now: float, reason: str) -> list[SeriesEvent]:
        """Declare every missing volume below the lowest held one, then release from there."""
        run = self._run
        lowest = min(run.held)
        events: list[SeriesEvent] = []
        for number in range(run.next_expected, lowest):
            run.gaps.add(number)
            events.append(VolumeGap(run.series, number, now, reason))
            log.warning("series %d: volume %d missing (%s); run goes on", run.series, number, reason)
        run.next_expected = lowest
        events.extend(self._release(now))
        return events

    def _enforce_held_limit(self, now: float) -> list[SeriesEvent]:
        events: list[SeriesEvent] = []
        while self._run.held and len(self._run.held) > self.max_held_volumes:
            events.extend(self._skip_to_first_held(now, "held_limit"))
        return events

    def _end_run(self, now: float, reason: str) -> list[SeriesEvent]:
        run = self._run
        events: list[SeriesEvent] = []
        while run.held:
            events.extend(self._skip_to_first_held(now, "run_ended"))
        self._ended.add(run.series)
        self._run = None
        events.append(RunEnded(run.series, now, run.n_ready, len(run.gaps), reason))
        return events
