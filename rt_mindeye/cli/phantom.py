"""``rt-mindeye phantom``: simulate a subject's session and write it as a Siemens real-time export plus ground truth.

Examples::

    rt-mindeye phantom out/ --preset small
    rt-mindeye phantom out/ --preset realistic --subject 3 --seed 7 --runs 11 --calibration-runs 3
    rt-mindeye phantom out/ --preset small --xa --set trials_per_run=8 --set motion_max_mm=0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rt_mindeye.errors import ConfigError
from rt_mindeye.process import cli_path



def _parse_set(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as YAML scalars/lists (``3``, ``0.5``, ``true``, ``[32, 32, 16]``)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", item, "expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rt_mindeye.phantom import phantom_config, simulate_session, write_session

    overrides = _parse_set(args.set or [])
    if args.runs is not None:
        overrides["n_runs"] = args.runs
    if args.calibration_runs is not None:
        overrides["calibration_runs"] = args.calibration_runs
    elif args.runs is not None:
        # Keep the preset's calibration count unless it no longer fits.
        from rt_mindeye.phantom.config import PRESETS

        preset = PRESETS.get(args.preset)
        if preset is not None and preset.calibration_runs > args.runs:
            overrides["calibration_runs"] = args.runs
    if "n_runs" in overrides and "repeats" not in overrides:
        from rt_mindeye.phantom.config import PRESETS

        preset = PRESETS.get(args.preset)
        if preset is not None and preset.repeats > overrides["n_runs"]:
            overrides["repeats"] = overrides["n_runs"]
    config = phantom_config(args.preset, **overrides)
    console = Console(stderr=True)
    out = Path(args.out)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task("subject and design", total=None)

        def report(step: str, done: int, total: int) -> None:
            progress.update(task, description=step, completed=done, total=total)

        session = simulate_session(config, subject=args.subject, seed=args.seed, progress=report)
        progress.update(task, description="writing DICOM", completed=0, total=None)
        write_session(session, out, xa=args.xa, progress=report, overwrite=args.overwrite)
    elapsed = time.perf_counter() - started
    n_volumes = sum(r.n_volumes for r in session.runs)
    console.print(f"[green]phantom written[/green] to {out}: subject {args.subject}, seed {args.seed}, "
                  f"{session.n_runs} runs ({len(session.calibration_runs)} calibration), {n_volumes} volumes "
                  f"{'(XA enhanced)' if args.xa else '(mosaic)'}, {session.subject.n_voxels} visual voxels, "
                  f"{len(session.stimuli)} images, {elapsed:.1f} s")
    if args.json:
        print(json.dumps({"out": str(out), "runs": session.n_runs, "volumes": n_volumes,
                          "visual_voxels": session.subject.n_voxels, "seconds": round(elapsed, 2)}))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantom", help="simulate a session and write it as Siemens DICOM + ground truth",
        description="Simulate a subject's fMRI session (images, BOLD responses, noise, head motion) and write it "
                    "as a Siemens real-time export (one DICOM per volume) with events, stimuli and ground truth. "
                    "Layout: see docs/phantom.md.")
    parser.add_argument("out", type=cli_path, help="output folder (created)")
    parser.add_argument("--preset", default="small", choices=["small", "realistic"], help="size preset (default small)")
    parser.add_argument("--subject", type=int, default=1, help="subject number: anatomy, masks, tuning (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="session seed: design, noise, motion (default 0)")
    parser.add_argument("--runs", type=int, default=None, help="number of runs (default: the preset's)")
    parser.add_argument("--calibration-runs", type=int, default=None,
                        help="how many leading runs are calibration runs (default: the preset's)")
    parser.add_argument("--xa", action="store_true", help="write Siemens XA Enhanced MR multi-frame files")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override any phantom config field (repeatable), e.g. --set motion_max_mm=0")
    parser.add_argument("--overwrite", action="store_true", help="replace the DICOM files of an earlier session in OUT")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(func=run)
