"""Configuration as validated data.

Each stage declares its own section as a frozen dataclass (in its own package) whose fields carry their type, default,
documentation and allowed range through :func:`setting`. :func:`from_mapping` builds such a dataclass from the plain
dict YAML gives and raises :class:`~rt_mindeye.errors.ConfigError` naming the file and the dotted key for an unknown
key, a wrong type or an out-of-range value, so a typo fails at load time rather than deep inside a stage.

Example::

    @dataclass(frozen=True)
    class WatcherConfig:
        poll_interval_s: float = setting(0.1, "seconds between polls of the folder", min=0.001)
        pattern: str = setting("001_{series:06d}_{volume:06d}.dcm", "scanner file name pattern")

    cfg = from_mapping(WatcherConfig, {"poll_interval_s": 0.2}, source="configs/x.yaml", prefix="watcher")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from rt_mindeye.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, doc: str = "", *, min: float | None = None, max: float | None = None,
            choices: tuple | None = None, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with documentation and a validated range or set of choices."""
    metadata = {"doc": doc, "min": min, "max": max, "choices": choices}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, source: str | None, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML scalars/lists to it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, source, key)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(source, key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(source, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"expected a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, source=source, prefix=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(source, key, f"expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, source, key): _coerce(v, vt, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(source, key, f"expected a path, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(source, key, f"expected {_type_name(tp)}, got {value!r}")


def _check_range(value: Any, meta: Mapping, source: str | None, key: str) -> None:
    if value is None:
        return
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(source, key, f"must be one of {list(choices)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(source, key, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(source, key, f"must be <= {hi}, got {value!r}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, *, source: str | Path | None = None,
                 prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, validating every key; missing keys take their defaults."""
    source = str(source) if source is not None else None
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(source, f"{dotted}{name}", f"unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{dotted}{name}"
        if name in data:
            raw = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(raw, Mapping):
                # A nested section overrides its field's default instance, not the section class's defaults.
                base = _field_default(f)
                if base is not None:
                    raw = {**to_mapping(base), **raw}
            value = _coerce(raw, hints[name], source, key)
            _check_range(value, f.metadata, source, key)
            kwargs[name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(source, key, "required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ cross-field checks
        raise ConfigError(source, prefix or cls.__name__, str(exc)) from exc


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def to_mapping(obj: Any) -> Any:
    """Plain YAML-ready data for a config dataclass (paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning syntax errors into :class:`ConfigError` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "<file>", f"cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "<root>", "expected a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load ``cls`` from a YAML file (or one top-level ``section`` of it)."""
    data = read_yaml(path)
    if section is not None:
        data = data.get(section) or {}
    return from_mapping(cls, data, source=path, prefix=section or "")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, documentation) rows for the configuration reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else "(required)")
        rows.append((key, _type_name(tp), to_mapping(default), f.metadata.get("doc", "")))
    return rows
