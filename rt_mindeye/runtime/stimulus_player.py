"""The stimulus computer of a replayed session, played through the stimulus API (demo, tests, benchmarks).

:class:`StimulusPlayer` does what a PsychoPy experiment does with :class:`~rt_mindeye.transport.stimulus_client.
StimulusClient` (see ``docs/examples/psychopy_stimulus.py``): it marks each run's trigger, reports every planned
stimulus when it is "shown" (at its onset on the replay's accelerated clock) and receives the decoder's feedback for
each trial. It follows the scanner emulator: hand :meth:`on_volume` to :meth:`ScannerEmulator.run` as
``on_progress`` and a run's trigger is the acquisition start of its first volume.

Trials are numbered as the real-time GLM numbers them: 0, 1, ... in onset order within the run. Each stimulus
"appears" exactly at its planned onset (scan seconds after the trigger; wall seconds x ``speed`` on the replay), and
its report goes out when that moment has passed, as a PsychoPy experiment reports the time of its flip: a report that
is sent late (a busy machine) is late, not wrong.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.transport.stimulus_client import FeedbackItem, StimulusClient

log = logging.getLogger("rt_mindeye.stimulus")


@dataclass(frozen=True)
class PlannedStimulus:
    run: int
    trial: int
    onset: float
    duration: float
    trial_type: str
    stim_file: str


def planned_stimuli(events_dir: Path, run: int) -> list[PlannedStimulus]:
    """The planned trials of ``run`` (``run-XX_events.tsv``), numbered in onset order as the GLM numbers them."""
    from rt_mindeye.calibration.workflow import find_events, read_event_rows

    rows = read_event_rows(find_events(events_dir, run))
    rows = sorted(rows, key=lambda r: float(r["onset"]))  # stable: ties keep file order, as RunEvents does
    return [PlannedStimulus(run, j, float(r["onset"]), float(r.get("duration") or 0.0), str(r.get("trial_type", "")),
                            Path(str(r.get("stim_file") or "")).name) for j, r in enumerate(rows)]


class StimulusPlayer:
    """Plays the planned runs ``runs`` (series number -> run number) through a :class:`StimulusClient`.

    ``tr``/``speed`` are the replay's; ``feedback_state`` keeps the last acknowledged feedback across
    :meth:`disconnect` / :meth:`reconnect` (a stimulus program restarted mid-session).
    """

    def __init__(self, stimulus_endpoint: str, feedback_endpoint: str | None, *, session: str, events_dir: Path,
                 runs: dict[int, int], tr: float, speed: float, feedback_state: Path | None = None,
                 heartbeat_interval_s: float = 0.5):
        self.stimulus_endpoint = stimulus_endpoint
        self.feedback_endpoint = feedback_endpoint
        self.session = session
        self.runs = dict(runs)
        self.tr = tr
        self.speed = speed
        self.feedback_state = str(feedback_state) if feedback_state is not None else None
        self.heartbeat_interval_s = heartbeat_interval_s
        self.plans = {run: planned_stimuli(events_dir, run) for run in self.runs.values()}
        self.sent: list[PlannedStimulus] = []
        self.triggers: dict[int, float] = {}
        self._received: list[FeedbackItem] = []  # from clients that were closed
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[tuple[float, PlannedStimulus]] = []
        self._stop = threading.Event()
        self._client = self._open()
        self._thread = threading.Thread(target=self._play, name="stimulus-player", daemon=True)
        self._thread.start()

    def _open(self) -> StimulusClient:
        return StimulusClient(self.stimulus_endpoint, session=self.session, clock=time.time,
                              feedback_endpoint=self.feedback_endpoint, feedback_state=self.feedback_state,
                              heartbeat_interval_s=self.heartbeat_interval_s)

    # --- the emulator's progress callback -------------------------------------------------------------------------

    def on_volume(self, send, done: int, total: int) -> None:
        """A volume file is complete in the export folder; the first of a planned series starts its run."""
        run = self.runs.get(send.series)
        if run is None or run in self.triggers:
            return
        step = self.tr / self.speed
        trigger = time.time() - step  # the volume was acquired during the TR before it was written
        with self._wake:
            self.triggers[run] = trigger
            if self._client is not None:
                self._client.trigger(run=run, t=trigger)
            for stim in self.plans[run]:
                self._queue.append((trigger + stim.onset / self.speed, stim))
            self._queue.sort(key=lambda item: item[0])
            self._wake.notify_all()

    # --- the experiment loop ----------------------------------------------------------------------------------------

    def _play(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if not self._queue or self._client is None:  # nothing due, or the program is down: events wait
                    self._wake.wait(0.1)
                    continue
                due, stim = self._queue[0]
                wait = due - time.time()
                if wait > 0:
                    self._wake.wait(min(wait, 0.1))
                    continue
                self._queue.pop(0)
                self._client.event(run=stim.run, trial=stim.trial, onset=stim.onset, duration=stim.duration,
                                   trial_type=stim.trial_type, stim_file=stim.stim_file)
                self.sent.append(stim)

    # --- faults ---------------------------------------------------------------------------------------------------

    def disconnect(self) -> None:
        """The stimulus program goes away (crash, restart, network): its client is closed at once."""
        with self._wake:
            self._received.extend(self._client.feedback_received if self.feedback_endpoint else [])
            self._client.close(timeout_s=0.0)
            self._client = None

    def reconnect(self) -> None:
        """The stimulus program comes back (with its feedback state file, if it has one)."""
        with self._wake:
            self._client = self._open()
            for run, trigger in self.triggers.items():  # its restarted program knows the runs it started
                self._client.trigger(run=run, t=trigger)
            self._wake.notify_all()

    # --- results --------------------------------------------------------------------------------------------------

    @property
    def feedback(self) -> list[FeedbackItem]:
        """Every feedback received, by every client this player opened, in arrival order."""
        with self._wake:
            current = self._client.feedback_received if self._client is not None and self.feedback_endpoint else []
            return self._received + current

    def expected_trials(self) -> list[tuple[int, int]]:
        return [(s.run, s.trial) for run in sorted(self.plans) for s in self.plans[run]]

    def wait_feedback(self, trials: set[tuple[int, int]], timeout_s: float) -> bool:
        """Wait (bounded) until every trial in ``trials`` has its feedback."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if trials <= {(f.run, f.trial) for f in self.feedback}:
                return True
            time.sleep(0.05)
        return trials <= {(f.run, f.trial) for f in self.feedback}

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop playing; wait (bounded) for the scanner host's acknowledgement of the events; True if all came."""
        self._stop.set()
        self._thread.join(timeout_s)
        with self._wake:
            if self._client is None:
                return True
            self._received.extend(self._client.feedback_received if self.feedback_endpoint else [])
            acknowledged = self._client.close(timeout_s)
            self._client = None
            return acknowledged
