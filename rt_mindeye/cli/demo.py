"""`rt-mindeye demo`: the whole system on the built-in phantom."""

from __future__ import annotations

import argparse

from rt_mindeye.process import cli_path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="phantom -> shared model -> calibrate -> live runs through all services -> summary",
        description="Run the whole system on a simulated subject: make the phantom session, take the shipped shared "
                    "tiny model (or pretrain one), calibrate on the first runs, run the remaining runs live through "
                    "the scanner host, decoder and console at an accelerated TR, and write DIR/summary.json and "
                    "DIR/grid.png.")
    parser.add_argument("--out", type=cli_path, default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--speed", type=float, default=8.0, help="replay speed of the live runs (x real time)")
    parser.add_argument("--pretrain-minutes", type=float, default=None,
                        help="pretrain the shared model in-session within this many minutes (default: the shared "
                             "model shipped with the package, pretrained beforehand with the demo's recipe)")
    parser.add_argument("--finetune-minutes", type=float, default=2.5, help="time budget of the fine-tuning")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="every step and process at toy sizes with seconds of training (a smoke run in well under "
                             "a minute; its retrieval figures mean nothing)")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--live", dest="live", action="store_true", default=None, help="full-screen console")
    view.add_argument("--headless", dest="live", action="store_false", help="log lines instead of the live console")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rt_mindeye.runtime.demo import DemoOptions, quick_options, run_demo

    options = DemoOptions(out=args.out, speed=args.speed, pretrain_budget_min=args.pretrain_minutes,
                          finetune_budget_min=args.finetune_minutes, seed=args.seed, live_console=args.live)
    summary = run_demo(quick_options(options) if args.quick else options)
    return 0 if summary["trials_decoded"] > 0 else 1
