"""`rt-mindeye session`: start the scanner host, the decoder and the console on this machine, and supervise them.

The scanner host and the decoder run as child processes (``python -m services.scanner`` / ``services.decoder``),
each in its own process group, so a Ctrl-C at the terminal reaches the launcher alone and the shutdown is ordered;
the console runs in this process, in the foreground. A decoder that dies (a crash, ``kill -9``) is restarted (with a
back-off) and catches up from the scanner host's journal: nothing the scanner sent is lost; one that exits normally is
not restarted. The session ends when the scanner host exits (its ``session.live_runs`` are done), or on Ctrl-C
(SIGINT) or SIGTERM: then the scanner host is stopped first (it ends the run in progress, journals its final
estimates and waits for the decoder to acknowledge them), and the decoder after it, so every journal is complete when
the launcher returns. Each child's pid is in ``SESSION/logs/<service>.pid`` while it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.service_support import setup_logging

log = logging.getLogger("rt_mindeye.launcher")

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
MAX_RESTARTS = 20
STOP_TIMEOUT_S = 20.0


class ServiceThread(threading.Thread):
    """A service entry point (``run_scanner(config, stop)``, ``run_decoder``, ...) on a thread of this process:
    for embedding a service (a notebook, a test) instead of spawning it. ``finish`` stops it through its stop event,
    waits at most ``timeout_s`` and re-raises what the service raised."""

    def __init__(self, target, config):
        super().__init__(daemon=True, name=getattr(target, "__name__", "service"))
        self.stop_event = threading.Event()
        self.target_fn, self.config = target, config
        self.result, self.error = None, None

    def run(self):
        try:
            self.result = self.target_fn(self.config, self.stop_event)
        except BaseException as exc:  # handed to the caller by finish()
            self.error = exc

    def finish(self, timeout_s: float = 30.0):
        self.stop_event.set()
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {timeout_s:g} s")
        if self.error is not None:
            raise self.error
        return self.result


def spawn(service: str, config_path: Path, log_dir: Path, *extra_args: str) -> subprocess.Popen:
    """Start ``python -m services.<service> --config FILE`` with its output in ``log_dir/<service>.stdout`` and its
    pid in ``log_dir/<service>.pid``, in its own process group (signals come from its parent, in order)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{service}.stdout").open("a") as out:
        # Few malloc arenas: the services' threads otherwise each grow their own, and resident memory creeps up.
        env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_ARENA_MAX="2")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # per-volume work is small: threads only add contention
        proc = subprocess.Popen([sys.executable, "-m", f"services.{service}", "--config", str(config_path),
                                 *extra_args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (log_dir / f"{service}.pid").write_text(f"{proc.pid}\n")
    return proc


def terminate(processes, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process still running, wait up to ``timeout_s`` for each, then kill it."""
    for proc in processes:
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for proc in processes:
        if proc is None:
            continue
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop within %.0f s of SIGTERM: killed", proc.pid, timeout_s)
            proc.kill()
            proc.wait(timeout=timeout_s)


def terminate_in_order(processes, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the processes one after the other, each after the previous one exited (upstream first)."""
    for proc in processes:
        terminate((proc,), timeout_s)


class Supervisor:
    """Keeps the decoder running while the scanner host runs; restarts it when it dies."""

    def __init__(self, config_path: Path, log_dir: Path):
        self.config_path = config_path
        self.log_dir = log_dir
        self.scanner: subprocess.Popen | None = None
        self.decoder: subprocess.Popen | None = None
        self.decoder_restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Supervisor":
        self.decoder = spawn("decoder", self.config_path, self.log_dir)
        self.scanner = spawn("scanner", self.config_path, self.log_dir)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if self.scanner is not None and self.scanner.poll() is not None:
                return
            if self.decoder is not None and self.decoder.poll() is not None:
                if self.decoder.returncode == 0:
                    log.info("the decoder stopped normally: not restarted")
                    return
                if self.decoder_restarts >= MAX_RESTARTS:
                    log.error("decoder died %d times: not restarting", self.decoder_restarts)
                    return
                wait = RESTART_BACKOFF_S[min(self.decoder_restarts, len(RESTART_BACKOFF_S) - 1)]
                log.warning("decoder exited with status %s: restarting in %.0f s (it catches up from the journal)",
                            self.decoder.returncode, wait)
                if self._stop.wait(wait):
                    return
                self.decoder_restarts += 1
                self.decoder = spawn("decoder", self.config_path, self.log_dir)

    def wait_scanner(self, timeout: float | None = None) -> int | None:
        try:
            return self.scanner.wait(timeout=timeout) if self.scanner is not None else None
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """The scanner host first (it journals the run's final estimates and waits for their acknowledgement), then
        the decoder."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        terminate_in_order((self.scanner, self.decoder))


def run_session(config_path: str | Path, *, headless: bool | None = None) -> int:
    """Start everything, show the console until the scanner host is done, stop everything."""
    from rt_mindeye.runtime.console_service import run_console

    config_path = Path(config_path).resolve()
    config = load_session_config(config_path)
    layout = SessionLayout(config.session.dir).create()
    setup_logging(layout, "launcher")
    supervisor = Supervisor(config_path, layout.logs_dir).start()
    stop_console = threading.Event()

    def stop_when_scanner_ends():
        supervisor.wait_scanner()
        time.sleep(2.0)  # let the last results reach the console
        stop_console.set()

    threading.Thread(target=stop_when_scanner_ends, daemon=True).start()
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a service manager: an ordered shutdown
        previous[signum] = signal.signal(signum, lambda *_: stop_console.set())
    try:
        run_console(config, stop_console, headless=headless)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return supervisor.scanner.returncode if supervisor.scanner is not None else 1
