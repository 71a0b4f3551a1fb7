"""Events, trial tables and nuisance regressors (pure functions)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from rt_mindeye.glm.errors import GLMInputError

TRIAL_COLUMNS = ("run", "trial", "onset", "duration", "trial_type")


@dataclass(frozen=True)
class RunEvents:
    """The trials of one run, in onset order: onsets and durations in seconds from the first volume."""

    onsets: np.ndarray
    durations: np.ndarray
    trial_types: tuple[str, ...]

    def __post_init__(self):
        if not (len(self.onsets) == len(self.durations) == len(self.trial_types)):
            raise GLMInputError("events", "onset, duration and trial_type must have the same length")

    def __len__(self) -> int:
        return len(self.onsets)

    @classmethod
    def from_records(cls, records: Iterable[Mapping], *, source: str | None = None,
                     condition_column: str = "trial_type") -> "RunEvents":
        """From rows with ``onset``, ``duration`` and a condition column (BIDS events); sorted by onset.

        The condition (``trial_type`` by default) identifies repeats: trials of the same condition are the same
        image shown again."""
        onsets, durations, types = [], [], []
        for i, row in enumerate(records):
            for key in ("onset", "duration", condition_column):
                if key not in row:
                    raise GLMInputError(f"events row {i}", f"missing column {key!r}", source)
            try:
                onset, duration = float(row["onset"]), float(row["duration"])
            except (TypeError, ValueError) as exc:
                raise GLMInputError(f"events row {i}", f"onset/duration must be numbers ({exc})", source) from exc
            if not np.isfinite(onset) or not np.isfinite(duration) or duration < 0:
                raise GLMInputError(f"events row {i}", f"invalid onset {onset} / duration {duration}", source)
            onsets.append(onset)
            durations.append(duration)
            types.append(str(row[condition_column]))
        order = np.argsort(np.asarray(onsets, dtype=np.float64), kind="stable")
        return cls(np.asarray(onsets, dtype=np.float64)[order], np.asarray(durations, dtype=np.float64)[order],
                   tuple(types[i] for i in order))

    @classmethod
    def from_tsv(cls, path: str | Path, condition_column: str = "trial_type") -> "RunEvents":
        """Read a BIDS ``*_events.tsv``; rows whose condition is empty or 'n/a' are ignored."""
        path = Path(path)
        try:
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t")
                rows = list(reader)
                columns = reader.fieldnames or []
        except OSError as exc:
            raise GLMInputError("events", f"cannot read ({exc.strerror})", str(path)) from exc
        if condition_column not in columns:
            raise GLMInputError("events", f"no column {condition_column!r} (columns: {', '.join(columns)})", str(path))
        rows = [r for r in rows if (r.get(condition_column) or "n/a").strip() not in ("", "n/a")]
        return cls.from_records(rows, source=str(path), condition_column=condition_column)

    @classmethod
    def coerce(cls, events, *, source: str | None = None) -> "RunEvents":
        """Accept a RunEvents, a path to a TSV, a mapping of columns, or a sequence of row mappings."""
        if isinstance(events, RunEvents):
            return events
        if isinstance(events, (str, Path)):
            return cls.from_tsv(events)
        if isinstance(events, Mapping):
            keys = list(events)
            n = len(events[keys[0]]) if keys else 0
            return cls.from_records(({k: events[k][i] for k in keys} for i in range(n)), source=source)
        return cls.from_records(events, source=source)


def frame_times(n_frames: int, tr: float, slice_time_ref: float = 0.0) -> np.ndarray:
    """Time (s) at which each volume is sampled, counted from the start of the run's first volume."""
    return (np.arange(n_frames, dtype=np.float64) + slice_time_ref) * tr


def drift_degree(n_frames: int, tr: float, degree: int | None = None) -> int:
    """GLMsingle's rule: run duration in minutes / 2, rounded with halves up (as MATLAB's and GLMsingle's
    ``alt_round``, not Python's round-half-to-even), unless a degree is given."""
    if degree is not None:
        return int(degree)
    return int(np.floor(n_frames * tr / 60.0 / 2.0 + 0.5))


def polynomial_drift(n_frames: int, degree: int) -> np.ndarray:
    """Legendre polynomials 0..degree over the run, (n_frames, degree + 1), each column unit norm."""
    x = np.linspace(-1.0, 1.0, n_frames) if n_frames > 1 else np.zeros(1)
    columns = np.polynomial.legendre.legvander(x, degree)
    norms = np.linalg.norm(columns, axis=0)
    norms[norms == 0] = 1.0
    return columns / norms


def trial_table(events: Sequence[RunEvents]) -> dict[str, np.ndarray]:
    """The session's trials in output order (run, then onset): columns of :data:`TRIAL_COLUMNS`."""
    runs, trials, onsets, durations, types = [], [], [], [], []
    for r, ev in enumerate(events):
        runs.extend([r] * len(ev))
        trials.extend(range(len(ev)))
        onsets.extend(ev.onsets)
        durations.extend(ev.durations)
        types.extend(ev.trial_types)
    return {"run": np.asarray(runs, dtype=np.int64), "trial": np.asarray(trials, dtype=np.int64),
            "onset": np.asarray(onsets, dtype=np.float64), "duration": np.asarray(durations, dtype=np.float64),
            "trial_type": np.asarray(types, dtype=object)}


def write_trials_tsv(path: str | Path, trials: Mapping[str, np.ndarray]) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TRIAL_COLUMNS)
        for i in range(len(trials["run"])):
            writer.writerow([int(trials["run"][i]), int(trials["trial"][i]), f"{trials['onset'][i]:.6g}",
                             f"{trials['duration'][i]:.6g}", trials["trial_type"][i]])


def read_trials_tsv(path: str | Path) -> dict[str, np.ndarray]:
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {"run": np.asarray([int(r["run"]) for r in rows], dtype=np.int64),
            "trial": np.asarray([int(r["trial"]) for r in rows], dtype=np.int64),
            "onset": np.asarray([float(r["onset"]) for r in rows]),
            "duration": np.asarray([float(r["duration"]) for r in rows]),
            "trial_type": np.asarray([r["trial_type"] for r in rows], dtype=object)}


def orthonormal_basis(columns: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """Orthonormal basis (n_frames, rank) of the span of ``columns``, keeping their order (Gram-Schmidt via QR)."""
    if columns.shape[1] == 0:
        return np.zeros((columns.shape[0], 0))
    q, r = np.linalg.qr(columns)
    keep = np.abs(np.diag(r)) > rcond * max(1.0, np.abs(np.diag(r)).max())
    return q[:, keep]
