"""The scanner-host pipeline: watcher events and stimulus reports in, volume status and trial estimates out.

:class:`ScannerPipeline` holds no sockets and no threads, so a test drives it event by event; the scanner service
(:mod:`rt_mindeye.runtime.scanner_service`) feeds it from a :class:`~rt_mindeye.ingest.watcher.FolderWatcher` and the
stimulus computer's reports, journals and sends what it returns. Per volume: rigid motion correction to the
calibration reference, masking to the decoder's voxels, and the real-time GLM update, which yields any trial
estimates that volume completes. Per report of a shown stimulus: the run's design is reconciled with the plan
(:mod:`rt_mindeye.runtime.live_events`) and the GLM revised, which yields the estimates the report changed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rt_mindeye.glm.realtime import RealtimeGLM, TrialEstimate
from rt_mindeye.ingest.series import LateVolume, RunEnded, RunStarted, VolumeGap, VolumeReady
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.preprocess.gating import gated, trial_fd_max
from rt_mindeye.preprocess.motion import MotionCorrector, RigidTransform, align_reference
from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.runtime.live_events import NOT_SHOWN, DesignTrial, Disagreement, LiveRunDesign, TriggerSeen
from rt_mindeye.timing import volume_epoch
from rt_mindeye.transport.messages import DesignNotice, Message, StimulusEvent, TrialBetas, VolumeStatus
from rt_mindeye.volume import Volume

log = logging.getLogger("rt_mindeye.scanner")

MOTION_COLUMNS = ("volume", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg", "fd_mm", "gap")
EVENTS_COLUMNS = ("onset", "duration", "trial_type", "stim_file", "trial", "source", "planned_onset",
                  "reported_onset")
MAX_EARLY_REPORTS = 10_000  # reports kept for runs that have not started (a bound, not an expected number)


@dataclass(frozen=True)
class RunPlan:
    """What the scanner host knows about a run before it starts."""

    run: int
    events: object
    """Anything :class:`rt_mindeye.glm.design.RunEvents` accepts (events TSV path, rows)."""
    stim_files: tuple[str, ...] = ()
    """Stimulus file of each trial in onset order (sent with the betas so the console can show what was seen)."""
    n_volumes: int | None = None
    trial_numbers: tuple[int | None, ...] = ()
    """The events file's ``trial`` column in onset order (how a stimulus report without a file names its trial)."""


RunPlanner = Callable[[int, int], RunPlan]
"""``planner(series, ordinal)``: the plan of the ``ordinal``-th run (1-based) of the session, numbered ``series``."""


@dataclass
class _RunState:
    plan: RunPlan
    series: int
    first_volume: int
    motion_rows: list[tuple] = field(default_factory=list)
    trials_sent: int = 0
    error: str | None = None
    """Why the run is recorded and motion-corrected but not analysed (e.g. its events file is unusable)."""
    design: LiveRunDesign | None = None
    ids: list[int] = field(default_factory=list)
    """The trial id of each GLM trial index (the GLM numbers trials by onset; ids never change)."""
    trials: dict[int, DesignTrial] = field(default_factory=dict)
    anchor: float | None = None
    """POSIX time of the run's time 0 on the scanner's clock (its first volume's acquisition time)."""
    trigger_at: float | None = None
    """When the stimulus computer's trigger message reached this host (POSIX s)."""
    clock_reported: bool = False
    unplaced: list = field(default_factory=list)
    """Reports on the scanner clock that wait for the anchor."""
    sent: set = field(default_factory=set)
    last_acquired: float | None = None
    notices: list = field(default_factory=list)
    fd: list = field(default_factory=list)
    """Framewise displacement per volume index of the run (NaN: missing)."""


