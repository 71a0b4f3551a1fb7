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
    calibrate.add_argument("--reload", action="store_true",
                           help="then hand the new bundle to the running scanner host and decoder of --config "
                                "(they switch at the next run; see `rt-mindeye reload`)")
    calibrate.set_defaults(func=run_calibrate)

    reload = subparsers.add_parser(
        "reload", help="give the running services a new calibration bundle or reconstruction policy",
        description="Ask the running decoder and scanner host of a session to take a new calibration bundle (and the "
                    "decoder a new reconstruction policy) from the next run, without restarting them. Each validates "
                    "it first; a refused bundle changes nothing. Exit 0 when accepted, 1 when refused, 2 when a "
                    "service does not answer.")
    reload.add_argument("--config", type=cli_path, required=True, help="the session YAML the services run with")
    reload.add_argument("--bundle", type=cli_path, help="new calibration bundle folder (e.g. from `calibrate`)")
    reload.add_argument("--recon-policy", choices=("newest", "skip", "fifo"), help="new reconstruction policy")
    reload.add_argument("--recon-max-pending", type=int, help="reconstructions allowed to wait")
    reload.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service's answer")
    reload.set_defaults(func=run_reload)

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
    if args.reload and not args.config:
        console.print("rt-mindeye calibrate: --reload needs --config (the running session's YAML)")
        return 2
    result = calibrate(args.session_dir, out, calibration, dicom_dir=args.dicom_dir, motion=config.motion,
                       watcher=config.watcher, progress=console.print)
    console.print(result.bundle.report_path.read_text())
    if args.reload:
        return _reload(config, console, bundle=out)
    return 0


def run_reload(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rt_mindeye.runtime.config import load_session_config

    console = Console()
    if args.bundle is None and args.recon_policy is None and args.recon_max_pending is None:
        console.print("rt-mindeye reload: nothing to reload (give --bundle and/or --recon-policy)")
        return 2
    return _reload(load_session_config(args.config), console, bundle=args.bundle, recon_policy=args.recon_policy,
                   recon_max_pending=args.recon_max_pending, timeout_s=args.timeout)


def _reload(config, console, **request) -> int:
    from rt_mindeye.errors import TransportTimeout
    from rt_mindeye.runtime.reload import request_reload

    try:
        answers = request_reload(config, **request)
    except TransportTimeout as exc:
        console.print(f"[bold red]no answer[/]: {exc} (is the session running?)")
        return 2
    for answer in answers:
        if answer.accepted:
            console.print(f"{answer.service}: [green]accepted[/] "
                          + ", ".join(f"{k}={v}" for k, v in answer.details.items()))
        else:
            console.print(f"{answer.service}: [bold red]refused[/]: {answer.details.get('error', '?')} "
                          "(it keeps its current bundle and policy)")
    return 0 if answers and all(a.accepted for a in answers) else 1


def run_preflight(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rt_mindeye.runtime.preflight import FAIL, render, run_preflight as checks_for

    checks = checks_for(args.config)
    Console().print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
