"""Watch the scanner's export folder and turn its files into an ordered, checked stream of volumes.

:class:`FolderWatcher` combines three sources of "a file may be ready" so that no file is ever missed:

1. a watchdog observer (inotify and friends, or ``PollingObserver`` for SMB/NFS shares where native events never
   arrive) reporting close-after-write, rename-into-place, creation and modification;
2. a periodic rescan of the folder, which finds files whose events were lost (inotify queue overflow, a share
   outage) and, at the same time, checks that the observer and its emitter threads are alive, restarting them if
   not (watchdog's polling observer has been seen to die silently after a share outage);
3. a retry timer for files that were found but were not complete yet.

Each candidate file (matching the export name pattern) goes through, in one worker thread: the completeness check
of :func:`~rt_mindeye.ingest.dicom.read_volume` (an incomplete file is retried every ``complete_retry_s`` until
complete, or reported as an :class:`IngestError` after ``complete_timeout_s``; never a crash) -> decoding -> the
recorder (the raw file is
copied into the session folder *before* anything is emitted) -> :class:`~rt_mindeye.ingest.series.SeriesAssembler`,
whose events (``RunStarted``, ``VolumeReady``, ``VolumeGap``, ``LateVolume``, ``DuplicateDropped``,
``GeometryRejected``, ``RunEnded``) are handed to ``on_event`` or queued for :meth:`FolderWatcher.get`.

Every wait in here has a bound: the worker sleeps at most until its next deadline (and never more than
``MAX_IDLE_S``), and :meth:`FolderWatcher.stop` joins threads with ``stop_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from rt_mindeye.errors import (
    ConfigError,
    DicomReadError,
    IncompleteVolumeError,
    RtMindEyeError,
    SessionError,
)
from rt_mindeye.ingest.config import WatcherConfig
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.ingest.recorder import DicomRecorder
from rt_mindeye.ingest.series import SeriesAssembler, SeriesEvent
from rt_mindeye.volume import Volume

log = logging.getLogger(__name__)

# Longest the worker sleeps with nothing to do, so that stop() and health checks are always prompt.
MAX_IDLE_S = 0.1

# Event types the observer is asked for; its own reads of the files (opened/closed-no-write) are noise.
_OBSERVED_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent]


class IngestTimeout(RtMindEyeError):
    """:meth:`FolderWatcher.wait_for` did not see the awaited event in time."""

    def __init__(self, folder: Path, waited_s: float, what: str, seen: list | None = None):
        self.folder = folder
        self.waited_s = waited_s
        self.what = what
        self.seen = list(seen or [])
        """Every event received while waiting, so that a caller that catches this loses nothing."""
        super().__init__(f"{folder}: no {what} within {waited_s:.1f} s")


# --- events of the watcher itself -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestError:
    """A file could not be turned into a volume; the watcher goes on.

    ``kind``: ``"incomplete"`` (still incomplete after ``complete_timeout_s``; checked again if it changes),
    ``"unreadable"`` (not a DICOM rt-mindeye can read), ``"record_failed"`` (the volume was still passed on, but its
    copy in the session folder could not be written) or ``"internal"`` (a bug; logged with its traceback).
    """

    path: Path
    kind: str
    error: Exception
    at: float

    @property
    def message(self) -> str:
        return str(self.error)


@dataclass(frozen=True)
class ObserverRestarted:
    """The file system observer had died (or could not be started) and was started again."""

    reason: str
    restarts: int
    at: float


WatcherEvent = Union[SeriesEvent, IngestError, ObserverRestarted]

# Event fields that hold a time; FolderWatcher moves them onto its ``clock``.
_TIME_FIELDS = ("at", "received_at", "declared_at")


def event_record(event: WatcherEvent) -> dict:
    """A JSON-ready summary of an event, without pixel data: for logs, the console and the session record.

    ``{"event": "VolumeReady", "series": 13, "volume": 5, "sop_uid": ..., "source": ..., "received_at": ...}``;
    errors become their message plus ``error_type``.
    """
    record: dict = {"event": type(event).__name__}
    for item in dataclasses.fields(event):
        value = getattr(event, item.name)
        if isinstance(value, Volume):
            record.update(series=value.series, volume=value.volume, sop_uid=value.sop_instance_uid,
                          source=str(value.source) if value.source else None,
                          acquisition_time=value.acquisition_time)
        elif isinstance(value, BaseException):
            record[item.name] = str(value)
            record["error_type"] = type(value).__name__
        else:
            record[item.name] = _plain(value)
    return record


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return repr(value)


@dataclass
class WatcherStats:
    """Counters for the console and the tests (a snapshot; read from any thread)."""

    candidates: int = 0
    accepted: int = 0
    retries: int = 0
    errors: int = 0
    found_by_rescan: int = 0
    observer_restarts: int = 0
    rescans: int = 0


@dataclass
class _FileState:
    status: str  # "pending", "done", "failed", "ignored"
    signature: tuple[int, int] | None
    first_seen: float
    next_try: float
    attempts: int = 0


class _Handler(FileSystemEventHandler):
    """Forward the names of files that may have become ready to the worker's inbox."""

    def __init__(self, inbox: queue.SimpleQueue, folder: Path, config: WatcherConfig):
        self._inbox = inbox
        self._folder = folder
        self._config = config

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            path, kind = event.dest_path, "moved"
        elif isinstance(event, FileClosedEvent):
            path, kind = event.src_path, "closed"
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            path, kind = event.src_path, "changed"
        else:
            return
        path = Path(os.fsdecode(path))
        if path.parent != self._folder or self._config.parse_name(path.name) is None:
            return
        self._inbox.put((path.name, kind))


