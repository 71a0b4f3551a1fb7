"""The scanner host's run plans from the planned BIDS events files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EventsPlanner:
    """Run plans from the planned BIDS events files (``run-XX_events.tsv``, XX = run ordinal in the session).

    Without an events folder every run starts with no planned trial: its design comes entirely from the stimulus
    computer's reports (:mod:`rt_mindeye.runtime.live_events`).
    """

    def __init__(self, events_dir: Path | None, first_live_run: int):
        self.events_dir = None if events_dir is None else Path(events_dir)
        self.first_live_run = first_live_run

    def __call__(self, series: int, ordinal: int):
        from rt_mindeye.calibration.workflow import find_events, read_event_rows
        from rt_mindeye.glm.design import RunEvents
        from rt_mindeye.runtime.scanner import RunPlan

        run = self.first_live_run + ordinal - 1
        if self.events_dir is None:
            return RunPlan(run=run, events=RunEvents.coerce([]))
        path = find_events(self.events_dir, run)
        events = RunEvents.from_tsv(path)
        # RunEvents drops rows without a condition and sorts by onset; keep the other columns in the same order.
        rows = [r for r in read_event_rows(path) if (r.get("trial_type") or "n/a").strip() not in ("", "n/a")]
        order = np.argsort([float(r["onset"]) for r in rows], kind="stable")
        stim = tuple(str(rows[i].get("stim_file") or "") for i in order)
        numbers = tuple(_trial_number(rows[i].get("trial")) for i in order)
        return RunPlan(run=run, events=events, stim_files=stim, trial_numbers=numbers)


def _trial_number(text: str | None) -> int | None:
    try:
        return int(float(text)) if text not in (None, "", "n/a") else None
    except ValueError:
        return None
