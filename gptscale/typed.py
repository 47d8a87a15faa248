"""Typed, frozen dataclasses from plain data (YAML), strictly: an unknown key, a value of the
wrong type or a path that is not a section is a ConfigError naming it; and `section.key=value`
overrides (values parsed as YAML). Knows nothing of gptscale's sections (config.py does)."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Mapping

from gptscale.errors import ConfigError
from gptscale.safe_yaml import load_yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; unknown keys and wrong types are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{path} may not be null")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if kind in (int, str, bool) and type(value) is kind:
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{path}={value!r} has type {type(value).__name__}; expected {names}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.n_layer=4` -> (['model', 'n_layer'], 4); values are parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.strip().split("."), load_yaml(raw, f"--set {text!r}")


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deepcopy_dicts(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = merged
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return merged


def _deepcopy_dicts(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dicts(v) if isinstance(v, Mapping) else v for k, v in data.items()}
