"""A scanner export emulator: replay recorded DICOMs into a folder the way a real-time export writes them.

Peers replay a session by copying one file per TR. Real exports misbehave, and the watcher must survive that, so
:class:`ScannerEmulator` can also inject, deterministically for a given seed:

* partial writes: the file appears, grows in chunks while held open, and completes ``partial_chunks - 1`` chunk
  intervals later (the watcher sees it before it is complete);
* renamed writes: written under a hidden temporary name, then renamed into place (a moved event, as rsync and some
  SMB clients produce);
* jitter: each write is delayed by a uniform random amount up to ``jitter_s``;
* reordering: a volume and the next one swap arrival times;
* drops: a volume never arrives;
* duplicates: a volume is sent again later, with the same SOPInstanceUID, under its own name or another one that
  still matches the pattern;
* a restarted series: after ``restart_series_at`` volumes, the run starts over under the next series number (the
  copies get a new SeriesNumber, SeriesInstanceUID and SOPInstanceUIDs, written with pydicom);
* a share pause: nothing arrives for ``pause_trs`` TRs from volume ``pause_at`` on, then the held files in a burst.

Everything random is drawn up front by :meth:`ScannerEmulator.plan` from ``numpy.random.default_rng(seed)``; the plan
can be printed or saved as JSON and executing it is then a timed list of file operations.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from rt_mindeye.config import setting
from rt_mindeye.errors import DicomReadError, RtMindEyeError
from rt_mindeye.ingest.config import DEFAULT_PATTERN, compile_pattern, parse_name

log = logging.getLogger(__name__)

# A duplicate re-sent "under another name" gets this added to its volume number in the file name, so the name still
# matches the export pattern but cannot collide with a real volume; its DICOM header is unchanged.
DUPLICATE_NAME_OFFSET = 100_000

# Files released after a share pause arrive this far apart (seconds): a burst, but still in a definite order.
BURST_SPACING_S = 0.002


class ReplayError(RtMindEyeError):
    """The replay source or destination is unusable; names the path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject, and how often. All off by default: a clean replay at the TR."""

    partial_writes: float = setting(0.0, "probability that a file is written in chunks while held open", min=0.0,
                                    max=1.0)
    partial_chunks: int = setting(4, "number of chunks of a partial write", min=2, max=1000)
    partial_chunk_tr: float = setting(0.1, "time between chunks of a partial write, in TRs", min=0.0, max=10.0)
    rename_writes: float = setting(0.0, "probability that a file is written under a temporary name and renamed",
                                   min=0.0, max=1.0)
    jitter_s: float = setting(0.0, "largest random delay added to each write (seconds, uniform)", min=0.0)
    reorder: float = setting(0.0, "probability that a volume swaps arrival time with the next one", min=0.0, max=1.0)
    drop: float = setting(0.0, "probability that a volume is never written", min=0.0, max=1.0)
    duplicate: float = setting(0.0, "probability that a volume is sent a second time (same SOPInstanceUID)",
                               min=0.0, max=1.0)
    duplicate_rename: float = setting(0.5, "fraction of duplicates sent under another name", min=0.0, max=1.0)
    restart_series_at: int | None = setting(None, "after this many volumes the run restarts under a new series "
                                            "number (all volumes re-sent)", min=1)
    pause_at: int | None = setting(None, "index of the first volume held back by a share pause", min=0)
    pause_trs: int = setting(0, "length of the share pause in TRs", min=0)

    @property
    def any(self) -> bool:
        return any([self.partial_writes, self.rename_writes, self.jitter_s, self.reorder, self.drop, self.duplicate,
                    self.restart_series_at is not None, self.pause_at is not None and self.pause_trs > 0])


@dataclass(frozen=True)
class PlannedSend:
    """One file the emulated scanner writes (or, for ``kind == "drop"``, would have written)."""

    index: int
    """Position in the send order."""
    kind: str
    """``"write"``, ``"duplicate"`` or ``"drop"``."""
    source: str
    name: str
    """File name in the destination."""
    series: int
    volume: int
    """Series and volume number of the copy (the file name's numbers; the header's InstanceNumber is unchanged)."""
    start_s: float
    """Seconds from the start of the replay when the file appears (first chunk, or whole file)."""
    complete_s: float
    """Seconds from the start when the last byte is written and the file closed (or renamed into place)."""
    chunks: int = 1
    temporary_name: str | None = None
    """Written under this name, then renamed to ``name``."""
    new_series: int | None = None
    """The SeriesNumber written into the copy (restarted series only)."""
    new_sop_uid: str | None = None
    """The SOPInstanceUID written into the copy (restarted series only)."""
    faults: tuple[str, ...] = ()
    """What was done to this file: ``partial``, ``renamed``, ``jitter``, ``reordered``, ``paused``, ``restarted``,
    ``duplicate_renamed``, ``dropped``."""


@dataclass
class EmulationPlan:
    """The full, deterministic schedule of a replay."""

    tr: float
    speed: float
    seed: int
    pattern: str
    faults: FaultPlan
    sends: list[PlannedSend] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max((s.complete_s for s in self.sends if s.kind != "drop"), default=0.0)

    def counts(self) -> dict[str, int]:
        """How many sends of each kind and how many with each fault."""
        out: dict[str, int] = {}
        for send in self.sends:
            out[send.kind] = out.get(send.kind, 0) + 1
            for fault in send.faults:
                out[fault] = out.get(fault, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "tr": self.tr, "speed": self.speed, "seed": self.seed, "pattern": self.pattern,
            "faults": asdict(self.faults), "duration_s": self.duration_s, "counts": self.counts(),
            "sends": [{**asdict(s), "faults": list(s.faults)} for s in self.sends],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


@dataclass(frozen=True)
class _Operation:
    at_s: float
    order: int
    send: PlannedSend
    action: str  # "write" (whole file), "chunk" (chunk k of n, file held open), "rename"
    chunk: int = 0


def list_export_files(src: str | Path | Iterable[str | Path], pattern: str = DEFAULT_PATTERN
                      ) -> list[tuple[int, int, Path]]:
    """(series, volume, path) of every file matching ``pattern``, ordered by (series, volume).

    ``src`` is a folder (files not matching the pattern, such as licences or truncated copies, are skipped) or an
    explicit list of files (each must match).
    """
    regex = compile_pattern(pattern)
    if isinstance(src, (str, Path)):
        folder = Path(src)
        if not folder.is_dir():
            raise ReplayError(folder, "replay source is not a folder")
        candidates = [p for p in folder.iterdir() if p.is_file()]
        strict = False
    else:
        candidates = [Path(p) for p in src]
        strict = True
    found = []
    for path in candidates:
        numbers = parse_name(regex, path.name)
        if numbers is None:
            if strict:
                raise ReplayError(path, f"file name does not match the export pattern {pattern!r}")
            continue
        if not path.is_file():
            raise ReplayError(path, "replay source file does not exist")
        found.append((numbers[0], numbers[1], path))
    found.sort(key=lambda item: (item[0], item[1], item[2].name))
    return found


class ScannerEmulator:
    """Write a recorded session's DICOMs into ``dest`` at the TR, with optional deterministic faults.

    Parameters
    ----------
    src:
        A folder of export files or a list of them; ordered by (series, volume) from the file name pattern.
    dest:
        The folder the watcher observes (created if missing).
    tr:
        Repetition time in seconds; one volume is sent every ``tr / speed`` seconds.
    speed:
        Replay speed factor (2.0 sends twice as fast).
    faults:
        A :class:`FaultPlan`.
    seed:
        Seed of every random choice; the same seed gives the same plan.
    pattern:
        Export file name pattern.
    timing:
        ``"tr"``: one file per TR in (series, volume) order. ``"recorded"``: ``src`` is a session recorded by the
        watcher (its ``sourcedata/dicom`` folder, or the session folder); files are sent in the order and at the
        times they arrived then, re-sends included, from ``manifest.jsonl``. Faults apply on top of either.
    restamp_acquisition:
        Rewrite each file's AcquisitionDate/AcquisitionTime to one (accelerated) TR before it is written, as a live
        scanner would have stamped it, so that latency measured from acquisition is meaningful in a replay.
    """

    def __init__(self, src, dest: str | Path, tr: float, speed: float = 1.0, faults: FaultPlan | None = None,
                 seed: int = 0, pattern: str = DEFAULT_PATTERN, timing: str = "tr",
                 restamp_acquisition: bool = False):
        self.src = src
        self.timing = timing
        self.dest = Path(dest)
        self.tr = tr
        self.speed = speed
        self.faults = faults if faults is not None else FaultPlan()
        self.seed = seed
        self.pattern = pattern
        self.restamp_acquisition = restamp_acquisition
        self._plan: EmulationPlan | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.sent: list[PlannedSend] = []
        """Sends whose file is complete in ``dest``, in completion order."""

    # -- planning ----------------------------------------------------------------------------------------------------

    def plan(self) -> EmulationPlan:
        """Compute (once) the full schedule; no file is touched."""
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> EmulationPlan:
        if not self.tr or self.tr <= 0:
            raise ValueError(f"tr must be positive, got {self.tr!r}")
        if self.speed <= 0:
            raise ValueError(f"speed must be positive, got {self.speed!r}")
        if self.timing not in ("tr", "recorded"):
            raise ValueError(f"timing must be 'tr' or 'recorded', got {self.timing!r}")
        faults = self.faults
        step = self.tr / self.speed
        rng = np.random.default_rng(self.seed)

        # 1. What is sent and when, before faults: one file per TR in (series, volume) order, or the arrival times
        #    and names of a recorded session. A restart sends the whole run again under a new series number.
        if self.timing == "recorded":
            arrivals = recorded_arrivals(self.src, self.pattern)
            files = [(series, volume, path) for series, volume, path, _, _ in arrivals]
            names: list[str | None] = [name for _, _, _, name, _ in arrivals]
            base = np.array([t for *_, t in arrivals], dtype=float) / self.speed
        else:
            files = list_export_files(self.src, self.pattern)
            names = [None] * len(files)
            base = np.arange(len(files), dtype=float) * step
        if not files:
            raise ReplayError(Path(self.src) if isinstance(self.src, (str, Path)) else Path("."),
                              f"no files matching {self.pattern!r} to replay")
        destination = self.dest.resolve()
        if any(path.resolve().parent == destination for _, _, path in files):
            raise ReplayError(self.dest, "destination is the replay source folder: the copies would overwrite it")
        order: list[tuple[int, int, Path, int | None, str | None]] = [
            (series, volume, path, None, name) for (series, volume, path), name in zip(files, names)]
        nominal = base
        restart_at = faults.restart_series_at
        if restart_at is not None and restart_at < len(files):
            new_series = max(series for series, _, _ in files) + 1
            order = order[:restart_at] + [(new_series, v, p, new_series, None) for _, v, p in files]
            nominal = np.concatenate([base[:restart_at], base[restart_at] + base - base[0]])
        n = len(order)

        # 2. Every random number is drawn here, in a fixed layout, so that turning one fault on or off does not
        #    change the draws of the others.
        draws = rng.random((n, 8))
        drop = draws[:, 0] < faults.drop
        reorder = draws[:, 1] < faults.reorder
        partial = draws[:, 2] < faults.partial_writes
        renamed = draws[:, 3] < faults.rename_writes
        jitter = draws[:, 4] * faults.jitter_s
        duplicate = draws[:, 5] < faults.duplicate
        duplicate_delay = (0.5 + 1.5 * draws[:, 6]) * step
        duplicate_renamed = draws[:, 7] < faults.duplicate_rename

        # 3. Nominal times, neighbour swaps, pause, jitter.
        start = nominal.copy()
        tags: list[list[str]] = [[] for _ in range(n)]
        k = 0
        while k < n - 1:
            if reorder[k] and not drop[k] and not drop[k + 1]:
                start[k], start[k + 1] = start[k + 1], start[k]
                tags[k].append("reordered")
                tags[k + 1].append("reordered")
                k += 2
            else:
                k += 1
        if faults.pause_at is not None and faults.pause_trs > 0 and faults.pause_at < n:
            pause_begin = float(nominal[faults.pause_at])
            pause_end = pause_begin + faults.pause_trs * step
            # The volume due at the very end of the pause leaves with the burst, as the last of it.
            held = [i for i in np.argsort(start, kind="stable") if pause_begin <= start[i] <= pause_end + 1e-9]
            for rank, i in enumerate(held):
                start[i] = pause_end + rank * BURST_SPACING_S
                tags[i].append("paused")
        for i in range(n):
            if jitter[i] > 0:
                start[i] += jitter[i]
                tags[i].append("jitter")

        # 4. Sends, with chunking and renames.
        chunk_step = faults.partial_chunk_tr * step
        sends: list[PlannedSend] = []
        for i, (series, volume, path, new_series, recorded_name) in enumerate(order):
            name = recorded_name or compile_name(self.pattern, series, volume)
            new_sop = None
            base_tags = list(tags[i])
            if new_series is not None:
                new_sop = str(restart_uid(self.seed, "sop", new_series, volume))
                base_tags.append("restarted")
            if drop[i]:
                sends.append(PlannedSend(i, "drop", str(path), name, series, volume, float(start[i]),
                                         float(start[i]), 1, None, new_series, new_sop,
                                         tuple(base_tags + ["dropped"])))
                continue
            sends.append(self._send(i, "write", path, name, series, volume, float(start[i]), partial[i], renamed[i],
                                    chunk_step, new_series, new_sop, base_tags))
            if duplicate[i]:
                dup_name, dup_tags = name, list(base_tags)
                if duplicate_renamed[i]:
                    dup_name = compile_name(self.pattern, series, volume + DUPLICATE_NAME_OFFSET)
                    dup_tags.append("duplicate_renamed")
                sends.append(self._send(i, "duplicate", path, dup_name, series, volume,
                                        float(sends[-1].complete_s + duplicate_delay[i]), False, False, chunk_step,
                                        new_series, new_sop, dup_tags))
        return EmulationPlan(self.tr, self.speed, self.seed, self.pattern, faults, sends)

    def _send(self, index, kind, path, name, series, volume, start_s, partial, renamed, chunk_step, new_series,
              new_sop, tags) -> PlannedSend:
        tags = list(tags)
        chunks = self.faults.partial_chunks if partial else 1
        if partial:
            tags.append("partial")
        temporary = None
        if renamed:
            temporary = f".{name}.tmp"
            tags.append("renamed")
        complete = start_s + (chunks - 1) * chunk_step
        return PlannedSend(index, kind, str(path), name, series, volume, start_s, complete, chunks, temporary,
                           new_series, new_sop, tuple(tags))

    # -- execution ---------------------------------------------------------------------------------------------------

    def run(self, on_progress: Callable[[PlannedSend, int, int], None] | None = None) -> list[PlannedSend]:
        """Execute the plan in this thread; returns the completed sends. ``on_progress(send, done, total)`` is
        called each time a file is complete in ``dest``. :meth:`stop` (from another thread) ends it early."""
        plan = self.plan()
        self.sent = []
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReplayError(self.dest, f"cannot create the destination folder: {exc.strerror}") from exc
        operations = self._operations(plan)
        total = sum(1 for s in plan.sends if s.kind != "drop")
        handles: dict[int, io.BufferedWriter] = {}
        payloads: dict[int, bytes] = {}
        t0 = time.monotonic()
        try:
            for op in operations:
                delay = t0 + op.at_s - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                if self._stop.is_set():
                    break
                if self._execute(op, handles, payloads):
                    self.sent.append(op.send)
                    if on_progress is not None:
                        on_progress(op.send, len(self.sent), total)
        finally:
            for handle in handles.values():
                handle.close()
        return list(self.sent)

    def start(self) -> "ScannerEmulator":
        """Run the plan in a background thread (see :meth:`join`)."""
        self.plan()  # plan errors surface here, in the caller's thread
        self._thread = threading.Thread(target=self._run_captured, name="scanner-emulator", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the background run; True when it finished. Re-raises its error."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return not self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.join(timeout)

    def __enter__(self) -> "ScannerEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run_captured(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # handed to join(), which re-raises it in the caller's thread
            self._error = exc

    def _operations(self, plan: EmulationPlan) -> list[_Operation]:
        ops: list[_Operation] = []
        for number, send in enumerate(plan.sends):
            if send.kind == "drop":
                continue
            if send.chunks == 1:
                ops.append(_Operation(send.start_s, number, send, "write"))
            else:
                step = (send.complete_s - send.start_s) / (send.chunks - 1)
                for k in range(send.chunks):
                    ops.append(_Operation(send.start_s + k * step, number, send, "chunk", k))
        ops.sort(key=lambda op: (op.at_s, op.order, op.chunk))
        return ops

    def _payload(self, send: PlannedSend) -> bytes:
        source = Path(send.source)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ReplayError(source, f"cannot read the replay source: {exc.strerror}") from exc
        if send.new_series is not None:
            data = rewrite_series(data, source, send.new_series, send.new_sop_uid, self.seed)
        if self.restamp_acquisition:
            data = restamp_acquisition(data, source, time.time() - self.tr / self.speed)
        return data

    def _execute(self, op: _Operation, handles: dict, payloads: dict) -> bool:
        """Carry out one operation; True when it completed a file."""
        send = op.send
        key = id(send)
        final = self.dest / send.name
        written = self.dest / (send.temporary_name or send.name)
        if op.action == "write":
            data = self._payload(send)
            with open(written, "wb") as handle:
                handle.write(data)
        else:
            if op.chunk == 0:
                payloads[key] = self._payload(send)
                handles[key] = open(written, "wb")
            data = payloads[key]
            size = len(data)
            lo = size * op.chunk // send.chunks
            hi = size * (op.chunk + 1) // send.chunks
            handle = handles[key]
            handle.write(data[lo:hi])
            handle.flush()  # the bytes must reach the file system now: the watcher sees a growing file
            if op.chunk < send.chunks - 1:
                return False
            handles.pop(key).close()
            payloads.pop(key, None)
        if send.temporary_name:
            os.replace(written, final)
        return True


def recorded_arrivals(src: str | Path, pattern: str = DEFAULT_PATTERN) -> list[tuple[int, int, Path, str, float]]:
    """(series, volume, recorded copy, original name, seconds after the first arrival) of every accepted file of a
    session recorded by the watcher, in arrival order, from its ``manifest.jsonl``.

    ``src`` is the recording folder (``<session>/sourcedata/dicom``) or the session folder.
    """
    from rt_mindeye.ingest.recorder import DICOM_SUBDIR, MANIFEST_NAME

    folder = Path(src)
    if not (folder / MANIFEST_NAME).exists() and (folder / DICOM_SUBDIR / MANIFEST_NAME).exists():
        folder = folder / DICOM_SUBDIR
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        raise ReplayError(folder, f"no {MANIFEST_NAME}: recorded timing needs a session recorded by the watcher")
    regex = compile_pattern(pattern)
    arrivals = []
    with manifest.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if entry.get("status") != "accepted":
                    continue
                name, copy, received = entry["name"], folder / entry["recorded"], float(entry["received_unix_s"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ReplayError(manifest, f"line {line_number}: not a manifest entry ({exc})") from exc
            numbers = parse_name(regex, name)
            if numbers is None:
                raise ReplayError(manifest, f"line {line_number}: {name!r} does not match the pattern {pattern!r}")
            if not copy.is_file():
                raise ReplayError(copy, f"recorded copy listed in {manifest.name} line {line_number} is missing")
            arrivals.append((numbers[0], numbers[1], copy, name, received))
    if arrivals:
        first = min(t for *_, t in arrivals)
        arrivals = [(s, v, p, n, t - first) for s, v, p, n, t in sorted(arrivals, key=lambda a: a[4])]
    return arrivals


def compile_name(pattern: str, series: int, volume: int) -> str:
    return pattern.format(series=series, volume=volume, session=1)


def restart_uid(seed: int, what: str, series: int, volume: int = 0) -> str:
    """A deterministic UID for a copy in a restarted series (same seed, same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["rt-mindeye-replay", str(seed), what, str(series), str(volume)]))


def restamp_acquisition(data: bytes, source: Path, acquired: float) -> bytes:
    """A copy of the DICOM ``data`` acquired at ``acquired`` (POSIX seconds, this host's local time)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise DicomReadError(source, f"cannot restamp the acquisition time: {exc}") from exc
    stamp = time.localtime(acquired)
    dataset.AcquisitionDate = time.strftime("%Y%m%d", stamp)
    dataset.AcquisitionTime = time.strftime("%H%M%S", stamp) + f"{acquired % 1.0:.6f}"[1:]
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def rewrite_series(data: bytes, source: Path, new_series: int, new_sop_uid: str | None, seed: int = 0) -> bytes:
    """A copy of the DICOM ``data`` as a new series: SeriesNumber, SeriesInstanceUID and SOPInstanceUID replaced."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise DicomReadError(source, f"cannot rewrite for a restarted series: {exc}") from exc
    dataset.SeriesNumber = int(new_series)
    dataset.SeriesInstanceUID = restart_uid(seed, "series", new_series)
    if new_sop_uid is not None:
        dataset.SOPInstanceUID = new_sop_uid
        if getattr(dataset, "file_meta", None) is not None:
            dataset.file_meta.MediaStorageSOPInstanceUID = new_sop_uid
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
