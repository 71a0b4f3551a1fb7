"""A calibrated phantom session shared by the end-to-end tests: real DICOMs, real GLM fit, a tiny fine-tuned model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml


EPHEMERAL_PORTS_FROM = 32768


@dataclass(frozen=True)
class CalibratedPhantom:
    root: Path
    phantom_dir: Path
    bundle_dir: Path
    session: object  # PhantomSession
    live_files: tuple[Path, ...]
    live_trials: int


def _tiny_pretrained(path: Path, n_voxels: int, token_shape: tuple[int, int]) -> Path:
    import torch

    from rt_mindeye.model.config import tiny_fields_for
    from rt_mindeye.convert.mindeye2 import save_container
    from rt_mindeye.model.config import MindEyeConfig
    from rt_mindeye.model.mindeye import MindEyeModule

    torch.manual_seed(0)
    seq, dim = token_shape
    fields = dict(token_seq=seq, token_dim=dim)
    fields.update(tiny_fields_for(dim, torch.zeros(1, 3, 28, 28), None))
    fields["blurry_recon"] = False
    config = MindEyeConfig.preset("tiny", [n_voxels], subject_names=("pretrain",), **fields)
    return save_container(path, MindEyeModule(config))


@pytest.fixture(scope="session")
def calibrated_phantom(tmp_path_factory) -> CalibratedPhantom:
    from rt_mindeye.calibration.config import CalibrationConfig
    from rt_mindeye.calibration.workflow import calibrate
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.model.train import TrainConfig
    from rt_mindeye.phantom.config import phantom_config
    from rt_mindeye.phantom.export import write_session
    from rt_mindeye.phantom.session import simulate_session

    root = tmp_path_factory.mktemp("calibrated")
    cfg = phantom_config("small", n_runs=3, calibration_runs=2, trials_per_run=12, repeated_images=6, repeats=2,
                         rest_end_s=9.0, visual_voxels=200)
    session = simulate_session(cfg, subject=1, seed=3)
    phantom_dir = write_session(session, root / "phantom")
    pretrained = _tiny_pretrained(root / "pretrained" / "last.pth", 50, PhantomEmbedder().tokens_shape)
    bundle_dir = root / "bundle"
    calibrate(phantom_dir, bundle_dir, CalibrationConfig(
        subject="phantom01", calibration_runs=2, condition_column="stim_file", anatomical_mask=phantom_dir / "truth" / "visual_mask.nii.gz",
        noise_pool_voxels=300, pretrained=pretrained, holdout_fraction=0.0,
        train=TrainConfig(epochs=1, batch_size=8, time_budget_min=0.0)), dicom_dir=phantom_dir / "dicom",
        session_id="test")
    live_series = session.runs[2].series_number
    live = tuple(sorted(p for p in (phantom_dir / "dicom").iterdir() if p.name.startswith(f"001_{live_series:06d}_")))
    return CalibratedPhantom(root, phantom_dir, bundle_dir, session, live, len(session.trials(2)))


@pytest.fixture(scope="session")
def session_yaml():
    """``make(path, phantom, session_dir, export, port_base, **session_overrides) -> path``."""
    return _write_session_yaml


def _write_session_yaml(path: Path, phantom: CalibratedPhantom, session_dir: Path, export: Path, port_base: int,
                        **session_overrides) -> Path:
    """A session YAML on loopback with its own ports (tests run next to each other)."""
    export.mkdir(parents=True, exist_ok=True)
    # Services bind below the kernel's ephemeral port range (32768-60999 on Linux by default): a port in it can be
    # held for a moment by any outgoing connection on the machine, and a bind then fails. Bases given in 47000-
    # 47999 move to 27000-27999.
    if port_base >= EPHEMERAL_PORTS_FROM:
        port_base -= 20000
    ports = {name: port_base + i for i, name in enumerate(
        ("port_trials", "port_scanner_pub", "port_scanner_snapshot", "port_stimulus", "port_decoder_pub",
         "port_decoder_snapshot", "port_decoder_status", "port_feedback", "port_scanner_control"))}
    session = {"id": "test", "subject": "phantom01", "dir": str(session_dir), "watch_dir": str(export),
               "bundle": str(phantom.bundle_dir), "events_dir": str(phantom.phantom_dir / "events"),
               "stimuli_dir": str(phantom.phantom_dir / "stimuli"), "first_live_run": 3, "live_runs": 1,
               "run_end_timeout_s": 2.0, "min_free_gb": 0.0}
    session.update(session_overrides)
    config = {"session": session, "transport": {"journal_fsync": False, "heartbeat_interval_s": 0.2, **ports},
              "decoder": {"device": "cpu"}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def cli_bundle(calibrated_phantom, tmp_path_factory):
    """A second bundle for the same subject, made by the `rt-mindeye calibrate` command as a process (with another
    seed: another fine-tuned model): ``(bundle_dir, completed process)``."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("cli_bundle")
    config = root / "calibrate.yaml"
    config.write_text(yaml.safe_dump({"calibration": {
        "subject": "phantom01", "calibration_runs": 2, "condition_column": "stim_file",
        "anatomical_mask": str(calibrated_phantom.phantom_dir / "truth" / "visual_mask.nii.gz"),
        "noise_pool_voxels": 300, "pretrained": str(calibrated_phantom.root / "pretrained" / "last.pth"),
        "holdout_fraction": 0.0, "train": {"epochs": 1, "batch_size": 8, "time_budget_min": 0.0, "seed": 7}}}))
    out = root / "bundle"
    done = subprocess.run([sys.executable, "-m", "rt_mindeye", "calibrate", str(calibrated_phantom.phantom_dir),
                           "--config", str(config), "--out", str(out), "--dicom-dir",
                           str(calibrated_phantom.phantom_dir / "dicom")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=root)
    return out, done


@pytest.fixture(scope="session")
def new_series():
    """``make(files, series, dest) -> paths``: copies of a run's DICOMs as another series."""
    return _as_new_series


def _as_new_series(files, series: int, dest: Path) -> tuple[Path, ...]:
    """Copies of a run's DICOMs as another series (a second live run of the same images)."""
    from rt_mindeye.replay.emulator import rewrite_series

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        volume = int(path.stem.rsplit("_", 1)[1])
        target = dest / f"001_{series:06d}_{volume:06d}.dcm"
        target.write_bytes(rewrite_series(path.read_bytes(), path, series, f"2.25.{series}{volume:06d}"))
        out.append(target)
    return tuple(out)
