"""Typed, validated configuration.

Every config is a dataclass. `from_dict` builds one from parsed YAML and rejects, before any
work starts, unknown keys and out-of-range or wrong-typed values with a message that names the
dotted key and what is allowed. Field constraints live in the field metadata:
`field(default=..., metadata={"min": 1, "max": 8, "help": "..."})` ("gt": 0 for a bound that is excluded; the
bounds of a list field apply to each item); Literal types give choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the allowed values."""


def close_match(name: Any, allowed) -> str:
    """"; did you mean 'x'?" for the allowed name closest to `name` (a misspelt key), or "" when none is close."""
    m = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {m[0]!r}?" if m else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                          + ", ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: "
                              + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string: accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    md = f.metadata
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_range(f, v, f"{key}[{i}]")
        return
    if "choices" in md and value not in md["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: "
                          + ", ".join(repr(c) for c in md["choices"]))
    if isinstance(value, (int, float)):
        lo, hi, gt = md.get("min"), md.get("max"), md.get("gt")
        if (lo is not None and value < lo) or (gt is not None and value <= gt) or (hi is not None and value > hi):
            low = f"({gt}" if gt is not None else f"[{lo if lo is not None else '-inf'}"
            raise ConfigError(f"{key}: {value!r} is out of range; allowed values: {low}, "
                              f"{hi if hi is not None else 'inf'}]")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, validating every key (see module doc)."""
    name = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; allowed keys: "
                          + ", ".join(sorted(fields)) + (close_match(unknown[0], fields) if len(unknown) == 1 else ""))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for fname, f in fields.items():
        key = f"{prefix}.{fname}" if prefix else fname
        if fname not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        value = _coerce(data[fname], hints[fname], key)
        _check_range(f, value, key)
        kwargs[fname] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)  # cross-field rules; raises ConfigError
    return obj


def to_dict(obj: Any) -> Any:
    """A plain, JSON-ready dict of a (nested) dataclass config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any, n: int = 12) -> str:
    """Short stable hash of a config (canonical JSON), for provenance."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def dicts_in(obj: Any) -> Iterator[dict]:
    """Every mapping in a nested structure of mappings and lists, each before those inside it (a caller may change
    a mapping's values as it gets it: its children are read after)."""
    if isinstance(obj, dict):
        yield obj
        for v in list(obj.values()):
            yield from dicts_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from dicts_in(v)


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge `over` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_overrides(items: list[str] | None) -> dict:
    """`a.b=3` style command-line overrides (values parsed as YAML) into a nested dict."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> T:
    """Read YAML (optional), apply `KEY=VALUE` overrides, validate into `cls`."""
    raw = load_yaml(path) if path else {}
    if data:
        raw = deep_merge(raw, data)
    raw = deep_merge(raw, parse_overrides(overrides))
    return from_dict(cls, raw)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
