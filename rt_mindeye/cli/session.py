"""`rt-mindeye session`, `calibrate` and `preflight`: running a real-time session."""

from __future__ import annotations

import argparse

from rt_mindeye.process import cli_path


def register(subparsers) -> None:
    session = subparsers.add_parser(
        "session", help="start the scanner host, decoder and console on this machine",
        description="Start all three services from one session YAML and show the operator console until the scanner "
                    "host is done. Each service also runs alone: python -m services.scanner|decoder|console "
                    "--config FILE.")
    session.add_argument("--config", type=cli_path, required=True, help="session YAML (docs/configuration.md)")
    session.add_argument("--headless", action="store_true", default=None, help="log lines instead of the live view")
    session.set_defaults(func=run_session)

    calibrate = subparsers.add_parser(
        "calibrate", help="calibration runs -> GLM, masks, fine-tuned model: a calibration bundle",
        description="Fit the offline GLM on the session's first runs, choose the decoder's voxels (anatomical mask and "
                    "repeat reliability), fine-tune the pretrained shared model within the time budget, and write a "
                    "versioned calibration bundle with a report.")
    calibrate.add_argument("session_dir", type=cli_path, help="session folder (sourcedata/dicom or dicom/, events/, "
                                                          "stimuli/)")
    calibrate.add_argument("--config", type=cli_path, help="session YAML; its 'calibration', 'motion' and 'watcher' "
                                                       "sections are used")
    calibrate.add_argument("--out", type=cli_path, help="bundle folder (default: the config's session.bundle, else "
                                                    "SESSION_DIR/bundle)")
    calibrate.add_argument("--dicom-dir", type=cli_path, help="where the calibration DICOMs are (default: found in "
                                                          "SESSION_DIR)")
    calibrate.add_argument("--pretrained", type=cli_path, help="shared checkpoint to fine-tune (overrides the config)")
    calibrate.add_argument("--runs", type=int, help="number of calibration runs (overrides the config)")
    calibrate.add_argument("--budget-min", type=float, help="fine-tuning time budget in minutes")
    calibrate.set_defaults(func=run_calibrate)

    preflight = subparsers.add_parser(
        "preflight", help="check everything before the subject goes in",
        description="Config valid, calibration bundle matches the subject, checkpoint loads, GPU and torch-tensorrt, "
                    "ports free, disk space, watch folder visible and writable, scanner clock in step.")
    preflight.add_argument("--config", type=cli_path, required=True)
    preflight.set_defaults(func=run_preflight)


def run_session(args: argparse.Namespace) -> int:
    from rt_mindeye.runtime.launcher import run_session as launch

    return launch(args.config, headless=args.headless)


def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console

    from rt_mindeye.calibration.workflow import calibrate
    from rt_mindeye.runtime.config import SessionConfig, load_session_config

    config = load_session_config(args.config) if args.config else SessionConfig()
    calibration = config.calibration
    if args.pretrained:
        calibration = replace(calibration, pretrained=args.pretrained)
    if args.runs:
        calibration = replace(calibration, calibration_runs=args.runs)
    if args.budget_min is not None:
        calibration = replace(calibration, train=replace(calibration.train, time_budget_min=args.budget_min))
    out = args.out or (config.session.bundle if args.config else args.session_dir / "bundle")
    console = Console()
    result = calibrate(args.session_dir, out, calibration, dicom_dir=args.dicom_dir, motion=config.motion,
                       watcher=config.watcher, progress=console.print)
    console.print(result.bundle.report_path.read_text())
    return 0


def run_preflight(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rt_mindeye.runtime.preflight import FAIL, render, run_preflight as checks_for

    checks = checks_for(args.config)
    Console().print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
