"""Live stimulus events drive a run's design: the plan reconciled with what the stimulus computer reports.

The planned events file says what should be shown; the stimulus computer
(:class:`~rt_mindeye.transport.stimulus_client.StimulusClient`) reports what was shown and when. For each run,
:class:`LiveRunDesign` keeps both and says which trials the GLM should model now:

* a reported trial that matches a planned one takes its reported onset, duration and type, and keeps the planned
  trial's id (its position in the plan, onset order, as when only the plan is used), so estimates already sent under
  that id are refined, never doubled;
* a reported trial that matches none (shown but not planned: a repeat, an extra, a participant-paced design without
  a plan) gets a new id after the planned ones, in the order the reports arrive;
* a planned trial that the reports have gone past (a later planned trial was reported) was not shown and leaves the
  design; when the run ends, so does every planned trial never reported;
* a planned trial not reported yet keeps its planned onset until its report comes.

A report matches the earliest unmatched planned trial with the same stimulus file (file name only; without one, the
same trial number as the plan's ``trial`` column, else its position) that comes after the last matched one, else the
earliest unmatched one before it (a report that arrives out of order). The match is decided when the report first
arrives and never revisited, so ids stay stable; a re-sent report of the same trial number only updates its onset.

Onsets are seconds from the start of the run's first volume (the GLM's clock). A report on the ``trigger`` clock is
already that: the stimulus computer's trigger is the first volume's start. A report on the ``scanner`` clock (POSIX
seconds) is placed with the run's anchor, the acquisition time of its first volume.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import PurePath
from typing import Sequence

import numpy as np

from rt_mindeye.glm.design import RunEvents
from rt_mindeye.transport.messages import StimulusEvent

PLANNED = "planned"        # in the plan, not reported (yet)
REPORTED = "reported"      # in the plan and reported: the reported onset is used
UNPLANNED = "unplanned"    # reported, not in the plan
NOT_SHOWN = "not_shown"    # in the plan, never reported: out of the design


@dataclass(frozen=True)
class TriggerSeen:
    """The stimulus computer's trigger message for ``run`` reached the scanner host at ``received_at`` (POSIX s)."""

    run: int
    received_at: float


@dataclass(frozen=True)
class DesignTrial:
    """One trial of a run's design and where its timing comes from."""

    id: int
    onset: float
    duration: float
    trial_type: str
    stim_file: str
    source: str                       # PLANNED, REPORTED, UNPLANNED or NOT_SHOWN
    planned_onset: float | None = None
    reported_onset: float | None = None


@dataclass(frozen=True)
class Disagreement:
    """Something in the reports that the plan did not say: ``kind`` is ``onset`` (a trial shown ``offset_s`` later
    than planned), ``unplanned`` (shown, not planned), ``not_shown`` (planned, not shown) or ``late`` (a trial taken
    for not shown was reported after all)."""

    kind: str
    trial: int
    detail: str
    offset_s: float = math.nan


def _stem(stim_file: str) -> str:
    return PurePath(stim_file.replace("\\", "/")).name if stim_file else ""


