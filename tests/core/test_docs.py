"""The configuration reference is generated from the code: it must match what the code accepts."""

from __future__ import annotations

from pathlib import Path

from rt_mindeye.runtime.configdoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date: python -m rt_mindeye.runtime.configdoc > docs/configuration.md")


def test_every_section_is_documented():
    text = DOC.read_text()
    for section in ("session", "watcher", "motion", "glm", "transport", "decoder", "console", "calibration"):
        assert f"## `{section}`" in text
