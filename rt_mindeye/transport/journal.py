"""Append-only journal of sent messages: the session record the reliable channel resends from.

A trial estimate is written here *before* it is handed to the network, so a decoder restart, a reconnect or a scanner
host restart loses nothing: the journal is the source of truth and the in-memory outbox only a cache of it.

File layout (all integers little-endian)::

    file header   b"RTMJOURNAL\\x00\\x01"                         12 bytes, the last two = format version 1
    record        magic b"RTMR" | kind u8 | seq u64 | n u32        17 bytes
                  n x frame length u64
                  CRC-32 u32 of the record so far (so a corrupt length is caught before it is trusted)
                  the n frames' bytes, back to back
                  CRC-32 u32 of everything above in this record

``kind`` is ``M`` (a message: its wire frames, exactly as sent, so reading back gives the same bytes) or ``A`` (the
acknowledged watermark moved to ``seq``; no frames). A record cut short by a crash at the end of the file is
dropped when the journal is reopened (it was never sent: sending happens only after the write returns); a bad
record anywhere else raises :class:`JournalError`.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

from rt_mindeye.errors import SessionError
from rt_mindeye.transport.messages import Message, decode

__all__ = ["Journal", "JournalError", "read_journal", "FILE_MAGIC"]

FILE_MAGIC = b"RTMJOURNAL\x00\x01"
_RECORD = struct.Struct("<4sBQI")
_RECORD_MAGIC = b"RTMR"
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
KIND_MESSAGE = ord("M")
KIND_ACK = ord("A")


class JournalError(SessionError):
    """The journal file is not a journal, or a record in its middle is corrupt."""

    def __init__(self, path: str | Path, offset: int, problem: str):
        self.offset = offset
        super().__init__(path, f"journal record at byte {offset}: {problem}")


class Journal:
    """Durable outbox: ``append(seq, frames)`` before sending, ``mark_acked(seq)`` when the receiver confirms.

    Thread-safe: the caller's thread appends, the channel's agent thread reads. Unacknowledged messages stay in memory
    (``pending(seq)``) and acknowledged ones are read back from disk when a receiver asks for them again.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._offsets: dict[int, int] = {}
        self._pending: dict[int, list[bytes]] = {}
        self.last_seq = 0
        self.acked_seq = 0
        self._file = None
        self._open()

    # --- opening -------------------------------------------------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "wb") as f:
                f.write(FILE_MAGIC)
                f.flush()
                os.fsync(f.fileno())
        end = self._scan()
        self._file = open(self.path, "r+b")
        self._file.seek(end)
        self._file.truncate()  # drop a torn last record

    def _scan(self) -> int:
        """Index the existing records; returns the offset after the last complete one."""
        with open(self.path, "rb") as f:
            if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
                raise JournalError(self.path, 0, "not an rt-mindeye journal (bad file magic)")
            size = os.fstat(f.fileno()).st_size
            offset = len(FILE_MAGIC)
            while offset < size:
                record = _read_record(f, offset, size, self.path)
                if record is None:  # torn write at the very end
                    break
                kind, seq, frames, end = record
                if kind == KIND_MESSAGE:
                    self._offsets[seq] = offset
                    self._pending[seq] = frames
                    self.last_seq = max(self.last_seq, seq)
                else:
                    self.acked_seq = max(self.acked_seq, seq)
                offset = end
            for seq in [s for s in self._pending if s <= self.acked_seq]:
                del self._pending[seq]
            return offset

    # --- writing -------------------------------------------------------------------------------------------------

    def next_seq(self) -> int:
        return self.last_seq + 1

    def append(self, seq: int, frames: list) -> None:
        """Write one message's frames durably. ``seq`` must be ``next_seq()``."""
        # One immutable copy of the frames (80 kB for 20k voxels): the caller may reuse or change its arrays
        # afterwards without changing what is (re)sent, and disk and memory hold the same bytes.
        frozen = [f if isinstance(f, bytes) else bytes(memoryview(f).cast("B")) for f in frames]
        with self._lock:
            if seq != self.last_seq + 1:
                raise ValueError(f"journal {self.path}: seq {seq} out of order (last {self.last_seq})")
            offset = self._file.tell()
            self._write(KIND_MESSAGE, seq, frozen)
            self._offsets[seq] = offset
            self._pending[seq] = frozen
            self.last_seq = seq

    def mark_acked(self, seq: int) -> bool:
        """Record that everything up to ``seq`` was acknowledged; False if that was known already."""
        with self._lock:
            seq = min(seq, self.last_seq)
            if seq <= self.acked_seq:
                return False
            self._write(KIND_ACK, seq, [])
            self.acked_seq = seq
            for s in [s for s in self._pending if s <= seq]:
                del self._pending[s]
            return True

    def _write(self, kind: int, seq: int, frames: list) -> None:
        views = [memoryview(f).cast("B") if not isinstance(f, bytes) else f for f in frames]
        head = _RECORD.pack(_RECORD_MAGIC, kind, seq, len(views))
        head += b"".join(_LENGTH.pack(len(v)) for v in views)
        head += _CRC.pack(zlib.crc32(head))
        crc = zlib.crc32(head)
        for v in views:
            crc = zlib.crc32(v, crc)
        self._file.write(head)
        for v in views:
            self._file.write(v)
        self._file.write(_CRC.pack(crc))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    # --- reading -------------------------------------------------------------------------------------------------

    def frames(self, seq: int) -> list:
        """The frames of message ``seq``, from memory if unacknowledged, otherwise from disk."""
        with self._lock:
            pending = self._pending.get(seq)
            if pending is not None:
                return pending
            offset = self._offsets.get(seq)
            if offset is None:
                raise KeyError(seq)
            with open(self.path, "rb") as f:
                record = _read_record(f, offset, os.fstat(f.fileno()).st_size, self.path)
            if record is None:
                raise JournalError(self.path, offset, "record vanished")
            return record[2]

    def unacked(self) -> list[int]:
        with self._lock:
            return sorted(self._pending)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_record(f, offset: int, size: int, path: Path):
    """(kind, seq, frames, end offset), or None for a record cut short at the end of the file."""
    f.seek(offset)
    head = f.read(_RECORD.size)
    if len(head) < _RECORD.size:
        return None
    magic, kind, seq, n = _RECORD.unpack(head)
    if magic != _RECORD_MAGIC or kind not in (KIND_MESSAGE, KIND_ACK):
        raise JournalError(path, offset, "bad record magic")
    lengths_raw = f.read(_LENGTH.size * n)
    if len(lengths_raw) < _LENGTH.size * n:
        return None
    head_crc_raw = f.read(_CRC.size)
    if len(head_crc_raw) < _CRC.size:
        return None
    if zlib.crc32(head + lengths_raw) != _CRC.unpack(head_crc_raw)[0]:
        raise JournalError(path, offset, "record header CRC mismatch")
    lengths = [_LENGTH.unpack_from(lengths_raw, i * _LENGTH.size)[0] for i in range(n)]
    end = offset + _RECORD.size + len(lengths_raw) + _CRC.size + sum(lengths) + _CRC.size
    if end > size:
        return None
    frames = [f.read(length) for length in lengths]
    (crc,) = _CRC.unpack(f.read(_CRC.size))
    check = zlib.crc32(head + lengths_raw + head_crc_raw)
    for frame in frames:
        check = zlib.crc32(frame, check)
    if check != crc:
        if end == size:
            return None  # torn last record: its tail bytes never made it to disk
        raise JournalError(path, offset, "CRC mismatch")
    return kind, seq, frames, end


def read_journal(path: str | Path) -> Iterator[Message]:
    """Every message in a journal, in order, decoded (for replay and offline analysis); read-only."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
            raise JournalError(path, 0, "not an rt-mindeye journal (bad file magic)")
        size = os.fstat(f.fileno()).st_size
        offset = len(FILE_MAGIC)
        while offset < size:
            record = _read_record(f, offset, size, path)
            if record is None:
                return
            kind, _seq, frames, offset = record
            if kind == KIND_MESSAGE:
                yield decode(frames)
