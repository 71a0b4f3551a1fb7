"""FolderWatcher on real Siemens export files, a real watchdog observer and the real scanner emulator.

The machine running the suite is shared and slow, so the tests never assert on timing: the watcher's own TR (which
sets the gap timeout) is kept well above the emulator's TR except where a gap is the point of the test, and every wait
has a generous deadline.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from rt_mindeye.errors import GeometryMismatchError, IncompleteVolumeError
from rt_mindeye.ingest.config import WatcherConfig
from rt_mindeye.ingest.recorder import DicomRecorder
from rt_mindeye.ingest.series import (
    DuplicateDropped,
    GeometryRejected,
    LateVolume,
    RunEnded,
    RunStarted,
    VolumeGap,
    VolumeReady,
)
from rt_mindeye.ingest.watcher import FolderWatcher, IngestError, IngestTimeout, ObserverRestarted, event_record
from rt_mindeye.replay.emulator import FaultPlan, ScannerEmulator

WAIT_S = 20.0  # generous: the suite shares two cores with other work
FAST_TR = 0.05  # the emulator's TR
SLOW_TR = 1.0  # the watcher's TR where gaps must not be declared by a slow machine


@pytest.fixture
def volumes(siemens_export_dir) -> list[Path]:
    """Volumes 1..10 of the real series 13 (file 000000 is a real re-send of volume 10: see the duplicate test)."""
    return [siemens_export_dir / f"001_000013_{k:06d}.dcm" for k in range(1, 11)]


@pytest.fixture
def export(tmp_path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    return folder


def config(tmp_path, **overrides) -> WatcherConfig:
    values = dict(tr_s=SLOW_TR, record_dir=tmp_path / "session", rescan_interval_s=0.2, complete_retry_s=0.02)
    values.update(overrides)
    return WatcherConfig(**values)


def ready_numbers(events, series=13):
    return [e.number for e in events if isinstance(e, VolumeReady) and e.series == series]


def slots(events, series=13):
    """Volume numbers in the order the run delivered them (ready or gap)."""
    out = []
    for e in events:
        if isinstance(e, VolumeReady) and e.series == series:
            out.append(e.number)
        elif isinstance(e, VolumeGap) and e.series == series:
            out.append(e.volume)
    return out


def wait_ready(watcher, series, number):
    return watcher.wait_for(lambda e: isinstance(e, VolumeReady) and e.series == series and e.number == number,
                            WAIT_S, f"VolumeReady({series}, {number})")


def copy_as(src: Path, folder: Path, name: str | None = None) -> Path:
    """Put a file into the export folder whole (written aside, then renamed in), so that tests about other things
    never race with a half-copied file; partial writes have their own tests."""
    target = folder / (name or src.name)
    temporary = folder / f".{target.name}.part"
    shutil.copyfile(src, temporary)
    os.replace(temporary, target)
    return target


# --- the plain case and recording -----------------------------------------------------------------------------------


def test_clean_replay_arrives_in_order_and_every_file_is_recorded(tmp_path, export, volumes):
    cfg = config(tmp_path)
    with FolderWatcher(export, cfg) as watcher:
        ScannerEmulator(volumes, export, tr=FAST_TR).run()
        events = wait_ready(watcher, 13, 10)
    events += watcher.drain()
    assert isinstance(events[0], RunStarted) and events[0].series == 13
    assert ready_numbers(events) == list(range(1, 11))
    assert isinstance(events[-1], RunEnded) and events[-1].reason == "closed" and events[-1].n_ready == 10
    for event in events:
        if isinstance(event, VolumeReady):
            assert event.volume.shape == (64, 64, 27)
            # the copy in the session folder is the exact file, and it existed before the event was emitted
            assert event.recorded_path.read_bytes() == event.volume.source.read_bytes()
    recorder = DicomRecorder(cfg.record_dir)
    manifest = recorder.read_manifest()
    assert sorted(entry["volume"] for entry in manifest) == list(range(1, 11))
    assert watcher.stats.accepted == 10 and watcher.stats.errors == 0
    # the session folder also tells what the watcher made of the files, in the order it was decided
    logged = recorder.read_events()
    assert [(r["event"], r.get("volume")) for r in logged] == [(type(e).__name__, getattr(e, "number", None))
                                                                for e in events]
    assert logged[1]["sop_uid"] == events[1].volume.sop_instance_uid


def test_files_already_in_the_folder_are_processed_or_ignored(tmp_path, export, volumes):
    for path in volumes[:3]:
        copy_as(path, export)
    with FolderWatcher(export, config(tmp_path)) as watcher:
        events = wait_ready(watcher, 13, 3)
    assert ready_numbers(events) == [1, 2, 3]

    with FolderWatcher(export, config(tmp_path, existing_files="ignore", record_dir=None, tr_s=0.1)) as watcher:
        copy_as(volumes[3], export)
        events = wait_ready(watcher, 13, 4)
    # the three stale files were skipped; volume 4 is the first seen, so 1..3 are gaps once the run is closed
    assert ready_numbers(events) == [4]


# --- incomplete files -------------------------------------------------------------------------------------------------


def test_truncated_file_is_retried_and_accepted_once_complete(tmp_path, export, volumes, siemens_export_dir):
    truncated = (siemens_export_dir / "trunc_001_000013_000005.dcm").read_bytes()
    full = volumes[4].read_bytes()
    assert full.startswith(truncated)  # the real truncated file is a prefix of volume 5
    with FolderWatcher(export, config(tmp_path)) as watcher:
        for path in volumes[:4]:
            copy_as(path, export)
        wait_ready(watcher, 13, 4)
        target = export / volumes[4].name
        with open(target, "wb") as handle:
            handle.write(truncated)
            handle.flush()
            deadline = time.monotonic() + WAIT_S
            while watcher.stats.retries < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watcher.stats.retries >= 3  # seen, found incomplete, retried
            assert ready_numbers(watcher.drain()) == []
            handle.write(full[len(truncated):])
        events = wait_ready(watcher, 13, 5)
    assert [e for e in events if isinstance(e, IngestError)] == []
    ready = [e for e in events if isinstance(e, VolumeReady)]
    assert ready[-1].recorded_path.read_bytes() == full


def test_file_that_never_completes_is_reported_and_the_run_goes_on(tmp_path, export, volumes, siemens_export_dir):
    cfg = config(tmp_path, complete_timeout_s=0.3, tr_s=0.3)
    with FolderWatcher(export, cfg) as watcher:
        for path in volumes[:4]:
            copy_as(path, export)
        copy_as(siemens_export_dir / "trunc_001_000013_000005.dcm", export, volumes[4].name)
        events = watcher.wait_for(lambda e: isinstance(e, IngestError), WAIT_S, "IngestError")
        error = events[-1]
        assert error.kind == "incomplete" and isinstance(error.error, IncompleteVolumeError)
        assert error.path.name == volumes[4].name
        record = event_record(error)
        assert record["error_type"] == "IncompleteVolumeError" and record["path"] == str(error.path)
        copy_as(volumes[5], export)
        events += watcher.wait_for(lambda e: isinstance(e, VolumeReady) and e.number == 6, WAIT_S, "volume 6")
    assert slots(events) == [1, 2, 3, 4, 5, 6]
    assert [e.volume for e in events if isinstance(e, VolumeGap)] == [5]
    # the broken file is kept too, apart from the accepted ones
    rejected = DicomRecorder(cfg.record_dir).rejected_dir / volumes[4].name
    assert rejected.stat().st_size == (siemens_export_dir / "trunc_001_000013_000005.dcm").stat().st_size


def test_a_file_that_is_not_dicom_is_reported_at_once_and_the_run_goes_on(tmp_path, export, volumes):
    cfg = config(tmp_path, complete_timeout_s=60.0)  # not waited for: it is unreadable, not incomplete
    junk = b"a report saved under an export name, not a DICOM file\n" * 100
    with FolderWatcher(export, cfg) as watcher:
        copy_as(volumes[0], export)
        (export / "001_000013_000002.tmp").write_bytes(junk)
        os.replace(export / "001_000013_000002.tmp", export / volumes[1].name)
        copy_as(volumes[2], export)
        events = watcher.wait_for(lambda e: isinstance(e, IngestError), WAIT_S, "IngestError")
        error = events[-1]
        assert error.kind == "unreadable" and error.path.name == volumes[1].name
        assert not isinstance(error.error, IncompleteVolumeError)
        events += wait_ready(watcher, 13, 3)
    assert slots(events) == [1, 2, 3] and [e.volume for e in events if isinstance(e, VolumeGap)] == [2]
    assert (DicomRecorder(cfg.record_dir).rejected_dir / volumes[1].name).read_bytes() == junk


def test_partial_and_renamed_writes_are_each_accepted_once(tmp_path, export, volumes):
    faults = FaultPlan(partial_writes=1.0, partial_chunks=5, partial_chunk_tr=0.5, rename_writes=0.5)
    emulator = ScannerEmulator(volumes, export, tr=FAST_TR, faults=faults, seed=3)
    assert emulator.plan().counts()["partial"] == 10
    with FolderWatcher(export, config(tmp_path)) as watcher:
        emulator.run()
        events = wait_ready(watcher, 13, 10)
    assert ready_numbers(events) == list(range(1, 11))
    assert watcher.stats.accepted == 10 and watcher.stats.errors == 0
    assert not [e for e in events if isinstance(e, (IngestError, DuplicateDropped))]


# --- missing, late, out of order, duplicate ------------------------------------------------------------------------


def test_missing_volume_is_declared_after_two_tr_and_its_late_arrival_is_recorded(tmp_path, export, volumes):
    tr = 0.2
    cfg = config(tmp_path, tr_s=tr, gap_timeout_tr=2.0)
    with FolderWatcher(export, cfg) as watcher:
        for path in volumes[:3]:
            copy_as(path, export)
        wait_ready(watcher, 13, 3)
        for path in volumes[4:6]:  # volume 4 is lost for now
            copy_as(path, export)
        events = wait_ready(watcher, 13, 6)
        gap = next(e for e in events if isinstance(e, VolumeGap))
        first_held = min(e.received_at for e in events if isinstance(e, VolumeReady) and e.number in (5, 6))
        assert (gap.series, gap.volume, gap.reason) == (13, 4, "timeout")
        # the rule, on the watcher's own clock: 2 TR after the first later volume arrived (5 or 6: a file caught
        # while still being copied is retried, so 6 can be taken before 5)
        assert gap.declared_at - first_held >= 2 * tr
        copy_as(volumes[3], export)
        late = watcher.wait_for(lambda e: isinstance(e, LateVolume), WAIT_S, "LateVolume")[-1]
    assert (late.number, late.reason) == (4, "after_gap")
    assert late.recorded_path.read_bytes() == volumes[3].read_bytes()
    assert slots(events)[-3:] == [4, 5, 6]


def test_out_of_order_arrival_is_put_back_in_order(tmp_path, export, volumes):
    with FolderWatcher(export, config(tmp_path)) as watcher:
        copy_as(volumes[0], export)
        wait_ready(watcher, 13, 1)
        for k in (3, 2, 4, 1):  # volumes 4, 3, 5, 2
            copy_as(volumes[k], export)
        events = wait_ready(watcher, 13, 5)
    assert ready_numbers(events) == [2, 3, 4, 5]
    assert not [e for e in events if isinstance(e, VolumeGap)]


def test_emulated_reordering_jitter_and_pause_lose_nothing(tmp_path, export, volumes):
    faults = FaultPlan(reorder=0.4, jitter_s=0.02, pause_at=3, pause_trs=3)
    emulator = ScannerEmulator(volumes, export, tr=FAST_TR, faults=faults, seed=11)
    counts = emulator.plan().counts()
    assert counts.get("reordered", 0) >= 2 and counts["paused"] >= 3
    with FolderWatcher(export, config(tmp_path)) as watcher:
        emulator.run()
        events = wait_ready(watcher, 13, 10)
    assert slots(events) == list(range(1, 11))
    assert ready_numbers(events) == list(range(1, 11))


def test_duplicates_are_dropped_by_sop_uid_and_reported(tmp_path, export, volumes, siemens_export_dir):
    with FolderWatcher(export, config(tmp_path)) as watcher:
        ScannerEmulator(volumes, export, tr=FAST_TR).run()
        wait_ready(watcher, 13, 10)
        # the real export holds 001_000013_000000.dcm, a re-send of volume 10 (same SOPInstanceUID, another name)
        copy_as(siemens_export_dir / "001_000013_000000.dcm", export)
        events = watcher.wait_for(lambda e: isinstance(e, DuplicateDropped), WAIT_S, "DuplicateDropped")
    dup = events[-1]
    assert dup.path.name == "001_000013_000000.dcm"
    assert dup.first_path.name == "001_000013_000010.dcm"
    assert dup.reason == "same_sop_uid" and dup.volume == 10


def test_emulated_duplicates_under_both_names_are_dropped(tmp_path, export, volumes):
    faults = FaultPlan(duplicate=0.5, duplicate_rename=0.5)
    emulator = ScannerEmulator(volumes, export, tr=FAST_TR, faults=faults, seed=5)
    sends = emulator.plan().sends
    duplicates = [s for s in sends if s.kind == "duplicate"]
    renamed = [s for s in duplicates if "duplicate_renamed" in s.faults]
    assert 0 < len(renamed) < len(duplicates)
    with FolderWatcher(export, config(tmp_path)) as watcher:
        emulator.run()
        events = wait_ready(watcher, 13, 10)
        dropped = [e for e in events if isinstance(e, DuplicateDropped)]
        deadline = time.monotonic() + WAIT_S
        while len(dropped) < len(renamed) and time.monotonic() < deadline:
            event = watcher.get(0.1)
            events.append(event)
            if isinstance(event, DuplicateDropped):
                dropped.append(event)
    events += watcher.drain()
    dropped = [e for e in events if isinstance(e, DuplicateDropped)]
    # A copy under another name is a second file: always seen and dropped. A rewrite of the same name is seen only
    # if the watcher read the file between the two writes (otherwise there was only ever one file to read).
    assert {s.volume for s in renamed} <= {e.volume for e in dropped} <= {s.volume for s in duplicates}
    assert all(e.reason == "same_sop_uid" for e in dropped)
    assert ready_numbers(events) == list(range(1, 11))


def test_every_fault_at_once_keeps_the_stream_consistent(tmp_path, export, volumes):
    faults = FaultPlan(partial_writes=0.3, rename_writes=0.2, jitter_s=0.01, reorder=0.2, drop=0.15, duplicate=0.2,
                       restart_series_at=6, pause_at=2, pause_trs=2)
    emulator = ScannerEmulator(volumes, export, tr=FAST_TR, faults=faults, seed=21)
    sends = emulator.plan().sends
    counts = emulator.plan().counts()
    assert all(counts.get(kind, 0) > 0 for kind in ("partial", "reordered", "drop", "duplicate", "paused"))
    with FolderWatcher(export, config(tmp_path, tr_s=0.1)) as watcher:
        emulator.run()
        events = list(watcher.events(idle_timeout=1.5))
    events += watcher.drain()
    assert not [e for e in events if isinstance(e, IngestError)]
    for series in (13, 14):
        delivered = slots(events, series)
        assert delivered == list(range(delivered[0], delivered[-1] + 1))  # one slot each, in order, no holes
    written = {(s.series, s.volume) for s in sends if s.kind == "write"}
    dropped = {(s.series, s.volume) for s in sends if s.kind == "drop"}
    arrived = {(e.series, e.number) for e in events if isinstance(e, (VolumeReady, LateVolume))}
    assert arrived == written  # every file written was delivered or reported late; nothing else appeared
    gaps = {(e.series, e.volume) for e in events if isinstance(e, VolumeGap)}
    late = {(e.series, e.number) for e in events if isinstance(e, LateVolume)}
    assert gaps <= dropped | late
    duplicates = [s for s in sends if s.kind == "duplicate"]
    renamed = {(s.series, s.volume) for s in duplicates if "duplicate_renamed" in s.faults}
    dropped_dups = {(e.series, e.volume) for e in events if isinstance(e, DuplicateDropped)}
    assert renamed <= dropped_dups <= {(s.series, s.volume) for s in duplicates}
    ends = [e for e in events if isinstance(e, RunEnded)]
    assert [(e.series, e.reason) for e in ends] == [(13, "new_series"), (14, "closed")]


# --- series and geometry --------------------------------------------------------------------------------------------


def test_restarted_series_is_a_new_run(tmp_path, export, volumes):
    emulator = ScannerEmulator(volumes, export, tr=FAST_TR, faults=FaultPlan(restart_series_at=4), seed=2)
    with FolderWatcher(export, config(tmp_path)) as watcher:
        emulator.run()
        events = wait_ready(watcher, 14, 10)
    kinds = [(type(e).__name__, getattr(e, "series", None)) for e in events
             if isinstance(e, (RunStarted, RunEnded))]
    assert kinds == [("RunStarted", 13), ("RunEnded", 13), ("RunStarted", 14)]
    assert ready_numbers(events, 13) == [1, 2, 3, 4]
    assert ready_numbers(events, 14) == list(range(1, 11))
    restarted = [e.volume for e in events if isinstance(e, VolumeReady) and e.series == 14]
    assert len({v.sop_instance_uid for v in restarted}) == 10


def test_new_series_waits_for_the_last_volume_of_the_previous_one(tmp_path, export, volumes):
    restarted = ScannerEmulator(volumes[:2], tmp_path / "restarted", tr=0.01, faults=FaultPlan(restart_series_at=1))
    restarted.run()  # 001_000013_000001.dcm, then the run again as 001_000014_000001.dcm and _000002.dcm
    first_of_14 = tmp_path / "restarted" / "001_000014_000001.dcm"
    full = volumes[1].read_bytes()
    with FolderWatcher(export, config(tmp_path)) as watcher:
        copy_as(volumes[0], export)
        wait_ready(watcher, 13, 1)
        with open(export / volumes[1].name, "wb") as handle:  # volume 2 of series 13 is still being written ...
            handle.write(full[: len(full) // 2])
            handle.flush()
            deadline = time.monotonic() + WAIT_S
            while watcher.stats.retries < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            copy_as(first_of_14, export)  # ... when the restarted run's first volume arrives
            time.sleep(0.3)
            handle.write(full[len(full) // 2:])
        events = wait_ready(watcher, 14, 1)
    assert ready_numbers(events, 13) == [2]
    assert not [e for e in events if isinstance(e, LateVolume)]
    order = [(type(e).__name__, e.series) for e in events if isinstance(e, (RunEnded, RunStarted, VolumeReady))]
    assert order == [("VolumeReady", 13), ("RunEnded", 13), ("RunStarted", 14), ("VolumeReady", 14)]


def test_geometry_change_inside_a_series_is_rejected(tmp_path, export, volumes):
    moved = pydicom.dcmread(volumes[2])
    position = [float(x) for x in moved.ImagePositionPatient]
    moved.ImagePositionPatient = [position[0] + 10.0, position[1], position[2]]
    with FolderWatcher(export, config(tmp_path)) as watcher:
        copy_as(volumes[0], export)
        copy_as(volumes[1], export)
        wait_ready(watcher, 13, 2)
        moved.save_as(export / volumes[2].name)
        copy_as(volumes[3], export)
        events = wait_ready(watcher, 13, 4)
    rejected = [e for e in events if isinstance(e, GeometryRejected)]
    assert len(rejected) == 1 and rejected[0].field == "affine" and rejected[0].volume == 3
    assert isinstance(rejected[0].error(), GeometryMismatchError)
    gap = [e for e in events if isinstance(e, VolumeGap)]
    assert [(g.volume, g.reason) for g in gap] == [(3, "geometry_rejected")]
    assert slots(events) == [3, 4]


# --- observers ------------------------------------------------------------------------------------------------------


def test_polling_observer(tmp_path, export, volumes):
    cfg = config(tmp_path, observer="polling", poll_interval_s=0.05, rescan_interval_s=30.0)
    with FolderWatcher(export, cfg) as watcher:
        ScannerEmulator(volumes, export, tr=FAST_TR, faults=FaultPlan(partial_writes=0.5), seed=1).run()
        events = wait_ready(watcher, 13, 10)
    assert ready_numbers(events) == list(range(1, 11))
    assert watcher.stats.found_by_rescan == 0  # the polling observer found them, not the safety net


def test_lost_events_are_found_by_the_rescan(tmp_path, export, volumes):
    # A polling observer that looks only every 10 s stands in for an observer whose events are lost.
    cfg = config(tmp_path, observer="polling", poll_interval_s=10.0, rescan_interval_s=0.1)
    with FolderWatcher(export, cfg) as watcher:
        time.sleep(0.2)
        ScannerEmulator(volumes[:5], export, tr=FAST_TR).run()
        events = wait_ready(watcher, 13, 5)
    assert ready_numbers(events) == [1, 2, 3, 4, 5]
    assert watcher.stats.found_by_rescan == 5


def test_dead_observer_is_restarted_and_nothing_is_lost(tmp_path, export, volumes):
    cfg = config(tmp_path, rescan_interval_s=0.1)
    with FolderWatcher(export, cfg) as watcher:
        copy_as(volumes[0], export)
        wait_ready(watcher, 13, 1)
        dying = watcher._observer  # the thread a share outage would kill
        dying.stop()
        dying.join(5.0)
        for path in volumes[1:4]:
            copy_as(path, export)
        events = wait_ready(watcher, 13, 4)
        restarted = [e for e in events if isinstance(e, ObserverRestarted)]
        # stop() first unschedules the folder, then ends the thread: the check may catch either state
        assert restarted and restarted[0].reason in ("observer thread died", "no folder scheduled")
        assert watcher._observer is not dying and watcher._observer.is_alive()
        copy_as(volumes[4], export)  # the new observer works
        events += wait_ready(watcher, 13, 5)
    assert ready_numbers(events) == [2, 3, 4, 5]


def test_silently_dead_polling_emitter_is_restarted(tmp_path, export, volumes):
    cfg = config(tmp_path, observer="polling", poll_interval_s=0.05, rescan_interval_s=0.1)
    with FolderWatcher(export, cfg) as watcher:
        copy_as(volumes[0], export)
        wait_ready(watcher, 13, 1)
        # What a share outage does to watchdog's PollingObserver: the emitter thread ends, the observer lives on.
        observer = watcher._observer
        for emitter in list(observer.emitters):
            emitter.stop()
            emitter.join(5.0)
        assert observer.is_alive()
        events = watcher.wait_for(lambda e: isinstance(e, ObserverRestarted), WAIT_S, "ObserverRestarted")
        assert events[-1].reason == "emitter thread died"
        copy_as(volumes[1], export)
        events += wait_ready(watcher, 13, 2)
    assert ready_numbers(events) == [2]


def test_folder_gone_and_recreated_loses_nothing(tmp_path, export, volumes):
    cfg = config(tmp_path, rescan_interval_s=0.1)
    with FolderWatcher(export, cfg) as watcher:
        copy_as(volumes[0], export)
        wait_ready(watcher, 13, 1)
        export.rename(tmp_path / "export-unmounted")  # the share goes away ...
        time.sleep(0.3)
        export.mkdir()  # ... and comes back as another folder at the same path
        for path in volumes[1:3]:
            copy_as(path, export)
        events = wait_ready(watcher, 13, 3)
        copy_as(volumes[3], export)
        events += wait_ready(watcher, 13, 4)
    assert ready_numbers(events) == [2, 3, 4]
    restarts = [e for e in events if isinstance(e, ObserverRestarted)]
    assert restarts and restarts[0].reason.startswith("folder replaced")


def test_event_times_follow_the_given_clock_while_deadlines_stay_monotonic(tmp_path, export, volumes):
    import threading

    jumped = threading.Event()

    def wall_clock():  # set back by an hour while a volume waits for a missing one
        return time.time() - (3600.0 if jumped.is_set() else 0.0)

    with FolderWatcher(export, config(tmp_path, tr_s=0.1), clock=wall_clock) as watcher:
        copy_as(volumes[0], export)
        first = wait_ready(watcher, 13, 1)[-1]
        assert abs(first.received_at - time.time()) < 60.0  # on the given clock, not monotonic
        copy_as(volumes[2], export)  # volume 2 lost
        deadline = time.monotonic() + WAIT_S
        while watcher.stats.accepted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        jumped.set()
        events = wait_ready(watcher, 13, 3)  # the gap timeout still fires after 2 TR, not an hour later
    gap = next(e for e in events if isinstance(e, VolumeGap))
    assert gap.volume == 2 and abs(gap.declared_at - wall_clock()) < 60.0


def test_wait_for_timeout_is_named_and_keeps_the_events(tmp_path, export, volumes):
    with FolderWatcher(export, config(tmp_path)) as watcher:
        copy_as(volumes[0], export)
        with pytest.raises(IngestTimeout) as caught:
            watcher.wait_for(lambda e: False, 0.5, "nothing")
    assert str(export) in str(caught.value)
    assert any(isinstance(e, VolumeReady) for e in caught.value.seen)


def test_callback_mode_and_a_failing_callback_do_not_stop_ingestion(tmp_path, export, volumes):
    received = []

    def on_event(event):
        received.append(event)
        if isinstance(event, VolumeReady) and event.number == 1:
            raise RuntimeError("consumer bug")

    watcher = FolderWatcher(export, config(tmp_path), on_event=on_event).start()
    try:
        ScannerEmulator(volumes[:3], export, tr=FAST_TR).run()
        deadline = time.monotonic() + WAIT_S
        while len(ready_numbers(received)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.stop()
    assert ready_numbers(received) == [1, 2, 3]
    assert watcher.drain() == []
    assert not watcher.running
