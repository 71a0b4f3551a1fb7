"""`rt-mindeye preflight`: every check runs and reports pass/warn/fail with a fix, never a traceback."""

from __future__ import annotations

import time

from rt_mindeye.replay.emulator import ScannerEmulator
from rt_mindeye.runtime.preflight import FAIL, PASS, WARN, run_preflight


def _by_name(checks):
    return {c.name: c for c in checks}


def test_preflight_on_a_calibrated_session(calibrated_phantom, session_yaml, tmp_path):
    export = tmp_path / "export"
    path = session_yaml(tmp_path / "s.yaml", calibrated_phantom, tmp_path / "session", export, 47800)
    checks = _by_name(run_preflight(path))
    assert checks["configuration"].status == PASS
    assert checks["calibration bundle"].status == PASS and "phantom01" in checks["calibration bundle"].detail
    assert checks["decoder checkpoint"].status == PASS
    assert checks["watch folder"].status == PASS
    assert checks["scanner clock"].status == WARN  # no DICOM yet
    assert all(c.status == PASS for name, c in checks.items() if name.startswith("port "))
    # A freshly exported volume, stamped as a live scanner would: the clocks are in step.
    ScannerEmulator(calibrated_phantom.live_files[:1], export, tr=0.1, restamp_acquisition=True).run()
    time.sleep(0.05)
    assert _by_name(run_preflight(path))["scanner clock"].status == PASS


def test_preflight_names_what_is_wrong_and_how_to_fix_it(calibrated_phantom, session_yaml, tmp_path):
    path = session_yaml(tmp_path / "s.yaml", calibrated_phantom, tmp_path / "session", tmp_path / "export", 47900,
                        subject="someone-else")
    (tmp_path / "export").rmdir()
    checks = _by_name(run_preflight(path))
    bundle = checks["calibration bundle"]
    assert bundle.status == FAIL and "someone-else" in bundle.detail and "calibrate" in bundle.fix
    assert checks["watch folder"].status == FAIL and "mount" in checks["watch folder"].fix
    bad = tmp_path / "bad.yaml"
    bad.write_text("session:\n  idd: x\n")
    only = run_preflight(bad)
    assert len(only) == 1 and only[0].status == FAIL and "session.idd" in only[0].detail


def test_preflight_checks_every_ensemble_member(calibrated_phantom, session_yaml, tmp_path):
    import dataclasses
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(calibrated_phantom.bundle_dir, bundle_dir)
    shutil.copy(bundle_dir / "model" / "last.pth", bundle_dir / "model" / "member-02.pth")
    phantom = dataclasses.replace(calibrated_phantom, bundle_dir=bundle_dir)
    path = session_yaml(tmp_path / "s.yaml", phantom, tmp_path / "session", tmp_path / "export", 48000)
    check = _by_name(run_preflight(path))["decoder checkpoint"]
    assert check.status == PASS and "2 ensemble members" in check.detail
    (bundle_dir / "model" / "member-02.pth").write_bytes(b"truncated")
    check = _by_name(run_preflight(path))["decoder checkpoint"]
    assert check.status == FAIL and "member-02.pth" in check.detail
