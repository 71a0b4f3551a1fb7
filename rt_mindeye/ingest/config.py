"""Configuration of the export-folder watcher (section ``watcher`` of a session YAML).

Every field is declared with :func:`rt_mindeye.config.setting`, so a typo or an out-of-range value in the YAML fails
at load time with a :class:`~rt_mindeye.errors.ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.config import setting

DEFAULT_PATTERN = "001_{series:06d}_{volume:06d}.dcm"

# The only fields a file name pattern may contain; each becomes one named group of digits.
PATTERN_FIELDS = ("series", "volume", "session")


def compile_pattern(pattern: str) -> re.Pattern:
    """Turn a ``str.format`` style file name pattern into an anchored regular expression.

    ``001_{series:06d}_{volume:06d}.dcm`` becomes ``001_(?P<series>\\d{6,})_(?P<volume>\\d{6,})\\.dcm``: a zero-padded
    width is the minimum number of digits (the scanner widens the field past 999999 rather than wrapping), a plain
    ``{series}`` accepts any number of digits. Literal text is matched exactly. Raises ``ValueError`` naming the
    problem for a field other than series/volume/session, a non-integer format, or a pattern without both
    ``series`` and ``volume``.
    """
    parts = []
    seen = set()
    for literal, name, spec, conversion in string.Formatter().parse(pattern):
        parts.append(re.escape(literal))
        if name is None:
            continue
        if name not in PATTERN_FIELDS:
            raise ValueError(f"pattern {pattern!r}: unknown field {{{name}}} (allowed: {', '.join(PATTERN_FIELDS)})")
        if name in seen:
            raise ValueError(f"pattern {pattern!r}: field {{{name}}} appears twice")
        if conversion:
            raise ValueError(f"pattern {pattern!r}: field {{{name}}} must not use a !conversion")
        spec = spec or ""
        match = re.fullmatch(r"0?(\d*)d?", spec)
        if match is None:
            raise ValueError(f"pattern {pattern!r}: field {{{name}:{spec}}} must be an integer format such as 06d")
        width = int(match.group(1)) if match.group(1) else 1
        seen.add(name)
        parts.append(f"(?P<{name}>\\d{{{width},}})")
    for required in ("series", "volume"):
        if required not in seen:
            raise ValueError(f"pattern {pattern!r}: needs a {{{required}}} field")
    return re.compile("".join(parts) + r"\Z")


def parse_name(regex: re.Pattern, name: str) -> tuple[int, int] | None:
    """(series, volume) encoded in a file name, or ``None`` when the name does not match the pattern."""
    match = regex.match(name)
    if match is None:
        return None
    return int(match.group("series")), int(match.group("volume"))


@dataclass(frozen=True)
class WatcherConfig:
    pattern: str = setting(DEFAULT_PATTERN, "file name pattern of the scanner export (str.format fields "
                           "series, volume and optionally session; zero-padded widths are minimum digit counts)")
    observer: str = setting("native", "native: inotify/FSEvents/ReadDirectoryChanges via watchdog; polling: "
                            "watchdog's PollingObserver (SMB/NFS shares, where native events are not delivered)",
                            choices=("native", "polling"))
    poll_interval_s: float = setting(0.1, "seconds between directory snapshots of the polling observer",
                                     min=0.005, max=10.0)
    rescan_interval_s: float = setting(1.0, "seconds between full rescans of the folder (safety net for lost "
                                       "events and a dead observer, which is restarted)", min=0.01, max=60.0)
    complete_retry_s: float = setting(0.05, "seconds between completeness checks of a file that is still being "
                                      "written", min=0.001, max=5.0)
    complete_timeout_s: float = setting(10.0, "a file still incomplete this long after it was first seen is "
                                        "reported as an IngestError (and checked again if it changes later)",
                                        min=0.01, max=600.0)
    gap_timeout_tr: float = setting(2.0, "a missing volume is declared (VolumeGap) this many TRs after a later "
                                    "volume of the same series arrived", min=0.1, max=100.0)
    tr_s: float | None = setting(None, "repetition time in seconds; None takes RepetitionTime from the DICOM",
                                 min=0.01, max=60.0)
    record_dir: Path | None = setting(None, "session folder: every accepted raw DICOM is copied to "
                                      "<record_dir>/sourcedata/dicom/ before it is passed on; None records nothing")
    first_volume: int = setting(1, "number of the first volume of a run as the scanner counts it "
                                "(Siemens InstanceNumber starts at 1)", min=0)
    max_held_volumes: int = setting(64, "most out-of-order volumes held while waiting for an earlier one; beyond "
                                    "this the wait ends at once and the missing volumes are declared", min=1)
    geometry_atol_mm: float = setting(0.01, "largest change of any affine entry (mm) still accepted as the same "
                                      "geometry inside a series", min=0.0)
    existing_files: str = setting("process", "files already in the folder when the watcher starts: process "
                                  "(restart after a crash loses nothing) or ignore (stale runs)",
                                  choices=("process", "ignore"))
    stop_timeout_s: float = setting(5.0, "longest wait for the worker and observer threads on stop()",
                                    min=0.1, max=120.0)

    def __post_init__(self) -> None:
        # Compile once here so a bad pattern fails at load time (from_mapping turns ValueError into ConfigError).
        object.__setattr__(self, "_regex", compile_pattern(self.pattern))

    @property
    def regex(self) -> re.Pattern:
        """The compiled, anchored file name pattern."""
        return self._regex  # type: ignore[attr-defined]

    def parse_name(self, name: str) -> tuple[int, int] | None:
        """(series, volume) from a file name, or ``None`` if it is not an export file."""
        return parse_name(self.regex, name)

    def format_name(self, series: int, volume: int, session: int = 1) -> str:
        """The file name the scanner gives to ``series``/``volume`` (used by the emulator)."""
        return self.pattern.format(series=series, volume=volume, session=session)
