"""Clocks and latency bookkeeping.

Latency in rt-mindeye is measured from the volume's *acquisition* time (DICOM AcquisitionDate/Time), never from the
moment a file was noticed. Scanner clocks give wall time of day; :func:`acquisition_epoch` turns a DICOM date and
time into POSIX seconds so that it can be compared with ``time.time()`` on a host whose clock is in step.
"""

from __future__ import annotations

import datetime as _dt
import time


def dicom_time_to_seconds(value: str) -> float:
    """Seconds since midnight for a DICOM TM value (``HHMMSS.FFFFFF``, fields after HH optional)."""
    value = value.strip()
    if not value:
        raise ValueError("empty DICOM time")
    hours = int(value[0:2])
    minutes = int(value[2:4]) if len(value) >= 4 else 0
    seconds = float(value[4:]) if len(value) > 4 else 0.0
    return hours * 3600.0 + minutes * 60.0 + seconds


def acquisition_epoch(date: str | None, time_of_day: str) -> float:
    """POSIX seconds (local time zone of this host) for a DICOM DA + TM pair; without a date, today's."""
    return epoch_from_seconds(date, dicom_time_to_seconds(time_of_day))


def volume_epoch(volume) -> float | None:
    """POSIX acquisition time of a :class:`~rt_mindeye.volume.Volume` (None when it has no AcquisitionTime)."""
    if volume.acquisition_time is None:
        return None
    header = volume.header or {}
    return epoch_from_seconds(header.get("AcquisitionDate") or header.get("StudyDate"), volume.acquisition_time)


def epoch_from_seconds(date: str | None, seconds: float) -> float:
    """POSIX seconds for a DICOM date (or today) plus ``seconds`` since its midnight, local time."""
    if date:
        day = _dt.datetime.strptime(date.strip()[:8], "%Y%m%d")
    else:
        day = _dt.datetime.combine(_dt.date.today(), _dt.time())
    return time.mktime(day.timetuple()) + seconds


def monotonic() -> float:
    """The clock every in-process deadline uses."""
    return time.monotonic()


class Deadline:
    """A wait with a bound: ``Deadline(2.0).expired`` turns true two seconds after creation."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds

    @property
    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = Deadline(timeout_s)
    while not predicate():
        if deadline.expired:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def percentiles(values) -> dict:
    """``{"p50", "p99", "n"}`` of the finite values (None when there are none): how latencies are reported."""
    import numpy as np

    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not array.size:
        return {"p50": None, "p99": None, "n": 0}
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)), "n": int(array.size)}
