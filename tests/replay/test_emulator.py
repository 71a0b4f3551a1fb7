"""ScannerEmulator: deterministic plans, real file writes, each fault visible in the files it leaves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from rt_mindeye.cli import main as cli_main
from rt_mindeye.errors import IncompleteVolumeError
from rt_mindeye.ingest.dicom import read_volume
from rt_mindeye.replay.emulator import (
    DUPLICATE_NAME_OFFSET,
    FaultPlan,
    ReplayError,
    ScannerEmulator,
    list_export_files,
)


@pytest.fixture
def volumes(siemens_export_dir) -> list[Path]:
    return [siemens_export_dir / f"001_000013_{k:06d}.dcm" for k in range(1, 11)]


ALL_FAULTS = FaultPlan(partial_writes=0.3, rename_writes=0.2, jitter_s=0.01, reorder=0.2, drop=0.1, duplicate=0.2,
                       restart_series_at=6, pause_at=2, pause_trs=2)


def test_source_folder_is_ordered_by_series_and_volume_and_other_files_skipped(siemens_export_dir):
    found = list_export_files(siemens_export_dir)
    names = [p.name for _, _, p in found]
    assert names == sorted(p.name for p in siemens_export_dir.glob("001_*.dcm"))
    assert "trunc_001_000013_000005.dcm" not in names and [v for _, v, _ in found] == list(range(11))
    with pytest.raises(ReplayError, match="does not match"):
        list_export_files([siemens_export_dir / "trunc_001_000013_000005.dcm"])


def test_plan_is_deterministic_for_a_seed_and_saved_as_json(tmp_path, volumes):
    first = ScannerEmulator(volumes, tmp_path / "a", tr=0.1, faults=ALL_FAULTS, seed=4).plan()
    again = ScannerEmulator(volumes, tmp_path / "b", tr=0.1, faults=ALL_FAULTS, seed=4).plan()
    other = ScannerEmulator(volumes, tmp_path / "c", tr=0.1, faults=ALL_FAULTS, seed=5).plan()
    assert first.to_dict() == again.to_dict()
    assert first.to_dict()["sends"] != other.to_dict()["sends"]
    saved = json.loads(first.to_json(tmp_path / "plan.json"))
    assert saved == json.loads((tmp_path / "plan.json").read_text())
    assert saved["counts"] == first.counts() and len(saved["sends"]) == len(first.sends)
    assert not any((tmp_path / d).exists() for d in "abc")  # planning touches no file


def test_clean_replay_writes_identical_files_one_per_tr_in_order(tmp_path, volumes):
    emulator = ScannerEmulator(reversed(volumes), tmp_path / "out", tr=0.01)
    plan = emulator.plan()
    assert [s.start_s for s in plan.sends] == pytest.approx([0.01 * k for k in range(10)])
    sent = emulator.run()
    assert [s.name for s in sent] == [p.name for p in volumes]
    for path in volumes:
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()


def test_speed_divides_the_schedule(tmp_path, volumes):
    slow = ScannerEmulator(volumes, tmp_path, tr=1.0).plan()
    fast = ScannerEmulator(volumes, tmp_path, tr=1.0, speed=4.0).plan()
    assert fast.duration_s == pytest.approx(slow.duration_s / 4)


def test_dropped_volumes_are_never_written(tmp_path, volumes):
    emulator = ScannerEmulator(volumes, tmp_path / "out", tr=0.005, faults=FaultPlan(drop=0.3), seed=1)
    dropped = {s.name for s in emulator.plan().sends if s.kind == "drop"}
    assert 0 < len(dropped) < 10
    emulator.run()
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {p.name for p in volumes} - dropped


def test_reorder_swaps_neighbours_and_jitter_stays_in_bounds(tmp_path, volumes):
    tr, jitter = 1.0, 0.25
    plan = ScannerEmulator(volumes, tmp_path, tr=tr, faults=FaultPlan(reorder=0.5, jitter_s=jitter), seed=2).plan()
    for send in plan.sends:
        nominal = send.index * tr
        if "reordered" in send.faults:  # it took a neighbour's slot
            assert any(0.0 <= send.start_s - (nominal + shift) <= jitter for shift in (-tr, tr))
        else:
            assert 0.0 <= send.start_s - nominal <= jitter
    arrival = [s.volume for s in sorted(plan.sends, key=lambda s: s.start_s)]
    assert arrival != sorted(arrival)


def test_pause_holds_files_then_releases_a_burst(tmp_path, volumes):
    plan = ScannerEmulator(volumes, tmp_path, tr=1.0, faults=FaultPlan(pause_at=3, pause_trs=4)).plan()
    starts = sorted(s.start_s for s in plan.sends)
    assert not [t for t in starts if 3.0 <= t < 7.0]  # the share is silent for 4 TRs ...
    burst = [s for s in plan.sends if "paused" in s.faults]
    assert [s.volume for s in burst] == [4, 5, 6, 7, 8]  # ... then everything held arrives at once, in order
    assert all(7.0 <= s.start_s < 7.1 for s in burst)


def test_duplicates_repeat_the_same_bytes_under_the_same_or_another_name(tmp_path, volumes):
    emulator = ScannerEmulator(volumes, tmp_path / "out", tr=0.005, faults=FaultPlan(duplicate=0.6), seed=8)
    duplicates = [s for s in emulator.plan().sends if s.kind == "duplicate"]
    renamed = [s for s in duplicates if "duplicate_renamed" in s.faults]
    assert renamed and len(renamed) < len(duplicates)
    emulator.run()
    for send in renamed:
        original = tmp_path / "out" / Path(send.source).name
        copy = tmp_path / "out" / send.name
        assert send.name.endswith(f"{send.volume + DUPLICATE_NAME_OFFSET:06d}.dcm")
        assert copy.read_bytes() == original.read_bytes()


def test_restarted_series_gets_new_series_number_and_uids(tmp_path, volumes):
    emulator = ScannerEmulator(volumes, tmp_path / "out", tr=0.005, faults=FaultPlan(restart_series_at=3), seed=9)
    plan = emulator.plan()
    assert [(s.series, s.volume) for s in plan.sends] == [(13, k) for k in (1, 2, 3)] + [(14, k) for k in range(1, 11)]
    emulator.run()
    original = read_volume(volumes[4])
    copy = read_volume(tmp_path / "out" / "001_000014_000005.dcm")
    assert copy.series == 14 and copy.volume == original.volume
    assert copy.sop_instance_uid != original.sop_instance_uid
    np.testing.assert_array_equal(copy.data, original.data)
    np.testing.assert_allclose(copy.affine, original.affine)
    # same seed, same UIDs: a replay can be compared with its own recording
    again = ScannerEmulator(volumes, tmp_path / "x", tr=0.005, faults=FaultPlan(restart_series_at=3), seed=9).plan()
    assert [s.new_sop_uid for s in again.sends] == [s.new_sop_uid for s in plan.sends]


def test_partial_write_is_visible_as_an_incomplete_file_before_it_completes(tmp_path, volumes):
    faults = FaultPlan(partial_writes=1.0, partial_chunks=3, partial_chunk_tr=1.0)
    emulator = ScannerEmulator(volumes[:1], tmp_path / "out", tr=0.4, faults=faults)
    target = tmp_path / "out" / volumes[0].name
    states = []
    emulator.start()
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if target.exists():
            try:
                read_volume(target)
                states.append("complete")
            except IncompleteVolumeError:
                states.append("incomplete")
        if emulator.join(0.02):
            break
    assert "incomplete" in states
    assert target.read_bytes() == volumes[0].read_bytes()


def test_renamed_write_never_shows_a_partial_file_under_the_final_name(tmp_path, volumes):
    faults = FaultPlan(partial_writes=1.0, rename_writes=1.0, partial_chunks=3, partial_chunk_tr=0.5)
    emulator = ScannerEmulator(volumes[:2], tmp_path / "out", tr=0.2, faults=faults)
    assert all(s.temporary_name == f".{s.name}.tmp" for s in emulator.plan().sends)
    emulator.start()
    deadline = time.monotonic() + 20.0
    while not emulator.join(0.01) and time.monotonic() < deadline:
        for path in volumes[:2]:
            target = tmp_path / "out" / path.name
            if target.exists():
                assert target.stat().st_size == path.stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in volumes[:2]]


def test_stop_ends_a_replay_early(tmp_path, volumes):
    emulator = ScannerEmulator(volumes, tmp_path / "out", tr=10.0).start()
    time.sleep(0.1)
    emulator.stop(timeout=5.0)
    assert emulator.join(0.0)
    assert len(emulator.sent) == 1


def test_invalid_parameters_are_named(tmp_path, volumes):
    with pytest.raises(ValueError, match="tr"):
        ScannerEmulator(volumes, tmp_path, tr=0).plan()
    with pytest.raises(ValueError, match="speed"):
        ScannerEmulator(volumes, tmp_path, tr=1.0, speed=-1).plan()
    with pytest.raises(ReplayError, match="not a folder"):
        ScannerEmulator(tmp_path / "missing", tmp_path, tr=1.0).plan()
    with pytest.raises(ReplayError, match="replay source folder"):
        ScannerEmulator(volumes, volumes[0].parent, tr=1.0).plan()


def test_recorded_session_replays_with_its_own_arrival_order_and_timing(tmp_path, volumes):
    from rt_mindeye.ingest.config import WatcherConfig
    from rt_mindeye.ingest.series import VolumeReady
    from rt_mindeye.ingest.watcher import FolderWatcher

    def ingest(folder, session, emulator):
        folder.mkdir()
        cfg = WatcherConfig(tr_s=1.0, record_dir=session, rescan_interval_s=0.2, complete_retry_s=0.02)
        with FolderWatcher(folder, cfg) as watcher:
            emulator.dest = folder
            emulator.run()
            watcher.wait_for(lambda e: isinstance(e, VolumeReady) and e.number == 10, 20.0, "volume 10")
        return DicomRecorder(session)

    from rt_mindeye.ingest.recorder import DicomRecorder

    # 1. a live session with misbehaving arrivals, recorded by the watcher
    live = ScannerEmulator(volumes, tmp_path, tr=0.03, faults=FaultPlan(reorder=0.5, duplicate=0.4), seed=6)
    recorder = ingest(tmp_path / "live", tmp_path / "session", live)
    manifest = [m for m in recorder.read_manifest() if m["status"] == "accepted"]
    assert len(manifest) > 10  # re-sends were recorded too

    # 2. its replay follows the recorded order, names and intervals (here twice as fast)
    replay = ScannerEmulator(tmp_path / "session", tmp_path, tr=0.03, speed=2.0, timing="recorded")
    plan = replay.plan()
    assert [s.name for s in plan.sends] == [m["name"] for m in manifest]
    recorded_t = np.array([m["received_unix_s"] for m in manifest])
    np.testing.assert_allclose([s.start_s for s in plan.sends], (recorded_t - recorded_t[0]) / 2.0, atol=1e-6)
    replayed = ingest(tmp_path / "again", tmp_path / "session2", replay)
    # the second watcher receives the same files, re-sends included (files arriving within a millisecond of each
    # other may be taken in either order, so compare as multisets)
    assert sorted(m["sha256"] for m in replayed.read_manifest()) == sorted(m["sha256"] for m in manifest)

    with pytest.raises(ReplayError, match="manifest"):
        ScannerEmulator(volumes[0].parent, tmp_path / "x", tr=1.0, timing="recorded").plan()


def test_cli_replays_with_faults_and_saves_the_plan(tmp_path, siemens_export_dir, capsys):
    out, plan_path = tmp_path / "out", tmp_path / "plan.json"
    code = cli_main(["replay", str(siemens_export_dir), str(out), "--tr", "0.005", "--seed", "3", "--drop", "0.3",
                     "--duplicate", "0.2", "--partial-writes", "0.5", "--plan-json", str(plan_path)])
    assert code == 0
    plan = json.loads(plan_path.read_text())
    written = {s["name"] for s in plan["sends"] if s["kind"] != "drop"}
    assert {p.name for p in out.iterdir()} == written
    assert plan["counts"].get("drop", 0) > 0


def test_cli_rejects_a_probability_out_of_range(tmp_path, siemens_export_dir, capsys):
    code = cli_main(["replay", str(siemens_export_dir), str(tmp_path / "out"), "--tr", "1", "--reorder", "1.5"])
    assert code == 2
    assert "replay.reorder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_takes_the_tr_from_the_dicom(tmp_path, siemens_export_dir, capsys):
    code = cli_main(["replay", str(siemens_export_dir), str(tmp_path / "out"), "--dry-run"])
    assert code == 0
    assert "TR 1.5 s" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_restamped_files_carry_the_write_time_as_acquisition_time(tmp_path, siemens_export_dir):
    """A replay with restamp_acquisition: each file's acquisition time is about one TR before it was written."""
    import time as _time

    from rt_mindeye.ingest.dicom import read_volume
    from rt_mindeye.replay.emulator import ScannerEmulator
    from rt_mindeye.timing import dicom_time_to_seconds

    files = sorted(siemens_export_dir.glob("001_000013_00000[1-3].dcm"))
    dest = tmp_path / "export"
    before = _time.time()
    ScannerEmulator(files, dest, tr=0.2, speed=1.0, restamp_acquisition=True).run()
    for path in sorted(dest.iterdir()):
        volume = read_volume(path)
        written = path.stat().st_mtime
        stamp = _time.localtime(written)
        midnight = written - (stamp.tm_hour * 3600 + stamp.tm_min * 60 + stamp.tm_sec + written % 1.0)
        acquired = midnight + volume.acquisition_time
        assert before - 0.2 - 0.05 <= acquired <= written
        assert written - acquired == pytest.approx(0.2, abs=0.15)
        original = read_volume(siemens_export_dir / path.name)
        assert original.acquisition_time != volume.acquisition_time
        assert dicom_time_to_seconds("000001") == 1.0
        np.testing.assert_array_equal(volume.data, original.data)
