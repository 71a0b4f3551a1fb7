"""The command line: help lists the commands; expected errors are one line with exit status 2; paths typed on it
are relative to the working directory."""

from __future__ import annotations

import subprocess
import sys

from rt_mindeye.cli import build_parser, main
from rt_mindeye.errors import ConfigError


def test_help_runs_in_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "rt_mindeye", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "rt-mindeye" in done.stdout


def test_expected_errors_print_one_line(capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]  # the sub-command registry

    def boom(args):
        raise ConfigError("configs/x.yaml", "watcher.tr_s", "must be >= 0.1, got 0")

    probe = sub.add_parser("probe-error")
    probe.set_defaults(func=boom)
    args = parser.parse_args(["probe-error"])
    # Drive main()'s error path with the prepared parser by calling the handler like main() does.
    from rt_mindeye import cli

    original = cli.build_parser
    cli.build_parser = lambda: parser
    try:
        status = main(["probe-error"])
    finally:
        cli.build_parser = original
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == "rt-mindeye probe-error: error: configs/x.yaml: watcher.tr_s: must be >= 0.1, got 0"
    assert args.func is boom


def _actions(parser):
    """Every argument of a parser and of its sub-commands, recursively."""
    import argparse

    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def test_no_command_line_path_is_left_relative():
    # A bare pathlib.Path keeps a relative path relative, which changes meaning once it is written into a generated
    # session YAML (resolved against the YAML's folder): every path argument goes through cli_path.
    from pathlib import Path

    from rt_mindeye.process import cli_path

    typed = [a for a in _actions(build_parser()) if a.type is not None]
    assert any(a.type is cli_path for a in typed)
    assert not [a.dest for a in typed if a.type is Path]


def test_relative_paths_on_the_command_line_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["calibrate", "sessions/s1", "--out", "bundles/b1", "--config", "../x.yaml"])
    assert args.session_dir == tmp_path / "sessions" / "s1"
    assert args.out == tmp_path / "bundles" / "b1"
    assert args.config.is_absolute() and args.config.resolve() == (tmp_path.parent / "x.yaml").resolve()
    assert build_parser().parse_args(["demo"]).out == tmp_path / "runs" / "demo"


def test_bench_session_demo_dir_given_relative_reaches_the_generated_config(tmp_path, monkeypatch):
    # `python bench/session.py --demo-dir runs/demo` wrote "runs/demo/bundle" into a config in a temporary folder,
    # where it resolved against that folder: both services then said "not a calibration bundle".
    import importlib.util
    from pathlib import Path

    from rt_mindeye.runtime.config import load_session_config

    path = Path(__file__).resolve().parents[2] / "bench" / "session.py"
    spec = importlib.util.spec_from_file_location("bench_session_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    args = bench.build_parser().parse_args(["--demo-dir", "runs/demo"])
    generated = tmp_path / "elsewhere"
    generated.mkdir()
    config_path = bench.write_config(generated / "latency.yaml", args.demo_dir, generated / "session",
                                     generated / "export", args.demo_dir / "phantom" / "events", 2, 1, 48000)
    config = load_session_config(config_path)
    assert config.session.bundle == tmp_path / "runs" / "demo" / "bundle"
    assert config.session.stimuli_dir == tmp_path / "runs" / "demo" / "phantom" / "stimuli"
