"""``rt-mindeye replay``: write a recorded session's DICOMs into a folder the way the scanner's export does.

Example::

    rt-mindeye replay session/sourcedata/dicom /mnt/export --tr 1.5 --speed 2 \\
        --partial-writes 0.3 --jitter 0.2 --reorder 0.05 --drop 0.02 --duplicate 0.05 --seed 7 --plan-json plan.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rt_mindeye.config import from_mapping
from rt_mindeye.process import cli_path


SOURCE = "command line"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="replay recorded DICOMs into a folder at the TR, with optional faults",
        description="Copy export files from SRC into DEST one volume per TR (divided by --speed), as the scanner's "
                    "real-time export does, optionally injecting deterministic faults. Files are ordered by "
                    "(series, volume) parsed from the file name pattern.",
    )
    parser.add_argument("src", type=cli_path, help="folder of recorded export files (e.g. <session>/sourcedata/dicom)")
    parser.add_argument("dest", type=cli_path, help="folder to write into (the one the watcher observes)")
    parser.add_argument("--tr", type=float, default=None,
                        help="repetition time in seconds (default: RepetitionTime of the first file)")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed factor (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random fault (default 0)")
    parser.add_argument("--pattern", default=None, help="export file name pattern (default the Siemens one)")
    parser.add_argument("--timing", choices=("tr", "recorded"), default="tr",
                        help="tr: one file per TR; recorded: SRC is a session recorded by the watcher, replayed "
                             "with the arrival times and order it had (re-sends included)")
    faults = parser.add_argument_group("faults (all off by default)")
    faults.add_argument("--partial-writes", type=float, default=0.0, metavar="P",
                        help="probability that a file is written in chunks while held open")
    faults.add_argument("--partial-chunks", type=int, default=4, metavar="N", help="chunks per partial write")
    faults.add_argument("--rename-writes", type=float, default=0.0, metavar="P",
                        help="probability that a file is written under a temporary name, then renamed")
    faults.add_argument("--jitter", type=float, default=0.0, metavar="S",
                        help="largest random delay added to each write, in seconds")
    faults.add_argument("--reorder", type=float, default=0.0, metavar="P",
                        help="probability that a volume swaps places with the next one")
    faults.add_argument("--drop", type=float, default=0.0, metavar="P", help="probability that a volume is lost")
    faults.add_argument("--duplicate", type=float, default=0.0, metavar="P",
                        help="probability that a volume is sent twice (same SOPInstanceUID)")
    faults.add_argument("--restart-series-at", type=int, default=None, metavar="N",
                        help="after N volumes, restart the run under the next series number")
    faults.add_argument("--pause-at", type=int, default=None, metavar="N",
                        help="the share pauses from volume N (0-based) ...")
    faults.add_argument("--pause-trs", type=int, default=0, metavar="K", help="... for K TRs, then a burst")
    parser.add_argument("--restamp-acquisition", action="store_true",
                        help="set each file's acquisition time to when it is written (minus one TR), as a live "
                             "scanner would, so latency from acquisition is meaningful in the replay")
    parser.add_argument("--plan-json", type=cli_path, default=None, help="save the planned schedule as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.set_defaults(func=run)


def _fault_plan(args):
    from rt_mindeye.replay.emulator import FaultPlan

    return from_mapping(FaultPlan, {
        "partial_writes": args.partial_writes, "partial_chunks": args.partial_chunks,
        "rename_writes": args.rename_writes, "jitter_s": args.jitter, "reorder": args.reorder, "drop": args.drop,
        "duplicate": args.duplicate, "restart_series_at": args.restart_series_at, "pause_at": args.pause_at,
        "pause_trs": args.pause_trs,
    }, source=SOURCE, prefix="replay")


def _tr_from_first_file(src: Path, pattern: str) -> float:
    import pydicom

    from rt_mindeye.errors import ConfigError
    from rt_mindeye.replay.emulator import list_export_files

    if not src.is_dir():
        raise ConfigError(SOURCE, "src", f"{src} is not a folder")
    files = list_export_files(src, pattern)
    if not files and (src / "sourcedata" / "dicom").is_dir():  # a session folder given for --timing recorded
        files = list_export_files(src / "sourcedata" / "dicom", pattern)
    if not files:
        raise ConfigError(SOURCE, "tr", f"no export files in {src} to take RepetitionTime from; pass --tr")
    first = files[0][2]
    value = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["RepetitionTime"]).get("RepetitionTime")
    if not value:
        raise ConfigError(SOURCE, "tr", f"{first} has no RepetitionTime; pass --tr")
    return float(value) / 1000.0


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from rt_mindeye.errors import ConfigError
    from rt_mindeye.ingest.config import DEFAULT_PATTERN, compile_pattern
    from rt_mindeye.replay.emulator import ScannerEmulator

    console = Console(stderr=True)
    pattern = args.pattern or DEFAULT_PATTERN
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        raise ConfigError(SOURCE, "pattern", str(exc)) from exc
    if args.speed <= 0:
        raise ConfigError(SOURCE, "speed", f"must be positive, got {args.speed}")
    tr = args.tr if args.tr is not None else _tr_from_first_file(args.src, pattern)
    if tr <= 0:
        raise ConfigError(SOURCE, "tr", f"must be positive, got {tr}")
    emulator = ScannerEmulator(args.src, args.dest, tr=tr, speed=args.speed, faults=_fault_plan(args),
                               seed=args.seed, pattern=pattern, timing=args.timing,
                               restamp_acquisition=args.restamp_acquisition)
    plan = emulator.plan()
    if args.plan_json is not None:
        plan.to_json(args.plan_json)

    console.print(f"replay plan: {len(plan.sends)} sends over {plan.duration_s:.1f} s (TR {tr:g} s, speed "
                  f"{args.speed:g}, seed {args.seed})")
    table = Table()
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, count in sorted(plan.counts().items()):
        table.add_row(key, str(count))
    console.print(table)
    if args.dry_run:
        for send in plan.sends:
            console.print(f"{send.start_s:8.3f} s  {send.kind:9s} {send.name}  {' '.join(send.faults)}")
        return 0

    total = sum(1 for s in plan.sends if s.kind != "drop")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=console) as progress:
        task = progress.add_task(f"replaying into {args.dest}", total=total, last="")

        def on_progress(send, done, _total):
            faults = f" [yellow]{' '.join(send.faults)}[/]" if send.faults else ""
            progress.update(task, completed=done, last=f"{send.name}{faults}")

        emulator.run(on_progress=on_progress)
    console.print(f"wrote {len(emulator.sent)} files into {args.dest}")
    return 0
