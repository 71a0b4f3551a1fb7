"""Errors of the single-trial GLM stage."""

from __future__ import annotations

from rt_mindeye.errors import RtMindEyeError


class GLMInputError(RtMindEyeError, ValueError):
    """An input to the GLM (data, events, TR, mask, motion) is invalid; names the input and, if any, the file."""

    def __init__(self, field: str, problem: str, path: str | None = None):
        self.field = field
        self.problem = problem
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{field}: {problem}")


class RealtimeStateError(RtMindEyeError):
    """The real-time estimator was driven out of order (e.g. add_volume before start_run)."""


class GLMWarning(UserWarning):
    """The fit ran, but not as asked or not as well as it could (no repeats for cross-validation, trials too close to
    a run's end, a run without motion parameters): the message says what was done instead."""
