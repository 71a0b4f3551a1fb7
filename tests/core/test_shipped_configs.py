"""The YAML files shipped in configs/ load and validate; a broken key is reported with file and dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rt_mindeye.errors import ConfigError
from rt_mindeye.runtime.config import load_session_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    config = load_session_config(path)
    assert config.session.dir.is_absolute()  # resolved against the file's folder


def test_typo_names_file_and_key(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("session:\n  id: x\nwatcher:\n  gap_timeout_trs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_session_config(bad)
    assert info.value.key == "watcher.gap_timeout_trs"
    assert str(bad) in str(info.value)