class LiveRunDesign:
    """The design of one run: the plan, the reports so far, and the trials to model (see the module docstring).

    ``plan``: the planned trials in onset order (or None); ``stim_files`` and ``trial_numbers`` per planned trial (the
    events file's ``stim_file`` and ``trial`` columns; empty when absent); ``onset_tolerance_s``: a reported onset
    further from the planned one than this is a disagreement.
    """

    def __init__(self, run: int, plan: RunEvents | None, stim_files: Sequence[str] = (),
                 trial_numbers: Sequence[int | None] = (), *, onset_tolerance_s: float = 0.5):
        self.run = run
        self.onset_tolerance_s = onset_tolerance_s
        plan = plan if plan is not None else RunEvents.coerce([])
        self._planned = [DesignTrial(id=i, onset=float(plan.onsets[i]), duration=float(plan.durations[i]),
                                     trial_type=plan.trial_types[i],
                                     stim_file=stim_files[i] if i < len(stim_files) else "", source=PLANNED,
                                     planned_onset=float(plan.onsets[i]))
                         for i in range(len(plan))]
        self._planned_keys = []
        for i, trial in enumerate(self._planned):
            number = trial_numbers[i] if i < len(trial_numbers) and trial_numbers[i] is not None else i
            self._planned_keys.append(_stem(trial.stim_file) or f"#{number}")
        self._matched: dict[int, int] = {}        # reported trial number -> design id
        self._reports: dict[int, DesignTrial] = {}  # design id -> the trial as reported
        self._next_unplanned = len(self._planned)
        self._last_matched = -1
        self._passed: set[int] = set()            # planned ids already announced as not shown
        self.live = False
        """True once the stimulus computer has reported anything for this run (a trigger or a trial)."""

    @property
    def n_planned(self) -> int:
        return len(self._planned)

    def report(self, event: StimulusEvent, onset: float) -> list[Disagreement]:
        """Record a reported trial whose onset, on the run's clock, is ``onset``; returns the disagreements it
        shows (an onset away from the plan, a trial not planned, planned trials it went past)."""
        self.live = True
        key = _stem(event.stim_file) or f"#{event.trial}"
        design_id = self._matched.get(event.trial)
        if design_id is None:
            design_id = self._match(key)
            self._matched[event.trial] = design_id
        planned = self._planned[design_id] if design_id < len(self._planned) else None
        self._reports[design_id] = DesignTrial(
            id=design_id, onset=float(onset), duration=float(event.duration),
            trial_type=event.trial_type or (planned.trial_type if planned else ""),
            stim_file=event.stim_file or (planned.stim_file if planned else ""),
            source=REPORTED if planned else UNPLANNED, planned_onset=planned.onset if planned else None,
            reported_onset=float(onset))
        out = []
        if design_id in self._passed:  # its report came after later trials' reports: back in the design
            self._passed.discard(design_id)
            out.append(Disagreement("late", design_id, f"reported after later trials (onset {onset:.2f} s): back in "
                                                       "the design"))
        if planned is None and self._planned:  # with no plan at all, nothing disagrees
            what = event.stim_file or event.trial_type
            out.append(Disagreement(UNPLANNED, design_id, f"reported trial {event.trial} ({what}) at {onset:.2f} s "
                                                          "was not planned: it gets estimates of its own"))
        elif planned is not None and abs(onset - planned.onset) > self.onset_tolerance_s:
            out.append(Disagreement("onset", design_id, f"shown at {onset:.2f} s, planned at {planned.onset:.2f} s",
                                    offset_s=onset - planned.onset))
        return out + self._newly_passed(final=False)

    def trial_of(self, reported_trial: int) -> int:
        """The design id a reported trial number was matched to."""
        return self._matched[reported_trial]

    def _match(self, key: str) -> int:
        free = [i for i, k in enumerate(self._planned_keys) if k == key and i not in self._reports]
        after = [i for i in free if i > self._last_matched]
        if after or free:
            chosen = (after or free)[0]
            self._last_matched = max(self._last_matched, chosen)
            return chosen
        chosen = self._next_unplanned
        self._next_unplanned += 1
        return chosen

    def _newly_passed(self, final: bool) -> list[Disagreement]:
        out = []
        for trial in self._planned:
            if trial.id in self._reports or trial.id in self._passed:
                continue
            if final or trial.id < self._last_matched:
                self._passed.add(trial.id)
                what = trial.stim_file or trial.trial_type
                until = "" if final else " until its report comes"
                out.append(Disagreement(NOT_SHOWN, trial.id, f"planned at {trial.onset:.2f} s ({what}) and not "
                                                             f"reported: left out of the design{until}"))
        return out

    def finish(self) -> list[Disagreement]:
        """The run ended: planned trials never reported were not shown (only when the stimulus computer reported
        anything for the run; otherwise the plan stands)."""
        return self._newly_passed(final=True) if self.live else []

    def trials(self) -> list[DesignTrial]:
        """Every trial, reported or planned, with its status (NOT_SHOWN ones included), in onset order."""
        out = []
        for trial in self._planned:
            if trial.id in self._reports:
                out.append(self._reports[trial.id])
            elif trial.id in self._passed:
                out.append(dataclasses.replace(trial, source=NOT_SHOWN))
            else:
                out.append(trial)
        out.extend(t for i, t in self._reports.items() if i >= len(self._planned))
        return sorted(out, key=lambda t: (t.onset, t.id))

    def design(self) -> tuple[RunEvents, list[DesignTrial]]:
        """The trials to model now (everything but NOT_SHOWN), in onset order, as events and as trials."""
        modelled = [t for t in self.trials() if t.source != NOT_SHOWN]
        events = RunEvents(onsets=np.asarray([t.onset for t in modelled], dtype=np.float64),
                           durations=np.asarray([t.duration for t in modelled], dtype=np.float64),
                           trial_types=tuple(t.trial_type for t in modelled))
        return events, modelled
