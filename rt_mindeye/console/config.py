"""Configuration of the operator console (section ``console`` of the session YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rt_mindeye.config import setting

__all__ = ["ConsoleConfig", "FIRMM_THRESHOLDS_MM"]

#: FIRMM's framewise-displacement thresholds (mm): the console colours and counts volumes against them.
FIRMM_THRESHOLDS_MM = (0.2, 0.3, 0.4)


@dataclass(frozen=True)
class ConsoleConfig:
    refresh_per_second: float = setting(4.0, "screen refreshes per second", min=0.2, max=30.0)
    fd_window: int = setting(120, "volumes shown in the FD trace", min=8, max=2000)
    latency_window: int = setting(200, "recent samples per stage used for the latency p50/p99", min=2, max=100000)
    trials_shown: int = setting(10, "most recent trials listed on screen", min=1, max=200)
    fd_thresholds_mm: tuple[float, float, float] = setting(FIRMM_THRESHOLDS_MM, "FD thresholds in mm (FIRMM)")
    gallery_dir: Path | None = setting(None, "folder of the HTML gallery and thumbnails; None = no gallery")
    stimulus_dir: Path | None = setting(None, "folder the stim_file names are relative to (seen images)")
    thumbnail_px: int = setting(160, "longest side of gallery thumbnails (pixels)", min=16, max=1024)
    gallery_refresh_s: float = setting(5.0, "seconds between automatic reloads of the gallery page in a browser",
                                       min=1.0)
    headless: bool = setting(False, "log lines instead of a full-screen display (no terminal, e.g. a service)")
