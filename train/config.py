"""Training configs: TOML files parsed into dataclasses; flags override keys.

A config is a dataclass whose fields are plain values or nested dataclasses
(one per TOML table). `load_config(Cls, path, overrides)` reads the file,
applies dotted overrides such as {"unet.lr": 1e-4}, and rejects unknown keys
with a message that lists the known ones, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from t2i.errors import UsageError

T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UsageError(f"config key {where}{name} must be a table")
            base = dataclasses.asdict(getattr(cls(), name)) if _has_defaults(cls) else {}
            kwargs[name] = _build(hint, {**base, **value}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _has_defaults(cls) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key {key} must be a list")
        return type(value)(value) if origin is list else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise UsageError(f"config key {key} must be {hint.__name__}, got {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Read `path` (TOML) into `cls`, then apply dotted `overrides` (None values are skipped)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    base = dataclasses.asdict(cls())
    merged = _merge(base, data)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(cls, merged, "")


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
