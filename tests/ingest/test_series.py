"""SeriesAssembler: ordering, gaps, late arrivals, duplicates, geometry and series changes, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rt_mindeye.ingest.series import (
    DuplicateDropped,
    GeometryRejected,
    LateVolume,
    RunEnded,
    RunStarted,
    SeriesAssembler,
    VolumeGap,
    VolumeReady,
)
from rt_mindeye.errors import GeometryMismatchError
from rt_mindeye.volume import Volume

TR = 1.5
AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])


def make_volume(series: int, number: int, *, sop: str | None = None, shape=(4, 4, 3), affine=AFFINE, tr=TR):
    rng = np.random.default_rng(series * 1000 + number)
    return Volume(
        data=rng.standard_normal(shape).astype(np.float32),
        affine=np.array(affine, dtype=float),
        series=series,
        volume=number,
        tr=tr,
        acquisition_time=36000.0 + number * TR,
        slice_times=None,
        sop_instance_uid=sop if sop is not None else f"1.2.3.{series}.{number}",
        source=Path(f"/export/001_{series:06d}_{number:06d}.dcm"),
    )


def summary(events):
    """A compact, comparable view of an event list."""
    out = []
    for e in events:
        if isinstance(e, VolumeReady):
            out.append(("ready", e.series, e.number))
        elif isinstance(e, VolumeGap):
            out.append(("gap", e.series, e.volume, e.reason))
        elif isinstance(e, LateVolume):
            out.append(("late", e.series, e.number, e.reason))
        elif isinstance(e, DuplicateDropped):
            out.append(("dup", e.series, e.volume, e.reason))
        elif isinstance(e, GeometryRejected):
            out.append(("geometry", e.series, e.volume, e.field))
        elif isinstance(e, RunStarted):
            out.append(("start", e.series))
        elif isinstance(e, RunEnded):
            out.append(("end", e.series, e.n_ready, e.n_gaps, e.reason))
    return out


def test_in_order_volumes_are_released_at_once():
    asm = SeriesAssembler()
    events = []
    for n in range(1, 4):
        events += asm.push(make_volume(13, n), now=n * TR)
    assert summary(events) == [("start", 13), ("ready", 13, 1), ("ready", 13, 2), ("ready", 13, 3)]
    assert asm.next_expected == 4 and asm.held == ()
    assert summary(asm.close(now=10.0)) == [("end", 13, 3, 0, "closed")]


def test_out_of_order_volume_is_held_until_the_earlier_one_arrives():
    asm = SeriesAssembler()
    events = asm.push(make_volume(13, 1), 0.0)
    events += asm.push(make_volume(13, 3), 1.0)
    assert asm.held == (3,)
    events += asm.push(make_volume(13, 2), 1.2)
    assert summary(events) == [("start", 13), ("ready", 13, 1), ("ready", 13, 2), ("ready", 13, 3)]
    ready = [e for e in events if isinstance(e, VolumeReady)]
    # received_at is the arrival time, not the release time, so latency accounting stays honest
    assert [e.received_at for e in ready] == [0.0, 1.2, 1.0]


def test_missing_volume_is_declared_after_the_gap_timeout_and_the_run_goes_on():
    asm = SeriesAssembler(gap_timeout_tr=2.0, tr_s=TR)
    asm.push(make_volume(13, 1), 0.0)
    events = asm.push(make_volume(13, 3), 3.0)  # volume 2 lost
    events += asm.poll(3.0 + 2 * TR - 0.01)
    assert summary(events) == []
    assert asm.next_deadline() == pytest.approx(3.0 + 2 * TR)
    events += asm.push(make_volume(13, 4), 4.5)
    events += asm.poll(3.0 + 2 * TR)
    assert summary(events) == [("gap", 13, 2, "timeout"), ("ready", 13, 3), ("ready", 13, 4)]
    gap = events[0]
    assert gap.declared_at == pytest.approx(6.0)
    # the lost volume shows up after all: reported as late, not re-inserted
    late = asm.push(make_volume(13, 2), 7.0)
    assert summary(late) == [("late", 13, 2, "after_gap")]
    assert summary(asm.push(make_volume(13, 5), 7.5)) == [("ready", 13, 5)]


def test_gap_timeout_uses_the_tr_of_the_dicom_when_not_configured():
    asm = SeriesAssembler(gap_timeout_tr=2.0)
    asm.push(make_volume(13, 1, tr=0.8), 0.0)
    asm.push(make_volume(13, 3, tr=0.8), 1.0)
    assert asm.gap_timeout_s == pytest.approx(1.6)
    assert summary(asm.poll(2.59)) == []
    assert summary(asm.poll(2.61)) == [("gap", 13, 2, "timeout"), ("ready", 13, 3)]


def test_several_missing_volumes_are_declared_together():
    asm = SeriesAssembler(tr_s=1.0)
    asm.push(make_volume(13, 1), 0.0)
    asm.push(make_volume(13, 4), 1.0)
    asm.push(make_volume(13, 6), 2.0)
    events = asm.poll(3.0)  # the first held volume (4) has waited 2 TR; 6 has only waited 1 TR
    assert summary(events) == [("gap", 13, 2, "timeout"), ("gap", 13, 3, "timeout"), ("ready", 13, 4)]
    assert summary(asm.poll(4.0)) == [("gap", 13, 5, "timeout"), ("ready", 13, 6)]


def test_held_limit_declares_gaps_without_waiting():
    asm = SeriesAssembler(tr_s=1.0, max_held_volumes=2)
    asm.push(make_volume(13, 1), 0.0)
    asm.push(make_volume(13, 3), 0.1)
    asm.push(make_volume(13, 4), 0.2)
    events = asm.push(make_volume(13, 5), 0.3)
    assert summary(events) == [("gap", 13, 2, "held_limit"), ("ready", 13, 3), ("ready", 13, 4), ("ready", 13, 5)]


def test_duplicate_sop_uid_is_dropped_even_under_another_name():
    asm = SeriesAssembler()
    asm.push(make_volume(13, 1), 0.0)
    copy = make_volume(13, 1)
    copy = Volume(**{**copy.__dict__, "source": Path("/export/001_000013_000099.dcm")})
    events = asm.push(copy, 0.5)
    assert summary(events) == [("dup", 13, 1, "same_sop_uid")]
    assert events[0].path.name == "001_000013_000099.dcm"
    assert events[0].first_path.name == "001_000013_000001.dcm"


def test_same_volume_number_with_another_sop_uid_is_dropped():
    asm = SeriesAssembler()
    asm.push(make_volume(13, 1), 0.0)
    assert summary(asm.push(make_volume(13, 1, sop="9.9.9"), 0.5)) == [("dup", 13, 1, "same_volume_number")]


def test_volumes_without_sop_uid_are_not_mistaken_for_duplicates():
    asm = SeriesAssembler()
    events = asm.push(make_volume(13, 1, sop=""), 0.0) + asm.push(make_volume(13, 2, sop=""), 1.0)
    assert summary(events) == [("start", 13), ("ready", 13, 1), ("ready", 13, 2)]
    assert summary(asm.push(make_volume(13, 2, sop=""), 2.0)) == [("dup", 13, 2, "same_volume_number")]


def test_new_series_ends_the_run_and_flushes_held_volumes():
    asm = SeriesAssembler(tr_s=1.0)
    asm.push(make_volume(13, 1), 0.0)
    asm.push(make_volume(13, 3), 0.5)
    events = asm.push(make_volume(14, 1), 0.8)  # run restarted under a new series number
    assert summary(events) == [
        ("gap", 13, 2, "run_ended"), ("ready", 13, 3), ("end", 13, 2, 1, "new_series"),
        ("start", 14), ("ready", 14, 1),
    ]
    # a straggler of the ended run is reported, never mixed into the new run
    assert summary(asm.push(make_volume(13, 4), 1.0)) == [("late", 13, 4, "run_ended")]
    assert asm.current_series == 14


def test_geometry_change_is_rejected_and_its_slot_becomes_a_gap():
    asm = SeriesAssembler()
    asm.push(make_volume(13, 1), 0.0)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    events = asm.push(make_volume(13, 2, affine=shifted), 1.0)
    assert summary(events) == [("geometry", 13, 2, "affine"), ("gap", 13, 2, "geometry_rejected")]
    error = events[0].error()
    assert isinstance(error, GeometryMismatchError) and error.field == "affine"
    assert "001_000013_000002.dcm" in str(error)
    events = asm.push(make_volume(13, 3, shape=(4, 4, 2)), 2.0)
    assert summary(events) == [("geometry", 13, 3, "shape"), ("gap", 13, 3, "geometry_rejected")]
    assert summary(asm.push(make_volume(13, 4), 3.0)) == [("ready", 13, 4)]


def test_affine_changes_within_tolerance_are_accepted():
    asm = SeriesAssembler(geometry_atol_mm=0.01)
    asm.push(make_volume(13, 1), 0.0)
    nudged = AFFINE.copy()
    nudged[1, 3] += 0.005
    assert summary(asm.push(make_volume(13, 2, affine=nudged), 1.0)) == [("ready", 13, 2)]


def test_tr_change_inside_a_series_is_rejected():
    asm = SeriesAssembler()
    asm.push(make_volume(13, 1, tr=1.5), 0.0)
    assert summary(asm.push(make_volume(13, 2, tr=2.0), 1.0))[0] == ("geometry", 13, 2, "tr")


def test_every_number_gets_exactly_one_ready_or_gap_under_random_arrival():
    rng = np.random.default_rng(7)
    n = 40
    numbers = list(range(1, n + 1))
    dropped = set(rng.choice(numbers, size=5, replace=False).tolist())
    order = [k for k in numbers if k not in dropped]
    # local shuffles, as a share would: swap disjoint neighbour pairs, so nothing is more than one TR late
    for i in range(0, len(order) - 1, 2):
        if rng.random() < 0.5:
            order[i], order[i + 1] = order[i + 1], order[i]
    asm = SeriesAssembler(tr_s=1.0)
    events = []
    for i, k in enumerate(order):
        events += asm.push(make_volume(13, k), now=float(i))
        events += asm.poll(float(i) + 0.5)
    events += asm.poll(1e6)
    slots = [(e.number if isinstance(e, VolumeReady) else e.volume)
             for e in events if isinstance(e, (VolumeReady, VolumeGap))]
    assert slots == list(range(1, max(order) + 1))
    assert {e.volume for e in events if isinstance(e, VolumeGap)} == {d for d in dropped if d < max(order)}
    # nothing that arrived disappeared: every arrival is ready, late, or a duplicate
    arrived = {e.number for e in events if isinstance(e, (VolumeReady, LateVolume))}
    assert arrived == set(order)


def test_zero_based_numbering_starts_the_run_at_zero():
    asm = SeriesAssembler(first_volume=1)
    events = asm.push(make_volume(13, 0), 0.0)
    events += asm.push(make_volume(13, 1), 0.1)
    assert summary(events) == [("start", 13), ("ready", 13, 0), ("ready", 13, 1)]
    # once the run has delivered, a lower number is late, not a new start
    assert summary(asm.push(make_volume(13, -1), 0.2)) == [("late", 13, -1, "before_first")]


def test_closed_assembler_reports_stragglers_and_stale_series_as_late():
    asm = SeriesAssembler()
    asm.push(make_volume(13, 1), 0.0)
    assert summary(asm.close(1.0)) == [("end", 13, 1, 0, "closed")]
    assert summary(asm.push(make_volume(13, 2), 2.0)) == [("late", 13, 2, "run_ended")]
    assert summary(asm.push(make_volume(12, 5), 2.0)) == [("late", 12, 5, "run_ended")]
    assert summary(asm.push(make_volume(14, 1), 3.0)) == [("start", 14), ("ready", 14, 1)]


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="gap_timeout_tr"):
        SeriesAssembler(gap_timeout_tr=0)
    with pytest.raises(ValueError, match="tr_s"):
        SeriesAssembler(tr_s=-1.0)
