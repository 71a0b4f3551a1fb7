"""Config validation: unknown keys, wrong types and out-of-range values fail at load, naming file and key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from rt_mindeye.config import describe, from_mapping, load, read_yaml, setting, to_mapping
from rt_mindeye.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    threshold: float = setting(0.2, "FD threshold (mm)", min=0.0)


@dataclass(frozen=True)
class Section:
    tr_s: float = setting(1.5, "repetition time", min=0.1, max=10.0)
    observer: Literal["native", "polling"] = setting("native", "observer kind")
    runs: int = setting(11, "number of runs", min=1)
    out: Path | None = setting(None, "output folder")
    sizes: tuple[int, ...] = setting((1, 2), "sizes")
    inner: Inner = setting(default_factory=Inner, doc="nested")


def test_defaults_and_coercion():
    cfg = from_mapping(Section, {"tr_s": 2, "out": "x/y", "sizes": [3, 4], "inner": {"threshold": 0.3}})
    assert cfg.tr_s == 2.0 and isinstance(cfg.tr_s, float)
    assert cfg.out == Path("x/y")
    assert cfg.sizes == (3, 4)
    assert cfg.inner.threshold == 0.3
    assert cfg.observer == "native"


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"tr_sec": 1.0}, "sec.tr_sec", "unknown key"),
        ({"tr_s": "fast"}, "sec.tr_s", "expected a number"),
        ({"tr_s": 0.0}, "sec.tr_s", ">= 0.1"),
        ({"observer": "inotify"}, "sec.observer", "one of"),
        ({"runs": 2.5}, "sec.runs", "integer"),
        ({"runs": True}, "sec.runs", "integer"),
        ({"inner": {"threshold": -1}}, "sec.inner.threshold", ">= 0.0"),
        ({"inner": {"thresh": 1}}, "sec.inner.thresh", "unknown key"),
        ({"sizes": [1, "a"]}, "sec.sizes[1]", "integer"),
    ],
)
def test_errors_name_file_and_dotted_key(data, key, words):
    with pytest.raises(ConfigError) as info:
        from_mapping(Section, data, source="configs/x.yaml", prefix="sec")
    assert info.value.key == key
    assert info.value.source == "configs/x.yaml"
    assert words in str(info.value)
    assert str(info.value).startswith("configs/x.yaml: " + key)


def test_yaml_errors_name_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(bad)
    assert "line" in info.value.key and str(bad) in str(info.value)


def test_load_section_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sec:\n  tr_s: 1.0\n  observer: polling\n")
    cfg = load(Section, path, "sec")
    assert cfg.observer == "polling"
    again = from_mapping(Section, to_mapping(cfg))
    assert again == cfg


def test_describe_lists_nested_keys_with_docs():
    rows = {key: (tp, default, doc) for key, tp, default, doc in describe(Section)}
    assert rows["tr_s"][1] == 1.5 and rows["tr_s"][2] == "repetition time"
    assert "inner.threshold" in rows


@dataclass(frozen=True)
class Outer:
    inner: Inner = setting(default_factory=lambda: Inner(threshold=0.4), doc="nested with a non-class default")
    other: float = setting(1.0, "other")


def test_nested_section_overrides_start_from_the_field_default():
    assert from_mapping(Outer, {}).inner.threshold == 0.4
    assert from_mapping(Outer, {"inner": {}}).inner.threshold == 0.4
    assert from_mapping(Outer, {"inner": {"threshold": 0.1}}).inner.threshold == 0.1
