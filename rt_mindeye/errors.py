"""Exception hierarchy of rt-mindeye.

Every error the software raises on purpose derives from :class:`RtMindEyeError` and carries the file, field or
endpoint it is about, so that the command line can print one actionable line instead of a traceback. Stage packages
may define more specific subclasses next to their code; they must derive from one of the classes here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class RtMindEyeError(Exception):
    """Root of every deliberate rt-mindeye error."""


class NotFittedError(RtMindEyeError):
    """An estimator was used before ``fit``."""

    def __init__(self, estimator: object):
        self.estimator = type(estimator).__name__
        super().__init__(f"{self.estimator} is not fitted yet: call fit() before using it")


class ConfigError(RtMindEyeError):
    """A configuration file or value is invalid; names the file and the dotted key."""

    def __init__(self, source: str | Path | None, key: str, problem: str):
        self.source = str(source) if source is not None else "<config>"
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: {key}: {problem}")


# --- ingest -------------------------------------------------------------------------------------------------------


class DicomError(RtMindEyeError):
    """Base of DICOM input problems; always names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DicomReadError(DicomError):
    """The file is not a DICOM rt-mindeye can read, or a required field is missing or malformed."""

    def __init__(self, path: str | Path, problem: str, field: str | None = None):
        self.field = field
        super().__init__(path, f"{problem} (field {field})" if field else problem)


class UnsupportedDicomError(DicomReadError):
    """A valid DICOM of a kind rt-mindeye does not convert (e.g. a localizer or a compressed transfer syntax)."""


class IncompleteVolumeError(DicomError):
    """The file is still being written (or was truncated): fewer pixel bytes than the header promises."""

    def __init__(self, path: str | Path, expected_bytes: int, got_bytes: int):
        self.expected_bytes = expected_bytes
        self.got_bytes = got_bytes
        super().__init__(path, f"incomplete: pixel data has {got_bytes} of {expected_bytes} bytes")


class GeometryMismatchError(RtMindEyeError):
    """A volume's geometry differs from the rest of its series."""

    def __init__(self, path: str | Path | None, field: str, expected: object, got: object):
        self.path = Path(path) if path is not None else None
        self.field = field
        self.expected = expected
        self.got = got
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}geometry changed inside the series: {field} was {expected}, now {got}")


# --- models and checkpoints ---------------------------------------------------------------------------------------


class CheckpointError(RtMindEyeError):
    """A checkpoint cannot be read or is not of a known layout."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path if self.path else '<state dict>'}: {problem}")


class CheckpointKeyError(CheckpointError):
    """A checkpoint's keys do not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(
        self,
        path: str | Path | None,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {', '.join(self.missing[:8])}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {', '.join(self.unexpected[:8])}")
        if self.mismatched:
            shown = ", ".join(f"{k} {tuple(want)} != {tuple(got)}" for k, want, got in self.mismatched[:8])
            parts.append(f"{len(self.mismatched)} mis-shaped key(s): {shown}")
        super().__init__(path, "; ".join(parts) or "keys do not fit")


# --- transport ----------------------------------------------------------------------------------------------------


class MessageError(RtMindEyeError):
    """A transport message is malformed; names the offending field."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"message field {field}: {problem}")


class TransportTimeout(RtMindEyeError):
    """A peer did not answer within its deadline."""

    def __init__(self, endpoint: str, waited_s: float):
        self.endpoint = endpoint
        self.waited_s = waited_s
        super().__init__(f"no answer from {endpoint} within {waited_s:.1f} s")


# --- sessions -----------------------------------------------------------------------------------------------------


class SessionError(RtMindEyeError):
    """A session folder, events file or calibration bundle is unusable; names the path."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class BundleMismatchError(SessionError):
    """A calibration bundle was made for another subject or geometry."""