class ScannerPipeline:
    """Turn :mod:`rt_mindeye.ingest.series` events into :class:`VolumeStatus` and :class:`TrialBetas` messages.

    Parameters
    ----------
    reference, mask:
        The calibration reference volume and the decoder's boolean voxel mask on its grid.
    glm:
        A :class:`RealtimeGLM` built from the bundle's frozen calibration.
    motion:
        An unfitted :class:`MotionCorrector`; it is fitted on ``reference`` before the first volume.
    planner:
        Gives each new run's plan (run number, events).
    session:
        The session id carried by every message.
    first_volume:
        Number of a run's first volume as the scanner counts it (GLM indices are relative to it).
    motion_dir:
        Where ``run-XX_motion.tsv`` is written as each run ends (None: not written).
    func_dir, design_dir:
        Where ``run-XX_events.tsv`` (the events the run was analysed with) and ``run-XX_design.json`` (plan against
        reports, the measured clock offset, the disagreements) are written as each run ends (None: not written).
    onset_tolerance_s:
        A reported onset further than this from the planned one is a disagreement (logged, on the console).
    align_session_start:
        Register the reference to the first volume with :func:`~rt_mindeye.preprocess.motion.align_reference`
        and start motion correction from that pose: the calibration was made on another day, with the head elsewhere
        in the scanner and the images differing in contrast and distortion, and the careful mutual-information fit
        gives the fast intensity-based real-time registration a start it can trust. Every volume is still resampled
        into the reference grid, so the calibration's masks apply unchanged.
    """

    def __init__(self, *, reference: Volume, mask: np.ndarray, glm: RealtimeGLM, motion: MotionCorrector,
                 planner: RunPlanner, session: str, first_volume: int = 1, motion_dir: Path | None = None,
                 wall_clock: Callable[[], float] = time.time, align_session_start: bool = False,
                 func_dir: Path | None = None, design_dir: Path | None = None, onset_tolerance_s: float = 0.5):
        self.reference = reference
        self.mask = np.asarray(mask, dtype=bool)
        self.glm = glm
        self.motion = motion
        self.planner = planner
        self.session = session
        self.first_volume = first_volume
        self.motion_dir = motion_dir
        self.wall_clock = wall_clock
        self.align_session_start = align_session_start
        self.func_dir = func_dir
        self.design_dir = design_dir
        self.onset_tolerance_s = onset_tolerance_s
        self._early_reports: list = []  # reports and triggers for runs that have not started
        self._last_run: int | None = None
        self.session_transform: RigidTransform | None = None  # reference head -> today's head, once aligned
        self._run: _RunState | None = None
        self._runs_started = 0
        self._fitted = False
        self.timings: list[dict] = []
        self.run_errors: list[tuple[int, str]] = []

    # --- events --------------------------------------------------------------------------------------------------
    def handle(self, event) -> list[Message]:
        if isinstance(event, RunStarted):
            return self._start_run(event.series)
        if isinstance(event, VolumeReady):
            return self._volume(event.volume, event.received_at)
        if isinstance(event, VolumeGap):
            return self._gap(event.series, event.volume)
        if isinstance(event, RunEnded):
            return self._end_run(event.series)
        if isinstance(event, (StimulusEvent, TriggerSeen)):
            return self._stimulus(event)
        if isinstance(event, LateVolume):
            log.warning("late volume %s of series %s (%s): recorded, not analysed", event.number, event.series,
                        event.reason)
        return []

    @property
    def run_active(self) -> bool:
        return self._run is not None

    @property
    def active_series(self) -> int | None:
        """Series number of the run in progress (None between runs)."""
        return None if self._run is None else self._run.series

    def end_current_run(self) -> list[Message]:
        """End the run in progress (the scanner stopped sending): its final estimates, or nothing."""
        return self._end_run(self._run.series) if self._run is not None else []

    def _start_run(self, series: int) -> list[Message]:
        if self._run is not None:  # a new series without RunEnded: close the previous run first
            out = self._end_run(self._run.series)
        else:
            out = []
        self._runs_started += 1
        try:
            plan = self.planner(series, self._runs_started)
            self.glm.start_run(plan.events, run=plan.run, n_volumes=plan.n_volumes)
        except RtMindEyeError as exc:
            # The volumes are still recorded and motion-corrected; only the betas of this run are lost.
            run = getattr(self.planner, "first_live_run", 1) + self._runs_started - 1
            self._run = _RunState(plan=RunPlan(run=run, events=None), series=series, first_volume=self.first_volume,
                                  error=str(exc))
            self.run_errors.append((run, str(exc)))
            log.error("run %d (series %d) cannot be analysed, volumes are still recorded: %s", run, series, exc)
            return out
        design = LiveRunDesign(plan.run, self.glm.events_, plan.stim_files, plan.trial_numbers,
                               onset_tolerance_s=self.onset_tolerance_s)
        self._run = _RunState(plan=plan, series=series, first_volume=self.first_volume, design=design,
                              ids=list(range(len(self.glm.events_))), trials={t.id: t for t in design.trials()})
        log.info("run %d started (series %d)", plan.run, series)
        waiting = [m for m in self._early_reports if m.run == plan.run]
        self._early_reports = [m for m in self._early_reports if m.run > plan.run]
        for message in waiting:
            out += self._stimulus(message)
        return out

    def use_calibration(self, *, reference: Volume, mask: np.ndarray, glm: RealtimeGLM,
                        align_session_start: bool = False) -> None:
        """Between runs, continue with another calibration bundle's reference, voxels and frozen GLM (a reload).

        Motion correction is refitted on the new reference at the next volume; run numbering goes on.
        """
        if self._run is not None:
            raise RuntimeError(f"run {self._run.plan.run} is in progress: a bundle changes between runs only")
        self.reference = reference
        self.mask = np.asarray(mask, dtype=bool)
        self.glm = glm
        self.align_session_start = align_session_start
        self.session_transform = None
        self._fitted = False

    def warm_up(self) -> float:
        """Fit the motion corrector and run one registration on the reference, so the first live volume does not
        pay for compiling the kernels. Returns the seconds it took."""
        began = time.perf_counter()
        self._ensure_fitted()
        self.motion.update(self.reference)
        self.motion.reset()
        return time.perf_counter() - began

    def _ensure_fitted(self) -> None:
        if not self._fitted:
            self.motion.fit(self.reference, voxel_mask=self.mask)
            self._fitted = True

    def _volume(self, volume: Volume, received_at: float) -> list[Message]:
        if self._run is None or self._run.series != volume.series:
            self._start_run(volume.series)
        run = self._run
        self._ensure_fitted()
        stage_ms = {}
        if self.align_session_start and self.session_transform is None:
            began = time.perf_counter()
            self.session_transform = align_reference(self.reference, volume)
            self.motion.reset(self.session_transform)
            stage_ms["align"] = (time.perf_counter() - began) * 1e3
            shift = np.linalg.norm(self.session_transform.params[:3])
            log.info("calibration reference aligned to today's first volume in %.1f s: %.1f mm, rotation %s deg",
                     stage_ms["align"] / 1e3, shift, np.round(self.session_transform.params[3:], 2).tolist())
        t0 = time.perf_counter()
        result = self.motion.update(volume)
        t1 = time.perf_counter()
        vector = result.voxels  # resampled at the mask's voxels only (see MotionConfig.full_reslice)
        index = volume.volume - run.first_volume
        estimates = [] if run.error else self.glm.add_volume(index, vector, motion_params=result.params)
        t2 = time.perf_counter()
        acquired = self._acquired_epoch(volume)
        run.last_acquired = acquired
        placed = []
        if run.anchor is None and not run.error:
            run.anchor = acquired - index * self.glm.tr_
            placed = self._clock_notice(run) + self._place_waiting(run)
        stage_ms.update(motion=(t1 - t0) * 1e3, glm=(t2 - t1) * 1e3)
        fd = float(result.fd_mm)
        params = tuple(float(p) for p in result.params)
        run.motion_rows.append((volume.volume, *params, fd, 0))
        self._record_fd(run, index, fd)
        self.timings.append({"run": run.plan.run, "volume": volume.volume, "acquired": acquired,
                             "received": received_at, "done": self.wall_clock(), **stage_ms})
        rad = params[:3] + tuple(math.radians(p) for p in params[3:])
        status = VolumeStatus(session=self.session, run=run.plan.run, volume=volume.volume,
                              acquisition_time=acquired, received_at=received_at, motion=rad, fd=fd,
                              stage_ms=stage_ms)
        return [status, *(self._trial_message(run, e, acquired) for e in estimates), *placed]

    def _gap(self, series: int, number: int) -> list[Message]:
        run = self._run
        if run is None or run.series != series:
            return []
        run.motion_rows.append((number, *([math.nan] * 7), 1))
        self._record_fd(run, number - run.first_volume, math.nan)
        estimates = [] if run.error else self.glm.add_gap(number - run.first_volume)
        now = self.wall_clock()
        status = VolumeStatus(session=self.session, run=run.plan.run, volume=number, acquisition_time=now,
                              received_at=now, gap=True, missing=(number,))
        return [status, *(self._trial_message(run, e, now) for e in estimates)]

    def _end_run(self, series: int) -> list[Message]:
        run = self._run
        if run is None or run.series != series:
            return []
        self._run = None
        self._last_run = run.plan.run
        out: list[Message] = []
        estimates = []
        if not run.error:
            out += [self._notice(run, d) for d in run.design.finish()]
            self._revise(run, send=False)  # the final estimates of every trial follow at once
            if len(self.glm.events_):
                estimates = self.glm.end_run(n_volumes=run.plan.n_volumes)
            self._write_events(run)
        self._write_motion(run)
        now = self.wall_clock()
        log.info("run %d ended: %d final estimates", run.plan.run, len(estimates))
        lacked = self.glm.not_acquired_counts() if not run.error else np.zeros(0)
        if lacked.any():
            log.warning("run %d: %d of %d mask voxels were outside the imaged slab in some volumes (the head moved "
                        "them out, up to %d volumes); their estimates use the volumes that had them",
                        run.plan.run, int((lacked > 0).sum()), lacked.size, int(lacked.max()))
        return out + [self._trial_message(run, e, now) for e in estimates]

    # --- live stimulus events ------------------------------------------------------------------------------------
    def _stimulus(self, message) -> list[Message]:
        """A report of a shown stimulus (:class:`StimulusEvent`) or of the trigger (:class:`TriggerSeen`)."""
        run = self._run
        if run is None or message.run != run.plan.run:
            upcoming = (run.plan.run if run is not None else self._last_run) or 0
            if message.run > upcoming or (run is None and self._last_run is None):
                if len(self._early_reports) < MAX_EARLY_REPORTS:
                    self._early_reports.append(message)
                return []
            what = "trigger" if isinstance(message, TriggerSeen) else f"report of trial {message.trial}"
            detail = f"{what} for run {message.run}, which is not in progress: ignored"
            log.warning("stimulus: %s", detail)
            return [DesignNotice(session=self.session, run=message.run, kind="stray", detail=detail)]
        if run.error:
            return []
        run.design.live = True
        if isinstance(message, TriggerSeen):
            if run.trigger_at is None:
                run.trigger_at = message.received_at
            return self._clock_notice(run)
        if message.clock == "scanner" and run.anchor is None:
            run.unplaced.append(message)
            return []
        return self._report(run, message)

    def _report(self, run: _RunState, event: StimulusEvent) -> list[Message]:
        onset = event.onset - run.anchor if event.clock == "scanner" else event.onset
        out: list[Message] = [self._notice(run, d) for d in run.design.report(event, onset)]
        out += self._revise(run)
        trial = run.design.trial_of(event.trial)
        out.append(dataclasses.replace(event, trial=trial, onset=float(onset), clock="trigger"))  # for the console
        if run.trigger_at is None and not run.clock_reported and run.anchor is not None:
            out += self._clock_notice(run)
        return out

    def _place_waiting(self, run: _RunState) -> list[Message]:
        waiting, run.unplaced = run.unplaced, []
        out: list[Message] = []
        for event in waiting:
            out += self._report(run, event)
        return out

    def _clock_notice(self, run: _RunState) -> list[Message]:
        """Once per run, when its first volume and its trigger (or its first report) are known: the offset between
        the stimulus computer's trigger arriving here and the first volume's acquisition on the scanner's clock."""
        if run.clock_reported or run.anchor is None or not run.design.live:
            return []
        run.clock_reported = True
        if run.trigger_at is None:
            return [self._notice(run, Disagreement("clock", -1, "no trigger message from the stimulus computer: "
                                                                "reported onsets are taken from the first volume"))]
        offset = run.trigger_at - run.anchor
        return [self._notice(run, Disagreement("clock", -1, f"trigger reached the scanner host {offset * 1e3:+.0f} ms "
                                                            "after the first volume's acquisition time",
                                               offset_s=offset))]

    def _revise(self, run: _RunState, send: bool = True) -> list[Message]:
        """Give the GLM the design the plan and the reports say now; the estimates that changed, as messages."""
        events, modelled = run.design.design()
        ids = [t.id for t in modelled]
        timing = [(t.onset, t.duration) for t in modelled]
        if ids == run.ids and timing == [(run.trials[i].onset, run.trials[i].duration) for i in run.ids]:
            run.trials.update({t.id: t for t in modelled})
            return []
        position = {trial_id: n for n, trial_id in enumerate(run.ids)}
        estimates = self.glm.revise_events(events, origin=[position.get(i, -1) for i in ids])
        run.ids = ids
        run.trials = {t.id: t for t in run.design.trials()}
        if not send:
            return []
        acquired = run.last_acquired if run.last_acquired is not None else self.wall_clock()
        out: list[Message] = [self._trial_message(run, e, acquired) for e in estimates]
        refitted = sorted(run.ids[e.trial] for e in estimates if e.kind == "revised")
        if refitted:
            out.append(self._notice(run, Disagreement("refit", -1, f"{len(refitted)} trial(s) re-estimated with the "
                                                                   f"reported events: {refitted}")))
        return out

    def _notice(self, run: _RunState, d: Disagreement) -> DesignNotice:
        detail = d.detail
        if d.kind == NOT_SHOWN and d.trial in run.sent:
            detail += "; the estimates sent for it are withdrawn"
        log.log(logging.INFO if d.kind in ("clock", "refit") else logging.WARNING, "run %d trial %s: %s: %s",
                run.plan.run, d.trial, d.kind, detail)
        run.notices.append({"kind": d.kind, "trial": d.trial, "offset_s": None if math.isnan(d.offset_s)
                            else d.offset_s, "detail": detail})
        return DesignNotice(session=self.session, run=run.plan.run, kind=d.kind, trial=d.trial, offset_s=d.offset_s,
                            detail=detail)

    # --- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _record_fd(run: _RunState, index: int, fd: float) -> None:
        if index >= 0:
            run.fd.extend([math.nan] * (index + 1 - len(run.fd)))
            run.fd[index] = fd

    def _trial_message(self, run: _RunState, estimate: TrialEstimate, acquired: float) -> TrialBetas:
        trial = run.ids[estimate.trial]
        stim = run.trials[trial].stim_file or None
        run.sent.add(trial)
        motion = getattr(self.motion, "config_", None) or MotionConfig()
        fd_max = float(trial_fd_max([estimate.onset], run.fd, self.glm.tr_, motion.gate_window_s,
                                    last_volume=estimate.last_volume)[0])
        return TrialBetas(session=self.session, run=estimate.run, trial=trial,
                          fd_max_mm=fd_max, motion_gated=bool(gated(fd_max, motion.gate_fd_mm)),
                          trial_type=str(estimate.trial_type), onset=float(estimate.onset),
                          estimate_kind=estimate.kind, estimate_version=int(estimate.n_volumes),
                          n_volumes=int(estimate.n_volumes), acquisition_time=float(acquired),
                          betas=np.ascontiguousarray(estimate.betas, dtype=np.float32), stim_file=stim)

    def _acquired_epoch(self, volume: Volume) -> float:
        """POSIX acquisition time of ``volume`` (DICOM AcquisitionDate/Time); receipt time when absent."""
        acquired = volume_epoch(volume)
        return self.wall_clock() if acquired is None else acquired

    def _write_events(self, run: _RunState) -> None:
        """The events the run was analysed with (BIDS TSV) and its design record: plan, reports, clock, notices."""
        trials = run.design.trials()
        if self.func_dir is not None:
            self.func_dir.mkdir(parents=True, exist_ok=True)
            with (self.func_dir / f"run-{run.plan.run:02d}_events.tsv").open("w", newline="") as handle:
                writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
                writer.writerow(EVENTS_COLUMNS)
                for t in trials:
                    if t.source != NOT_SHOWN:
                        writer.writerow([f"{t.onset:.4f}", f"{t.duration:.4f}", t.trial_type, t.stim_file, t.id,
                                         t.source, _number(t.planned_onset), _number(t.reported_onset)])
        if self.design_dir is not None:
            self.design_dir.mkdir(parents=True, exist_ok=True)
            record = {"run": run.plan.run, "live": run.design.live, "anchor": run.anchor,
                      "trigger_received_at": run.trigger_at,
                      "clock_offset_s": (run.trigger_at - run.anchor) if run.trigger_at and run.anchor else None,
                      "trials": [dataclasses.asdict(t) for t in trials], "notices": run.notices}
            (self.design_dir / f"run-{run.plan.run:02d}_design.json").write_text(json.dumps(record, indent=1))

    def _write_motion(self, run: _RunState) -> None:
        if self.motion_dir is None:
            return
        self.motion_dir.mkdir(parents=True, exist_ok=True)
        path = self.motion_dir / f"run-{run.plan.run:02d}_motion.tsv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(MOTION_COLUMNS)
            for row in sorted(run.motion_rows, key=lambda r: r[0]):
                writer.writerow(["n/a" if isinstance(v, float) and math.isnan(v) else v for v in row])


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