class FolderWatcher:
    """Watch ``folder`` for scanner export files and emit ordered, checked volume events.

    Parameters
    ----------
    folder:
        The export folder (the scanner share).
    config:
        A :class:`~rt_mindeye.ingest.config.WatcherConfig`.
    on_event:
        Called from the worker thread with each event. When ``None``, events are queued for :meth:`get`,
        :meth:`drain` and :meth:`events` instead.
    clock:
        The clock of the times in the events (``at``, ``received_at``, ``declared_at``): ``time.monotonic`` by
        default, ``time.time`` to compare them with DICOM acquisition times. Deadlines (retries, gap timeouts,
        rescans) always run on ``time.monotonic``, so a wall clock that jumps cannot stall or hurry them.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, folder: str | Path, config: WatcherConfig | None = None,
                 on_event: Callable[[WatcherEvent], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.folder = Path(folder)
        self.config = config if config is not None else WatcherConfig()
        self.on_event = on_event
        self.clock = clock
        self.stats = WatcherStats()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._files: dict[str, _FileState] = {}
        self._pending: set[str] = set()  # names whose status is "pending" (kept apart: a session has thousands)
        self._assembler = SeriesAssembler.from_config(self.config)
        self._recorder: DicomRecorder | None = None
        self._observer = None
        self._worker: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._folder_unavailable = False
        self._observed_identity: tuple[int, int] | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------------

    def start(self) -> "FolderWatcher":
        """Check the folder, start the observer and the worker thread."""
        if self._worker is not None:
            raise RuntimeError("FolderWatcher.start() called twice")
        if not self.folder.is_dir():
            raise ConfigError(None, "watcher.folder", f"export folder {self.folder} does not exist")
        if self.config.record_dir is not None:
            record_dir = Path(self.config.record_dir).resolve()
            if record_dir == self.folder.resolve():
                raise ConfigError(None, "watcher.record_dir", "must not be the export folder itself")
            self._recorder = DicomRecorder(record_dir)
        if self.config.existing_files == "ignore":
            now = time.monotonic()
            for name, signature in self._list_folder().items():
                self._files[name] = _FileState("ignored", signature, now, now)
            log.info("%s: ignoring %d files already there", self.folder, len(self._files))
        self._start_observer()
        # The first scan runs here, in the caller's thread: files already there when start() returns are known, and
        # anything written after it is the observer's (or a later rescan's) to find.
        self._rescan(time.monotonic())
        self._worker = threading.Thread(target=self._work, name=f"folder-watcher:{self.folder.name}", daemon=True)
        self._worker.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching: pending events are processed once more, the run is closed (``RunEnded``), threads joined."""
        timeout = self.config.stop_timeout_s if timeout is None else timeout
        self._stop_requested.set()
        # The worker goes first: it owns observer restarts, so once it has ended nothing can start a new observer.
        if self._worker is not None:
            self._worker.join(timeout / 2)
            if self._worker.is_alive():
                log.error("%s: watcher worker did not stop within %.1f s", self.folder, timeout / 2)
        self._stop_observer(timeout / 2)

    def __enter__(self) -> "FolderWatcher":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    # -- pull API ------------------------------------------------------------------------------------------------------

    def get(self, timeout: float) -> WatcherEvent | None:
        """The next event, waiting at most ``timeout`` seconds (``None`` if none came)."""
        try:
            return self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def drain(self) -> list[WatcherEvent]:
        """Every event queued now, without waiting."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def events(self, idle_timeout: float) -> Iterator[WatcherEvent]:
        """Yield events until none arrives for ``idle_timeout`` seconds."""
        while True:
            event = self.get(idle_timeout)
            if event is None:
                return
            yield event

    def wait_for(self, predicate: Callable[[WatcherEvent], bool], timeout: float,
                 what: str = "matching event") -> list[WatcherEvent]:
        """All events up to and including the first one for which ``predicate`` is true.

        Raises :class:`IngestTimeout` after ``timeout`` seconds; the events seen so far are on the exception
        (``seen``), so a caller loses nothing.
        """
        end = time.monotonic() + timeout
        seen: list[WatcherEvent] = []
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise IngestTimeout(self.folder, timeout, what, seen)
            event = self.get(min(remaining, MAX_IDLE_S))
            if event is None:
                continue
            seen.append(event)
            if predicate(event):
                return seen

    # -- observer ------------------------------------------------------------------------------------------------------

    def _folder_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the folder, or None while it is unreachable."""
        try:
            stat = os.stat(self.folder)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def _start_observer(self) -> bool:
        identity = self._folder_identity()
        if self.config.observer == "polling":
            observer = PollingObserver(timeout=self.config.poll_interval_s)
        else:
            observer = Observer(timeout=MAX_IDLE_S)
        observer.daemon = True
        handler = _Handler(self._inbox, self.folder.resolve(), self.config)
        try:
            observer.schedule(handler, str(self.folder.resolve()), recursive=False, event_filter=_OBSERVED_EVENTS)
            observer.start()
        except OSError as exc:  # the share is gone: the rescan keeps trying
            log.warning("%s: cannot start the %s observer: %s", self.folder, self.config.observer, exc)
            self._observer = None
            return False
        self._observer = observer
        # An observer watches the folder it was given (an inode); if the share is remounted or the folder
        # recreated, the path points at another folder and the observer must be replaced.
        self._observed_identity = identity
        return True

    def _stop_observer(self, timeout: float) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout)
        except (OSError, RuntimeError) as exc:  # a dead observer may fail to stop cleanly; it is dropped anyway
            log.debug("%s: stopping the observer: %s", self.folder, exc)

    def _observer_problem(self) -> str | None:
        observer = self._observer
        if observer is None:
            return "not running"
        if not observer.is_alive():
            return "observer thread died"
        emitters = list(observer.emitters)
        if not emitters:
            return "no folder scheduled"
        if not all(emitter.is_alive() for emitter in emitters):
            return "emitter thread died"
        if self._folder_identity() != self._observed_identity:
            return "folder replaced (share remounted or folder recreated)"
        return None

    def _check_observer(self, now: float) -> list[WatcherEvent]:
        if self._stop_requested.is_set() or self._folder_identity() is None:
            return []  # an unreachable folder is reported by the rescan; the observer is restarted once it is back
        problem = self._observer_problem()
        if problem is None:
            return []
        self._stop_observer(MAX_IDLE_S)
        if not self._start_observer():
            return []
        self.stats.observer_restarts += 1
        log.warning("%s: %s observer restarted (%s)", self.folder, self.config.observer, problem)
        return [ObserverRestarted(problem, self.stats.observer_restarts, now)]

    # -- worker --------------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        next_rescan = time.monotonic() + self.config.rescan_interval_s
        while not self._stop_requested.is_set():
            try:
                next_rescan = self._work_once(next_rescan)
            except Exception as exc:  # the worker must outlive any bug: report it, pause briefly, go on
                log.exception("%s: watcher worker error", self.folder)
                self.stats.errors += 1
                self._emit([IngestError(self.folder, "internal", exc, time.monotonic())])
                self._stop_requested.wait(MAX_IDLE_S)
        # Final pass: what arrived before stop() is still processed once, then the run is closed.
        try:
            self._drain_inbox()
            self._rescan(time.monotonic())
            self._process_due(time.monotonic(), final=True)
        except Exception as exc:  # still close the run below
            log.exception("%s: watcher error in the final pass", self.folder)
            self._emit([IngestError(self.folder, "internal", exc, time.monotonic())])
        self._emit(self._assembler.close(time.monotonic()))

    def _work_once(self, next_rescan: float) -> float:
        """One turn of the worker: wait for a file event or the next deadline, then act; returns the next rescan."""
        now = time.monotonic()
        gap_deadline = self._assembler.next_deadline()
        wake = min(next_rescan, self._next_retry(), now + MAX_IDLE_S,
                   gap_deadline if gap_deadline is not None else float("inf"))
        try:
            name, kind = self._inbox.get(timeout=max(0.0, wake - now))
            self._candidate(name, kind, time.monotonic(), from_rescan=False)
            self._drain_inbox()
        except queue.Empty:
            pass
        now = time.monotonic()
        if now >= next_rescan:
            self._emit(self._check_observer(now))
            self._rescan(now)
            next_rescan = now + self.config.rescan_interval_s
        self._process_due(time.monotonic())
        self._emit(self._assembler.poll(time.monotonic()))
        return next_rescan

    def _drain_inbox(self) -> None:
        while True:
            try:
                name, kind = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._candidate(name, kind, time.monotonic(), from_rescan=False)

    def _list_folder(self) -> dict[str, tuple[int, int]]:
        """Name -> (size, mtime_ns) of every export file in the folder ({} while the folder is unreachable)."""
        found = {}
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if self.config.parse_name(entry.name) is None:
                        continue
                    try:
                        if not entry.is_file():
                            continue
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    found[entry.name] = (stat.st_size, stat.st_mtime_ns)
        except OSError as exc:
            if not self._folder_unavailable:
                log.error("%s: export folder unreachable (%s); retrying every %.1f s", self.folder, exc,
                          self.config.rescan_interval_s)
            self._folder_unavailable = True
            return {}
        if self._folder_unavailable:
            log.warning("%s: export folder reachable again", self.folder)
            self._folder_unavailable = False
        return found

    def _rescan(self, now: float) -> None:
        self.stats.rescans += 1
        for name, signature in self._list_folder().items():
            self._candidate(name, "rescan", now, from_rescan=True, signature=signature)

    def _candidate(self, name: str, kind: str, now: float, *, from_rescan: bool,
                   signature: tuple[int, int] | None = None) -> None:
        """A file that may be new, or may have changed."""
        if signature is None:
            try:
                stat = os.stat(self.folder / name)
            except OSError:
                return  # gone again (a temporary name, a deleted file): nothing to do
            signature = (stat.st_size, stat.st_mtime_ns)
        state = self._files.get(name)
        if state is None:
            self.stats.candidates += 1
            if from_rescan and self.stats.rescans > 1:  # the first scan finds what was there before start()
                self.stats.found_by_rescan += 1
                log.debug("%s: %s found by rescan", self.folder, name)
            self._files[name] = _FileState("pending", None, now, now)
            self._pending.add(name)
            return
        if state.status == "pending":
            if kind in ("closed", "moved"):
                state.next_try = now  # the writer is done: check without waiting for the retry timer
            return
        if signature != state.signature:
            # A done, failed or ignored file changed: re-sent or still being written. Check it again.
            self._files[name] = _FileState("pending", None, now, now)
            self._pending.add(name)

    def _next_retry(self) -> float:
        return min((self._files[name].next_try for name in self._pending), default=float("inf"))

    def _process_due(self, now: float, final: bool = False) -> None:
        due = [name for name in self._pending if final or self._files[name].next_try <= now]
        # Files due together (a burst, or the first scan) go to the assembler in acquisition order.
        due.sort(key=lambda name: (self.config.parse_name(name) or (0, 0), name))
        for name in due:
            if self._stop_requested.is_set() and not final:
                return
            if not final and self._behind_an_earlier_series(name):
                # The last volume of the previous run is still being written: a new series would end that run
                # and turn it into a LateVolume. Wait (at most complete_timeout_s, when that file is given up).
                self._files[name].next_try = time.monotonic() + self.config.complete_retry_s
                continue
            try:
                self._process(name, time.monotonic(), final)
            except Exception as exc:  # a bug must not kill the watcher: report it with its traceback and go on
                log.exception("%s: unexpected error while ingesting %s", self.folder, name)
                self._files[name].status = "failed"
                self._pending.discard(name)
                self.stats.errors += 1
                self._emit([IngestError(self.folder / name, "internal", exc, time.monotonic())])

    def _behind_an_earlier_series(self, name: str) -> bool:
        """True when another pending (incomplete) file belongs to a lower series than ``name``, by file name."""
        numbers = self.config.parse_name(name)
        if numbers is None:
            return False
        for other in self._pending:
            other_numbers = self.config.parse_name(other)
            if other != name and other_numbers is not None and other_numbers[0] < numbers[0]:
                return True
        return False

    def _process(self, name: str, now: float, final: bool) -> None:
        state = self._files[name]
        path = self.folder / name
        state.attempts += 1
        try:
            # read_volume runs the completeness check of check_complete (header parsed to its end, every promised
            # pixel byte present) on the one open file before it decodes anything, so one call does both.
            volume = read_volume(path)
        except IncompleteVolumeError as exc:
            if final or now - state.first_seen >= self.config.complete_timeout_s:
                self._fail(name, state, "incomplete", exc, now)
            else:
                self.stats.retries += 1
                state.next_try = now + self.config.complete_retry_s
            return
        except DicomReadError as exc:
            if not path.exists():  # vanished (renamed away, cleaned up): nothing arrived
                del self._files[name]
                self._pending.discard(name)
                return
            self._fail(name, state, "unreadable", exc, now)
            return
        # The signature is taken after the read: the file the read saw complete is the one remembered, so the last
        # chunk of a write landing between a stat and the read does not make the same file look changed later.
        state.status, state.signature = "done", self._signature(path)
        self._pending.discard(name)
        self.stats.accepted += 1
        events: list[WatcherEvent] = []
        recorded_path = None
        if self._recorder is not None:
            try:
                recorded_path = self._recorder.record(path, series=volume.series, volume=volume.volume,
                                                      sop_uid=volume.sop_instance_uid).path
            except SessionError as exc:
                log.error("%s", exc)
                self.stats.errors += 1
                events.append(IngestError(path, "record_failed", exc, now))
        events.extend(self._assembler.push(volume, now, recorded_path))
        self._emit(events)

    def _signature(self, path: Path) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def _fail(self, name: str, state: _FileState, kind: str, error: RtMindEyeError, now: float) -> None:
        state.status, state.signature = "failed", self._signature(self.folder / name)
        self._pending.discard(name)
        self.stats.errors += 1
        log.error("%s (after %d attempts)", error, state.attempts)
        events: list[WatcherEvent] = [IngestError(self.folder / name, kind, error, now)]
        if self._recorder is not None:
            try:
                self._recorder.record(self.folder / name, status=kind)
            except SessionError as exc:
                events.append(IngestError(self.folder / name, "record_failed", exc, now))
        self._emit(events)

    def _stamp(self, events: list[WatcherEvent]) -> list[WatcherEvent]:
        """Move the events' times from the internal monotonic clock to ``clock``."""
        if self.clock is time.monotonic or not events:
            return events
        offset = self.clock() - time.monotonic()
        out = []
        for event in events:
            changes = {name: getattr(event, name) + offset for name in _TIME_FIELDS if hasattr(event, name)}
            out.append(dataclasses.replace(event, **changes) if changes else event)
        return out

    def _emit(self, events: list[WatcherEvent]) -> None:
        events = self._stamp(events)
        for event in events:
            log.debug("%s", event)
            if self._recorder is not None:
                try:
                    self._recorder.log_event(event_record(event))
                except SessionError as exc:  # the event itself still goes out
                    log.error("%s", exc)
            if self.on_event is None:
                self._events.put(event)
                continue
            try:
                self.on_event(event)
            except Exception:  # the consumer's bug must not stop ingestion; it is logged with its traceback
                log.exception("%s: on_event callback failed for %s", self.folder, type(event).__name__)
