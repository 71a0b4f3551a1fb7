"""``rt-mindeye phantom`` end to end on a tiny session."""

from __future__ import annotations

import json

from rt_mindeye.cli import main


def test_cli_writes_a_session(tmp_path, capsys):
    out = tmp_path / "phantom"
    code = main(["phantom", str(out), "--runs", "2", "--calibration-runs", "1", "--seed", "4", "--set",
                 "trials_per_run=3", "--set", "repeated_images=1", "--set", "repeats=2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "session.json").read_text())
    assert manifest["seed"] == 4 and manifest["calibration_runs"] == [0]
    assert len(list((out / "dicom").glob("001_*.dcm"))) == summary["volumes"] == sum(
        r["n_volumes"] for r in manifest["runs"])
    assert len(list((out / "events").glob("run-*_events.tsv"))) == 2
    # Another study (other seed) into the same folder is refused unless asked to overwrite; the same study is
    # simply rewritten (an interrupted write can be repeated).
    assert main(["phantom", str(out), "--runs", "1", "--set", "trials_per_run=2", "--set", "repeated_images=0"]) == 2
    assert "another study" in capsys.readouterr().err
    assert main(["phantom", str(out), "--runs", "1", "--seed", "4", "--set", "trials_per_run=2", "--set",
                 "repeated_images=0"]) == 0
    manifest = json.loads((out / "session.json").read_text())
    assert len(list((out / "dicom").glob("001_*.dcm"))) == manifest["runs"][0]["n_volumes"]
    assert main(["phantom", str(out), "--runs", "1", "--set", "trials_per_run=2", "--set", "repeated_images=0",
                 "--overwrite"]) == 0
    manifest = json.loads((out / "session.json").read_text())
    assert len(list((out / "dicom").glob("001_*.dcm"))) == manifest["runs"][0]["n_volumes"]


def test_cli_rejects_bad_settings(tmp_path, capsys):
    assert main(["phantom", str(tmp_path), "--set", "motion_max_mm=-1"]) == 2
    assert "motion_max_mm" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path), "--set", "novalue"]) == 2
