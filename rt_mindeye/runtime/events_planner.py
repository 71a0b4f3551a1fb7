"""The scanner host's run plans from the planned BIDS events files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EventsPlanner:
    """Run plans from the planned BIDS events files (``run-XX_events.tsv``, XX = run ordinal in the session)."""

    def __init__(self, events_dir: Path, first_live_run: int):
        self.events_dir = Path(events_dir)
        self.first_live_run = first_live_run

    def __call__(self, series: int, ordinal: int):
        from rt_mindeye.calibration.workflow import find_events, read_event_rows
        from rt_mindeye.glm.design import RunEvents
        from rt_mindeye.runtime.scanner import RunPlan

        run = self.first_live_run + ordinal - 1
        path = find_events(self.events_dir, run)
        rows = read_event_rows(path)
        events = RunEvents.from_tsv(path)
        # RunEvents sorts by onset; keep the stimulus files in the same order.
        order = np.argsort([float(r["onset"]) for r in rows], kind="stable")
        stim = tuple(str(rows[i].get("stim_file") or "") for i in order)
        return RunPlan(run=run, events=events, stim_files=stim)
