"""The console service: subscribe to the scanner host and the decoder and show the operator view.

``python -m services.console`` is its process entry point; ``rt-mindeye session`` runs it in the foreground.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from rt_mindeye.runtime.config import SessionConfig
from rt_mindeye.runtime.layout import SessionLayout


def console_sources(config: SessionConfig):
    from rt_mindeye.transport.config import client_security
    from rt_mindeye.transport.pubsub import Source

    t = config.transport
    return [Source("scanner", t.connect_endpoint("scanner_pub"), t.connect_endpoint("scanner_snapshot"),
                   client_security(t, "console", "scanner")),
            Source("decoder", t.connect_endpoint("decoder_pub"), t.connect_endpoint("decoder_snapshot"),
                   client_security(t, "console", "decoder"))]


def run_console(config: SessionConfig, stop: threading.Event | None = None, *, headless: bool | None = None,
                duration_s: float | None = None, until=None):
    """Follow the session until ``stop`` is set, ``duration_s`` has passed or ``until(state)`` holds; returns the
    console's last state."""
    from rt_mindeye.console.runner import OperatorConsole

    s = config.session
    layout = SessionLayout(s.dir)
    console_config = config.console
    if console_config.gallery_dir is None:
        console_config = replace(console_config, gallery_dir=layout.gallery_dir)
    if console_config.stimulus_dir is None and s.stimuli_dir is not None:
        console_config = replace(console_config, stimulus_dir=s.stimuli_dir.parent)
    if headless or (headless is None and console_config.headless):
        _log_to_stdout()
    console = OperatorConsole(console_config, console_sources(config),
                              heartbeat_interval_s=config.transport.heartbeat_interval_s,
                              heartbeat_liveness=config.transport.heartbeat_liveness)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), console.stop()), daemon=True).start()
    try:
        return console.run(duration_s=duration_s, headless=headless, until=until)
    finally:
        console.close()


def _log_to_stdout() -> None:
    """A headless console's lines go to standard output (once per process)."""
    import logging
    import sys

    logger = logging.getLogger("rt_mindeye.console")
    if not any(getattr(h, "rt_mindeye_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.rt_mindeye_console = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
