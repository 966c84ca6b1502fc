"""The machinery behind typed configs: documented fields, strict dict -> dataclass conversion, overrides.

Every config dataclass in the project (the run sections in :mod:`pipeline.config` and each stage's model config)
is frozen and declares its fields with :func:`doc`, so the meaning and unit of every key is introspectable and
errors can name the full dotted key path.

Supported field types: bool, int, float, str, Literal[...], tuple[T, ...], tuple[A, B], X | None, unions of
those (tried in order), nested config dataclasses, and ``Any`` (resolved through `overrides`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation (meaning + unit) in ``metadata['doc']``."""
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def check(condition: bool, key: str, message: str) -> None:
    """Validate one value in a config's ``__post_init__``; `key` is the full dotted path."""
    if not condition:
        raise ConfigError(f"{key} {message}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (annotations are strings under PEP 563)."""
    return typing.get_type_hints(cls)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unknown_key(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else f"; valid keys here: {', '.join(names)}"
    return ConfigError(f"{source}: unknown key '{_join(prefix, key)}'{hint}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit a type (turned into a ConfigError naming the key)."""


def _convert(value: Any, tp: Any, key: str, source: str, overrides: dict[str, type]) -> Any:
    if tp is Any and key in overrides:
        tp = overrides[key]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _Mismatch
        return from_dict(tp, value, source=source, prefix=key, overrides=overrides)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, source, overrides)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        return _convert_tuple(value, typing.get_args(tp), key, source, overrides)
    return _convert_scalar(value, tp)


def _convert_tuple(value: Any, args: tuple, key: str, source: str, overrides: dict[str, type]) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(args) != len(value):
        raise _Mismatch
    return tuple(_convert(v, a, key, source, overrides) for v, a in zip(value, args))


def _convert_scalar(value: Any, tp: Any) -> Any:
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Any:
        return value
    raise TypeError(f"config schema uses unsupported type {tp!r}")


def from_dict(cls: type, data: dict, *, source: str = "<config>", prefix: str = "",
              overrides: dict[str, type] | None = None) -> Any:
    """Build config dataclass `cls` from a plain dict, rejecting unknown keys and wrong types.

    `overrides` maps a full key path to the dataclass that parses a field declared as ``Any``
    (how the stage-specific `model` section gets its schema).
    """
    overrides = overrides or {}
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(cls, str(key), prefix, source)
    kwargs = {}
    for name, value in data.items():
        full = _join(prefix, name)
        try:
            kwargs[name] = _convert(value, hints[name], full, source, overrides)
        except _Mismatch:
            raise ConfigError(f"{source}: {full} expects {_type_name(hints[name])}, "
                              f"got {value!r} ({type(value).__name__})") from None
    for name in names - set(kwargs):
        full = _join(prefix, name)
        if hints[name] is Any and full in overrides:  # absent stage-specific section: all defaults
            kwargs[name] = from_dict(overrides[full], {}, source=source, prefix=full, overrides=overrides)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> Any:
    """Plain-data (YAML-safe) form of a config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def resolve_field_type(cls: type, parts: list[str], prefix: str, source: str) -> Any:
    """The declared type of the field at dotted path `parts` below `cls` (for parsing an override)."""
    if not parts or not parts[0]:
        raise ConfigError(f"{source}: '{prefix}' is a section; name a key inside it, e.g. '{prefix}.KEY=VALUE'")
    hints = field_types(cls)
    if parts[0] not in hints:
        raise _unknown_key(cls, parts[0], prefix, source)
    tp = hints[parts[0]]
    full = _join(prefix, parts[0])
    if len(parts) == 1:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: '{full}' is a section; name a key inside it, e.g. '{full}.KEY=VALUE'")
        return tp
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(f"{source}: '{full}' is a value, not a section; cannot set '{'.'.join([full, *parts[1:]])}'")
    return resolve_field_type(tp, parts[1:], full, source)


def _admits_str(tp: Any) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_admits_str(a) for a in typing.get_args(tp))
    return False


def parse_override_value(text: str, tp: Any, key: str) -> Any:
    """Parse the VALUE of ``--set KEY=VALUE`` for a field of type `tp`.

    For fields that accept a string the text stays verbatim (so '007' stays '007' and a brace pattern such as
    'dir/{a,b}.tar' is not split), unless it is a YAML list '[...]'. Everything else is parsed as YAML ('true',
    '1e-4', '[1, 2]', 'null'), and a bare comma-separated list is accepted for tuple fields. Type checking
    happens afterwards, against the schema.
    """
    if _admits_str(tp) and not text.lstrip().startswith("["):
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}={text}: cannot parse the value") from None
    wants_tuple = any(typing.get_origin(a) is tuple for a in (tp, *typing.get_args(tp)))
    if wants_tuple and isinstance(value, str) and "," in value:
        value = [yaml.safe_load(part) if part.strip() else "" for part in value.split(",")]
    return value
