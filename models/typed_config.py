"""YAML → typed dataclass configs with errors that name the bad key.

Why: a misspelt key in a YAML file silently falling back to a default is the most common way a
long run trains the wrong thing. Every config in bmray is a dataclass; `from_dict` builds it from
a plain mapping and refuses unknown keys, wrong types and bad choices with one `ConfigError`
whose message names the full key path (``train.lr``) and, where it helps, the valid choices.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key path."""


def check_choice(path: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {choices}")


def check_int(path: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> None:
    """Raise ConfigError unless ``value`` is an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}: must be <= {maximum}, got {value!r}")


def check_sections(raw: Any, valid: typing.Iterable[str], what: str) -> None:
    """A config file's top level: a mapping whose keys are all sections of ``valid``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys are {sorted(valid)}")


def check_positive(path: str, value: float, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        check_choice(path, value, args)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return origin(_coerce(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(f"{path}.{k}", val_tp, v) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)   # PyYAML reads 1e-3 (no dot) as a string: YAML 1.1 quirk
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], mapping: Any, path: str = "config") -> T:
    """Build dataclass ``cls`` from ``mapping``; unknown keys and wrong types raise ConfigError."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(f"{path}.{name}", hints[name], value)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path}: missing required key(s) {missing}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The inverse of from_dict: a plain, YAML/JSON-serialisable mapping."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``section.key=value`` command-line overrides to a parsed YAML mapping.

    Values are parsed as YAML (``train.lr=1e-3``, ``model.moe=null``, ``data.corpus=a.txt``);
    a missing ``=`` is a ConfigError. Unknown keys are caught later by ``from_dict``.
    """
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        value = yaml.safe_load(text) if text else ""
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        node[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
