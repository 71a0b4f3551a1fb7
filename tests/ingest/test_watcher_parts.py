"""The watcher's configuration (file name pattern, validation) and the DICOM recorder, on real files."""

from __future__ import annotations

import pytest

from rt_mindeye.config import from_mapping, load
from rt_mindeye.errors import ConfigError, SessionError
from rt_mindeye.ingest.config import WatcherConfig, compile_pattern
from rt_mindeye.ingest.recorder import DicomRecorder


# --- configuration -----------------------------------------------------------------------------------------------------


def test_default_pattern_parses_siemens_names_and_nothing_else():
    cfg = WatcherConfig()
    assert cfg.parse_name("001_000013_000005.dcm") == (13, 5)
    assert cfg.parse_name("001_000013_1000005.dcm") == (13, 1000005)  # wider than the padding: still a volume
    for name in ("trunc_001_000013_000005.dcm", "001_000013_000005.dcm.tmp", ".001_000013_000005.dcm.tmp",
                 "001_13_5.dcm", "002_000013_000005.dcm", "LICENSE-rt-cloud"):
        assert cfg.parse_name(name) is None, name
    assert cfg.format_name(14, 7) == "001_000014_000007.dcm"


def test_custom_patterns_round_trip():
    regex = compile_pattern("{session:03d}_{series}-{volume:05d}.IMA")
    assert regex.match("002_7-00012.IMA").groupdict() == {"session": "002", "series": "7", "volume": "00012"}
    assert regex.match("002_7-00012.IMAX") is None


@pytest.mark.parametrize("pattern, problem", [
    ("001_{series:06d}.dcm", "needs a {volume}"),
    ("{run}_{series}_{volume}.dcm", "unknown field {run}"),
    ("{series}_{volume:.2f}.dcm", "integer format"),
    ("{series}_{volume}_{volume}.dcm", "appears twice"),
])
def test_bad_patterns_fail_at_load_time_naming_the_key(pattern, problem):
    with pytest.raises(ConfigError) as caught:
        from_mapping(WatcherConfig, {"pattern": pattern}, source="session.yaml", prefix="watcher")
    assert caught.value.source == "session.yaml" and caught.value.key == "watcher"
    assert problem in str(caught.value)


def test_config_loads_from_yaml_and_rejects_typos_and_ranges(tmp_path):
    path = tmp_path / "session.yaml"
    path.write_text("watcher:\n  observer: polling\n  tr_s: 1.5\n  record_dir: /data/ses-01\n")
    cfg = load(WatcherConfig, path, "watcher")
    assert cfg.observer == "polling" and cfg.tr_s == 1.5 and str(cfg.record_dir) == "/data/ses-01"
    path.write_text("watcher:\n  gap_timeout_trs: 3\n")
    with pytest.raises(ConfigError, match="watcher.gap_timeout_trs: unknown key"):
        load(WatcherConfig, path, "watcher")
    path.write_text("watcher:\n  observer: inotify\n")
    with pytest.raises(ConfigError, match="watcher.observer: must be one of"):
        load(WatcherConfig, path, "watcher")
    path.write_text("watcher:\n  complete_retry_s: 0\n")
    with pytest.raises(ConfigError, match="watcher.complete_retry_s: must be >="):
        load(WatcherConfig, path, "watcher")


# --- recorder -----------------------------------------------------------------------------------------------------------


def test_recorder_copies_exactly_and_keeps_every_different_file(tmp_path, siemens_export_dir):
    recorder = DicomRecorder(tmp_path / "session")
    first = siemens_export_dir / "001_000013_000001.dcm"
    copy = recorder.record(first, series=13, volume=1, sop_uid="1.2.3")
    assert copy.path == tmp_path / "session" / "sourcedata" / "dicom" / first.name
    assert copy.path.read_bytes() == first.read_bytes() and not copy.already_present

    again = recorder.record(first, series=13, volume=1)  # the same file re-sent: nothing new to keep
    assert again.already_present and again.path == copy.path

    other = tmp_path / first.name  # same name, different content (a re-export): kept beside, not overwritten
    other.write_bytes((siemens_export_dir / "001_000013_000002.dcm").read_bytes())
    second = recorder.record(other, series=13, volume=2)
    assert second.path.name == "001_000013_000001__2.dcm"
    assert copy.path.read_bytes() == first.read_bytes() and second.path.read_bytes() == other.read_bytes()

    broken = recorder.record(siemens_export_dir / "trunc_001_000013_000005.dcm", status="incomplete")
    assert broken.path.parent == recorder.rejected_dir

    manifest = recorder.read_manifest()
    assert [(m["recorded"], m["status"], m["already_present"]) for m in manifest] == [
        ("001_000013_000001.dcm", "accepted", False),
        ("001_000013_000001.dcm", "accepted", True),
        ("001_000013_000001__2.dcm", "accepted", False),
        ("rejected/trunc_001_000013_000005.dcm", "incomplete", False),
    ]
    assert manifest[0]["sha256"] == copy.sha256 and manifest[0]["sop_uid"] == "1.2.3"
    # no temporary file is left behind
    assert not list(recorder.dicom_dir.glob(".*.part"))


def test_recorder_errors_name_the_path(tmp_path):
    blocker = tmp_path / "session"
    blocker.write_text("not a folder")
    with pytest.raises(SessionError, match="session"):
        DicomRecorder(blocker)
    recorder = DicomRecorder(tmp_path / "ok")
    with pytest.raises(SessionError, match="missing.dcm"):
        recorder.record(tmp_path / "missing.dcm")
