"""Command-line entry of one service process (``services/*.py`` call :func:`service_main`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.process import cli_path, single_threaded_numerics


def service_main(service: str, argv: list[str] | None = None) -> int:
    single_threaded_numerics()
    parser = argparse.ArgumentParser(prog=f"rt-mindeye-{service}",
                                     description=f"Run the rt-mindeye {service} service alone.")
    parser.add_argument("--config", type=cli_path, required=True, help="session YAML (see docs/configuration.md)")
    parser.add_argument("--headless", action="store_true", help="console: log lines instead of the live view")
    args = parser.parse_args(argv)
    return run_service(service, args.config, headless=args.headless)


def run_service(service: str, config_path, *, headless: bool = False) -> int:
    from rt_mindeye.runtime.config import load_session_config

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        config = load_session_config(config_path)
        if service == "scanner":
            from rt_mindeye.runtime.scanner_service import run_scanner

            summary = run_scanner(config, stop)
        elif service == "decoder":
            from rt_mindeye.runtime.decoder_service import run_decoder

            summary = run_decoder(config, stop)
        elif service == "console":
            from rt_mindeye.runtime.console_service import run_console

            run_console(config, stop, headless=headless or None)
            summary = {}
        else:
            raise ValueError(f"unknown service {service!r}")
    except RtMindEyeError as exc:
        print(f"rt-mindeye {service}: error: {exc}", file=sys.stderr)
        return 2
    if summary:
        print(f"rt-mindeye {service}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
