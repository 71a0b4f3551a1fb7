"""What the service loops share: their log file, the resolved configuration they record, poll and state constants."""

from __future__ import annotations

import logging

from rt_mindeye.config import to_mapping
from rt_mindeye.runtime.config import SessionConfig
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.transport.protocol import STATE_SESSION_DONE

__all__ = ["POLL_S", "STATE_SESSION_DONE", "setup_logging", "save_resolved_config"]

POLL_S = 0.1


def setup_logging(layout: SessionLayout, service: str, level: int = logging.INFO) -> None:
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(layout.logs_dir / f"{service}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("rt_mindeye")
    root.setLevel(level)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in root.handlers):
        root.addHandler(handler)


def save_resolved_config(config: SessionConfig, layout: SessionLayout) -> None:
    import yaml

    layout.config_yaml.write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))
