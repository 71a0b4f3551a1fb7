"""Keep a copy of every DICOM that arrived, before anything downstream sees it.

The scanner's export share is not ours: files there are overwritten, cleaned up or lost with the share. The watcher
therefore copies each accepted file into the session folder, ``<session>/sourcedata/dicom/<original name>``, *before*
it emits the volume, and files it could not use into ``sourcedata/dicom/rejected/``. ``manifest.jsonl`` beside the
copies has one line per file (name, SHA-256, series, volume, SOPInstanceUID, arrival time, status), and
``ingest_events.jsonl`` one line per watcher event (gaps, duplicates, late volumes, errors), so the session folder
tells what arrived and what was made of it.

Copies are written under a temporary name and renamed into place, so a crash never leaves a half-written copy that
looks complete, and a replay or a second watcher on the session folder never sees one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.errors import SessionError

DICOM_SUBDIR = Path("sourcedata") / "dicom"
REJECTED_SUBDIR = "rejected"
MANIFEST_NAME = "manifest.jsonl"
EVENTS_NAME = "ingest_events.jsonl"


@dataclass(frozen=True)
class RecordedFile:
    """Where one arrived file was copied."""

    path: Path
    """The copy in the session folder."""
    source: Path
    sha256: str
    size: int
    already_present: bool
    """True when an identical copy was already there (the same file re-sent); nothing was written."""


class DicomRecorder:
    """Copy raw DICOMs into ``<session_dir>/sourcedata/dicom/`` and log them in ``manifest.jsonl``.

    A second, *different* file under an already-used name (a re-export, a duplicate with new content) is kept as
    ``<stem>__2<suffix>``, ``__3`` and so on, so nothing is overwritten. Thread-safe.
    """

    def __init__(self, session_dir: str | Path):
        self.session_dir = Path(session_dir)
        self.dicom_dir = self.session_dir / DICOM_SUBDIR
        self.rejected_dir = self.dicom_dir / REJECTED_SUBDIR
        self.manifest_path = self.dicom_dir / MANIFEST_NAME
        self.events_path = self.dicom_dir / EVENTS_NAME
        self._lock = threading.Lock()
        self._hashes: dict[Path, str] = {}
        try:
            self.dicom_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(self.dicom_dir, f"cannot create the recording folder: {exc.strerror}") from exc

    def record(self, path: str | Path, *, series: int | None = None, volume: int | None = None,
               sop_uid: str | None = None, status: str = "accepted", data: bytes | None = None) -> RecordedFile:
        """Copy ``path`` (or the bytes already read from it, ``data``) and append a manifest line.

        ``status`` ``"accepted"`` goes to ``sourcedata/dicom/``; anything else (``"incomplete"``, ``"unreadable"``)
        to ``sourcedata/dicom/rejected/``. Raises :class:`~rt_mindeye.errors.SessionError` naming the file when the
        source cannot be read or the copy cannot be written.
        """
        source = Path(path)
        if data is None:
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise SessionError(source, f"cannot read the file to record it: {exc.strerror}") from exc
        digest = hashlib.sha256(data).hexdigest()
        folder = self.dicom_dir if status == "accepted" else self.rejected_dir
        with self._lock:
            target, already = self._target_for(folder, source.name, digest)
            if not already:
                self._write_atomically(target, data)
                self._hashes[target] = digest
            entry = {
                "name": source.name,
                "recorded": str(target.relative_to(self.dicom_dir)),
                "source": str(source),
                "size": len(data),
                "sha256": digest,
                "series": series,
                "volume": volume,
                "sop_uid": sop_uid,
                "status": status,
                "received_unix_s": round(time.time(), 6),
                "already_present": already,
            }
            self._append_manifest(entry)
        return RecordedFile(target, source, digest, len(data), already)

    def read_manifest(self) -> list[dict]:
        """All manifest entries, in the order they were recorded."""
        return _read_jsonl(self.manifest_path)

    def log_event(self, record: dict) -> None:
        """Append one JSON-ready event summary to ``ingest_events.jsonl`` (what the watcher decided, in order)."""
        with self._lock:
            try:
                with self.events_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise SessionError(self.events_path, f"cannot append to the event log: {exc.strerror}") from exc

    def read_events(self) -> list[dict]:
        """Every event logged with :meth:`log_event`, in order."""
        return _read_jsonl(self.events_path)

    # -- internals ---------------------------------------------------------------------------------------------------

    def _existing_hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._hashes[path]

    def _target_for(self, folder: Path, name: str, digest: str) -> tuple[Path, bool]:
        stem, suffix = os.path.splitext(name)
        candidate = folder / name
        copy_number = 1
        while candidate.exists():
            if self._existing_hash(candidate) == digest:
                return candidate, True
            copy_number += 1
            candidate = folder / f"{stem}__{copy_number}{suffix}"
        return candidate, False

    def _write_atomically(self, target: Path, data: bytes) -> None:
        temporary = target.with_name(f".{target.name}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        except OSError as exc:
            raise SessionError(target, f"cannot write the recorded copy: {exc.strerror}") from exc

    def _append_manifest(self, entry: dict) -> None:
        try:
            with self.manifest_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        except OSError as exc:
            raise SessionError(self.manifest_path, f"cannot append to the manifest: {exc.strerror}") from exc


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
