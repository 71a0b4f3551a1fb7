"""The scanner-host pipeline: watcher events in, volume status and trial estimates out.

:class:`ScannerPipeline` holds no sockets and no threads, so a test drives it event by event; the scanner service
(:mod:`rt_mindeye.runtime.scanner_service`) feeds it from a :class:`~rt_mindeye.ingest.watcher.FolderWatcher`, journals and
sends what it returns. Per volume: rigid motion correction to the calibration reference, masking to the decoder's
voxels, and the real-time GLM update, which yields any trial estimates that volume completes.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rt_mindeye.glm.realtime import RealtimeGLM, TrialEstimate
from rt_mindeye.ingest.series import LateVolume, RunEnded, RunStarted, VolumeGap, VolumeReady
from rt_mindeye.preprocess.motion import MotionCorrector, RigidTransform, align_reference
from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.timing import volume_epoch
from rt_mindeye.transport.messages import Message, TrialBetas, VolumeStatus
from rt_mindeye.volume import Volume

log = logging.getLogger("rt_mindeye.scanner")

MOTION_COLUMNS = ("volume", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg", "fd_mm", "gap")


@dataclass(frozen=True)
class RunPlan:
    """What the scanner host knows about a run before it starts."""

    run: int
    events: object
    """Anything :class:`rt_mindeye.glm.design.RunEvents` accepts (events TSV path, rows)."""
    stim_files: tuple[str, ...] = ()
    """Stimulus file of each trial in onset order (sent with the betas so the console can show what was seen)."""
    n_volumes: int | None = None


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
    align_session_start:
        Register the reference to the first volume with :func:`~rt_mindeye.preprocess.motion.align_reference`
        and start motion correction from that pose: the calibration was made on another day, with the head elsewhere
        in the scanner and the images differing in contrast and distortion, and the careful mutual-information fit
        gives the fast intensity-based real-time registration a start it can trust. Every volume is still resampled
        into the reference grid, so the calibration's masks apply unchanged.
    """

    def __init__(self, *, reference: Volume, mask: np.ndarray, glm: RealtimeGLM, motion: MotionCorrector,
                 planner: RunPlanner, session: str, first_volume: int = 1, motion_dir: Path | None = None,
                 wall_clock: Callable[[], float] = time.time, align_session_start: bool = False):
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
        if isinstance(event, LateVolume):
            log.warning("late volume %s of series %s (%s): recorded, not analysed", event.number, event.series,
                        event.reason)
        return []

    @property
    def run_active(self) -> bool:
        return self._run is not None

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
        self._run = _RunState(plan=plan, series=series, first_volume=self.first_volume)
        log.info("run %d started (series %d)", plan.run, series)
        return out

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
        stage_ms.update(motion=(t1 - t0) * 1e3, glm=(t2 - t1) * 1e3)
        fd = float(result.fd_mm)
        params = tuple(float(p) for p in result.params)
        run.motion_rows.append((volume.volume, *params, fd, 0))
        self.timings.append({"run": run.plan.run, "volume": volume.volume, "acquired": acquired,
                             "received": received_at, "done": self.wall_clock(), **stage_ms})
        rad = params[:3] + tuple(math.radians(p) for p in params[3:])
        status = VolumeStatus(session=self.session, run=run.plan.run, volume=volume.volume,
                              acquisition_time=acquired, received_at=received_at, motion=rad, fd=fd,
                              stage_ms=stage_ms)
        return [status, *(self._trial_message(run.plan, e, acquired) for e in estimates)]

    def _gap(self, series: int, number: int) -> list[Message]:
        run = self._run
        if run is None or run.series != series:
            return []
        run.motion_rows.append((number, *([math.nan] * 7), 1))
        estimates = [] if run.error else self.glm.add_gap(number - run.first_volume)
        now = self.wall_clock()
        status = VolumeStatus(session=self.session, run=run.plan.run, volume=number, acquisition_time=now,
                              received_at=now, gap=True, missing=(number,))
        return [status, *(self._trial_message(run.plan, e, now) for e in estimates)]

    def _end_run(self, series: int) -> list[Message]:
        run = self._run
        if run is None or run.series != series:
            return []
        self._run = None
        estimates = [] if run.error else self.glm.end_run(n_volumes=run.plan.n_volumes)
        self._write_motion(run)
        now = self.wall_clock()
        log.info("run %d ended: %d final estimates", run.plan.run, len(estimates))
        return [self._trial_message(run.plan, e, now) for e in estimates]

    # --- helpers -------------------------------------------------------------------------------------------------
    def _trial_message(self, plan: RunPlan, estimate: TrialEstimate, acquired: float) -> TrialBetas:
        stim = None
        if estimate.trial < len(plan.stim_files):
            stim = plan.stim_files[estimate.trial] or None
        return TrialBetas(session=self.session, run=estimate.run, trial=estimate.trial,
                          trial_type=str(estimate.trial_type), onset=float(estimate.onset),
                          estimate_kind=estimate.kind, estimate_version=int(estimate.n_volumes),
                          n_volumes=int(estimate.n_volumes), acquisition_time=float(acquired),
                          betas=np.ascontiguousarray(estimate.betas, dtype=np.float32), stim_file=stim)

    def _acquired_epoch(self, volume: Volume) -> float:
        """POSIX acquisition time of ``volume`` (DICOM AcquisitionDate/Time); receipt time when absent."""
        acquired = volume_epoch(volume)
        return self.wall_clock() if acquired is None else acquired

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
