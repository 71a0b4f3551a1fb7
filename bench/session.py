"""End-to-end benchmark of a live session: latency from a volume being written to its result on the console, and the
memory of each process over a long replay.

Run from the repository root (after ``rt-mindeye demo --out runs/demo``, whose phantom and bundle it reuses)::

    python bench/session.py                       # latency at TR 1.5 s (one live run) + 2-hour replay at high speed
    python bench/session.py --quick               # a few minutes: faster TR, a 20-minute session
    python bench/session.py --demo-dir runs/demo --hours 2 --speed 40

Latency: the scanner emulator writes the live run into the export folder at the TR; the scanner host and the decoder
run as separate processes on loopback; this process subscribes like the console and timestamps every result. For each
trial estimate, latency = arrival of its result at the console - the time the last volume it used was written.
Retrieval comes with every estimate; the blurry reconstruction (the CPU path) with the same message; unCLIP
reconstruction needs a GPU and its weights and is reported as not measured when absent.

Memory: the live runs are re-issued with new series numbers until the session lasts ``--hours`` at the TR, replayed
at ``--speed`` x real time; the resident memory (VmRSS) of the scanner host, decoder and console processes is sampled
every second. Flat means: the growth from the first to the last tenth of the replay is small against the total.

Prints a table and writes ``bench/results/session.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def write_config(path: Path, demo: Path, session_dir: Path, export: Path, events: Path, first_live_run: int,
                 live_runs: int, port_base: int) -> Path:
    import yaml

    ports = {name: port_base + i for i, name in enumerate(
        ("port_trials", "port_scanner_pub", "port_scanner_snapshot", "port_stimulus", "port_decoder_pub",
         "port_decoder_snapshot", "port_decoder_status", "port_feedback", "port_scanner_control"))}
    config = {
        "session": {"id": "bench", "subject": "phantom01", "dir": str(session_dir), "watch_dir": str(export),
                    "bundle": str(demo / "bundle"), "events_dir": str(events),
                    "stimuli_dir": str(demo / "phantom" / "stimuli"), "first_live_run": first_live_run,
                    "live_runs": live_runs, "run_end_timeout_s": 3.0, "min_free_gb": 0.0},
        "transport": {"journal_fsync": True, **ports},
        "decoder": {"device": "cpu"},
        "console": {"headless": True},
    }
    path.write_text(yaml.safe_dump(config))
    return path


from rt_mindeye.process import cli_path  # noqa: E402
from rt_mindeye.runtime.launcher import terminate  # noqa: E402
from rt_mindeye.timing import percentiles  # noqa: E402


def spawn(service: str, config: Path, log: Path) -> subprocess.Popen:
    from rt_mindeye.runtime.launcher import spawn as spawn_service

    return spawn_service(service, config, log.parent, *(["--headless"] if service == "console" else []))


class ResultClock:
    """Subscribes to the decoder like a console and records when each result arrives."""

    def __init__(self, config_path: Path):
        from rt_mindeye.runtime.config import load_session_config
        from rt_mindeye.runtime.console_service import console_sources
        from rt_mindeye.transport.pubsub import SnapshotSubscriber

        self.subscriber = SnapshotSubscriber(console_sources(load_session_config(config_path)))
        self.arrivals: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        from rt_mindeye.transport.messages import DecodeResult

        while not self._stop.is_set():
            delivery = self.subscriber.recv(0.1)
            if delivery is not None and isinstance(delivery.message, DecodeResult) and not delivery.from_snapshot:
                self.arrivals.append((time.time(), delivery.message))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.subscriber.close()


def live_files(demo: Path) -> tuple[list[Path], list[int], float]:
    from rt_mindeye.ingest.config import WatcherConfig

    manifest = json.loads((demo / "phantom" / "session.json").read_text())
    live = [r for r in manifest["runs"] if not r["calibration"]]
    series = {r["series_number"] for r in live}
    watcher = WatcherConfig()
    files = sorted(p for p in (demo / "phantom" / "dicom").iterdir()
                   if watcher.parse_name(p.name) and watcher.parse_name(p.name)[0] in series)
    return files, [r["run"] for r in live], float(manifest["tr"])


def run_latency(demo: Path, work: Path, tr_speed: float, port_base: int) -> dict:
    """One pass over the live runs at the TR / tr_speed; results timestamped on arrival at the console."""
    from rt_mindeye.replay.emulator import ScannerEmulator

    files, runs, tr = live_files(demo)
    session_dir, export = work / "latency_session", work / "latency_export"
    export.mkdir(parents=True)
    config = write_config(work / "latency.yaml", demo, session_dir, export, demo / "phantom" / "events", runs[0],
                          len(runs), port_base)
    (session_dir / "logs").mkdir(parents=True, exist_ok=True)
    decoder = spawn("decoder", config, session_dir / "logs" / "decoder.out")
    scanner = spawn("scanner", config, session_dir / "logs" / "scanner.out")
    clock = ResultClock(config)
    time.sleep(3.0)
    emulator = ScannerEmulator(files, export, tr=tr, speed=tr_speed, restamp_acquisition=True)
    emulator.run()
    scanner.wait(timeout=120 + len(files) * tr / tr_speed)
    time.sleep(3.0)
    terminate((decoder, scanner))
    clock.close()
    step = tr / tr_speed
    written = [(t, m) for t, m in clock.arrivals]
    # acquisition_time of the last volume used = its write time - one (accelerated) TR (restamped by the emulator)
    to_result = [t - (m.acquisition_time + step) for t, m in written]
    first = {}
    for t, m in written:
        first.setdefault((m.run, m.trial), t - (m.acquisition_time + step))
    timings = [json.loads(line) for line in (session_dir / "derivatives/rt-mindeye/timings.jsonl").open()]
    return {
        "tr_s": tr / tr_speed, "volumes": len(files), "estimates": len(written), "trials": len(first),
        "volume_written_to_processed_s": percentiles(r["done"] - r["acquired"] - step for r in timings),
        "volume_written_to_result_at_console_s": percentiles(to_result),
        "first_estimate_to_console_s": percentiles(first.values()),
        "retrieval_ms": percentiles(m.stage_ms.get("retrieval_ms") for _, m in written),
        "blurry_reconstruction_ms": percentiles(m.stage_ms.get("blurry_ms") for _, m in written),
        "unclip_reconstruction": "not measured: no GPU / SDXL-unCLIP weights on this machine",
    }


def long_replay_source(demo: Path, work: Path, hours: float) -> tuple[Path, Path, int, float, int]:
    """Live runs re-issued under new series numbers until the session lasts ``hours``; events per run ordinal."""
    import pydicom

    from rt_mindeye.ingest.config import WatcherConfig

    files, runs, tr = live_files(demo)
    watcher = WatcherConfig()
    by_series: dict[int, list[Path]] = {}
    for p in files:
        by_series.setdefault(watcher.parse_name(p.name)[0], []).append(p)
    source, events = work / "long_source", work / "long_events"
    source.mkdir()
    events.mkdir()
    n_volumes = int(hours * 3600 / tr)
    written, ordinal, series = 0, 0, 100
    templates = [(s, sorted(v), run) for (s, v), run in zip(sorted(by_series.items()), runs)]
    while written < n_volumes:
        _, paths, run = templates[ordinal % len(templates)]
        ordinal += 1
        series += 1
        shutil.copy(demo / "phantom" / "events" / f"run-{run:02d}_events.tsv",
                    events / f"run-{ordinal:02d}_events.tsv")
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.SeriesNumber = series
            ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(series)])
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(series), path.name])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            volume = int(watcher.parse_name(path.name)[1])
            ds.save_as(source / watcher.format_name(series, volume), enforce_file_format=True)
            written += 1
    return source, events, ordinal, tr, written


def run_memory(demo: Path, work: Path, hours: float, speed: float, port_base: int) -> dict:
    from rt_mindeye.replay.emulator import ScannerEmulator

    source, events, n_runs, tr, n_volumes = long_replay_source(demo, work, hours)
    session_dir, export = work / "memory_session", work / "memory_export"
    export.mkdir(parents=True)
    config = write_config(work / "memory.yaml", demo, session_dir, export, events, 1, n_runs, port_base)
    (session_dir / "logs").mkdir(parents=True, exist_ok=True)
    procs = {name: spawn(name, config, session_dir / "logs" / f"{name}.out")
             for name in ("decoder", "scanner", "console")}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
    stop = threading.Event()

    def sample():
        t0 = time.time()
        while not stop.wait(1.0):
            for name, proc in procs.items():
                value = rss_mb(proc.pid)
                if value is not None:
                    samples[name].append((time.time() - t0, value))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(3.0)
    started = time.time()
    emulator = ScannerEmulator(source, export, tr=tr, speed=speed)
    # Keep the export folder from growing without bound, as a scanner share's clean-up would.
    emulator.run()
    procs["scanner"].wait(timeout=300 + n_volumes * tr / speed)
    wall = time.time() - started
    time.sleep(3.0)
    stop.set()
    sampler.join(5)
    terminate(list(procs.values()))
    report = {"session_hours": n_volumes * tr / 3600, "volumes": n_volumes, "runs": n_runs, "speed": speed,
              "wall_s": wall, "processes": {}}
    for name, series in samples.items():
        if len(series) < 10:
            continue
        values = np.array([v for _, v in series])
        tenth = max(1, len(values) // 10)
        early, late = float(np.median(values[tenth:2 * tenth])), float(np.median(values[-tenth:]))
        report["processes"][name] = {"rss_start_mb": early, "rss_end_mb": late, "rss_max_mb": float(values.max()),
                                     "growth_mb": late - early,
                                     "growth_mb_per_session_hour": (late - early) / max(report["session_hours"], 1e-9)}
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=cli_path, default=REPO / "runs" / "demo",
                        help="output of `rt-mindeye demo` (its phantom and bundle are reused)")
    parser.add_argument("--hours", type=float, default=2.0, help="session length of the memory replay")
    parser.add_argument("--speed", type=float, default=40.0, help="replay speed of the memory run")
    parser.add_argument("--latency-speed", type=float, default=1.0, help="1 = real time at the TR")
    parser.add_argument("--quick", action="store_true", help="latency at 4x, a 20-minute session at 40x")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=cli_path, default=REPO / "bench" / "results" / "session.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.latency_speed, args.hours = 4.0, 1 / 3
    if not (args.demo_dir / "bundle" / "bundle.json").exists():
        print(f"no calibrated phantom in {args.demo_dir}: run `rt-mindeye demo --out {args.demo_dir}` first",
              file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="rtm-bench-session-"))
    try:
        latency = run_latency(args.demo_dir, work, args.latency_speed, 48000)
        memory = None if args.skip_memory else run_memory(args.demo_dir, work, args.hours, args.speed, 48100)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"end-to-end session (TR {latency['tr_s']:.3g} s; {platform.node()}, "
                        f"{os.cpu_count()} cores)")
    for column in ("measure", "p50", "p99", "n"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    for key, value in latency.items():
        if isinstance(value, dict):
            scale = 1.0
            table.add_row(key, *(f"{value[k] * scale:.3f}" if value[k] is not None else "-" for k in ("p50", "p99")),
                          str(value["n"]))
    console = Console()
    console.print(table)
    if memory:
        mem = Table(title=f"memory over a {memory['session_hours']:.2f} h session replayed at {memory['speed']:g}x "
                          f"({memory['volumes']} volumes, {memory['runs']} runs, {memory['wall_s']:.0f} s)")
        for column in ("process", "RSS start MB", "RSS end MB", "max MB", "growth MB / session h"):
            mem.add_column(column)
        for name, stats in memory["processes"].items():
            mem.add_row(name, f"{stats['rss_start_mb']:.0f}", f"{stats['rss_end_mb']:.0f}",
                        f"{stats['rss_max_mb']:.0f}", f"{stats['growth_mb_per_session_hour']:+.1f}")
        console.print(mem)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"node": platform.node(), "cpus": os.cpu_count(),
                                                "python": platform.python_version()},
                                    "latency": latency, "memory": memory}, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
