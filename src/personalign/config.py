"""Strict configuration: YAML files and dotted command-line overrides into frozen dataclasses.

Unknown keys are errors (a typo must never be ignored), values are checked against the field types,
and every error names the file, the dotted field and the fix::

    cfg = load_config(RewardConfig, "configs/rm.yaml", ["lr=1e-5", "lora.r=16"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from personalign.errors import ConfigError

T = TypeVar("T")

__all__ = ["finite", "from_dict", "load_config", "nest", "parse_overrides", "require", "to_dict"]


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """Refuse a config value: ``name must be <rule>, got <value>``."""
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def finite(x: Any) -> bool:
    """A real, finite number (booleans are not numbers here)."""
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path(value)
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        value = _onto_default(fields[name], hints[name], value)
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: required field(s) missing: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where}: {exc}") from None


def check_fields(cls: type, data: Any, where: str = "config") -> None:
    """Check the fields ``data`` gives for ``cls`` (known, well-typed, nested ones too) without asking for the
    ones it leaves out: one layer of a config, before the others are merged onto it."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}")
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            check_fields(hints[name], value, f"{where}.{name}")
        else:
            _coerce(value, hints[name], f"{where}.{name}")


def _onto_default(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A partial mapping for a nested dataclass field completes the field's own default, not the nested
    class's: ``sampling.max_new_tokens=32`` keeps a recipe's sampling temperature."""
    if not isinstance(value, dict) or not dataclasses.is_dataclass(tp):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    return _merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def to_dict(obj: Any) -> Any:
    """A plain, YAML/JSON-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-5", "lora.r=16"]`` -> ``{"lr": 1e-5, "lora": {"r": 16}}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like field=value (e.g. lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    from personalign.data import read_text

    path = Path(path)
    try:
        doc = yaml.safe_load(read_text(path, "config file", ConfigError))
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields")
    return doc


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """``{"sampling.seed": 3, "model": "m"}`` -> ``{"sampling": {"seed": 3}, "model": "m"}``."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                given: dict[str, Any] | None = None) -> T:
    """Load ``cls``: its defaults, then a YAML file (optional), then ``given`` (typed values by dotted
    name, e.g. a command's flags), then dotted ``field=value`` overrides (``--set``, parsed as YAML)."""
    data = read_yaml(path) if path else {}
    if path:  # the file is checked on its own: a flag that replaces one of its values does not hide an error
        check_fields(cls, data, where=str(path))
    data = _merge(data, nest(dict(given or {})))
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data, where=str(path) if path else "config")
