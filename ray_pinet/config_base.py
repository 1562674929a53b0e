"""Validated config dataclasses: the machinery shared by every config in ray-pinet.

Every config is a (nested) dataclass. ``from_dict`` rejects unknown keys with the full dotted
path and the list of valid keys, coerces YAML scalars to the annotated type and runs each
dataclass's ``validate()``; ``to_dict`` gives the resolved, JSON-able form that travels with
checkpoints and MLflow runs. ``apply_overrides`` implements ``--set a.b.c=value``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        # The field a ``require`` check names, relative to the section that raised it:
        # ``from_dict`` puts the section's dotted path in front.
        self.key = key


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """``ConfigError("<key> must be <rule>, got <value>")`` unless ``ok`` (in a ``validate()``:
    ``from_dict`` prefixes the key with the section's dotted path, e.g. ``optim.lr``)."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}", key=key)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own message
        return _coerce(value, options[0], where)
    errors = []
    for arg in options:
        try:
            return _coerce(value, arg, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(f"{where}: {value!r} does not match {tp}: {'; '.join(errors)}")


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """A bool, int, float or str field's value from YAML or ``--set``; any other type's as given."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:  # a string that is no number
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # No float of any config means anything as NaN or infinity (0 is every "off"): refused
        # here, for every field at once, before a worker trains with it.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        return _coerce_union(value, tp, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, where)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build ``cls`` from a mapping; unknown keys are an error naming the dotted path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(prefix + '.' + k if prefix else k) for k in unknown)} "
            f"in {where}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            if prefix and exc.key is not None:
                raise ConfigError(f"{prefix}.{exc}", key=f"{prefix}.{exc.key}") from None
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}", key=exc.key) from None
    return obj


def to_dict(obj: Any) -> Any:
    """JSON-able resolved form of a config (dataclasses, lists, dicts, scalars)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and Tune spaces)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Absent()


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                free: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two resolved
    configs (``to_dict`` forms), sorted; a key under one of the ``free`` dotted prefixes (a key
    itself or a section) may differ and is left out. A key only one side has is a difference."""
    free = tuple(free)
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in free):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out.append((key, va, vb))
    return out


def format_diff(diffs: list[tuple[str, Any, Any]], prefix: str = "",
                template: str = "{key}: {old!r} -> {new!r}") -> str:
    """``"optim.lr: 0.001 -> 0.002; model.dropout: 0.2 -> 0.5"`` (``template`` per key)."""
    return "; ".join(template.format(key=prefix + k, old=a, new=b) for k, a, b in diffs)


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(d: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(d, key, value)
    return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


class FileConfig:
    """Construction of a top-level config dataclass (mixed into ``TrainConfig`` and
    ``TwoTowerConfig``): from a dict, from a YAML file plus ``--set`` overrides, and back to
    the resolved dict that travels with checkpoints and MLflow runs."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
        return from_dict(cls, data or {})

    @classmethod
    def from_yaml(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
        raw = load_yaml(path) if path else {}
        return cls.from_dict(apply_overrides(raw, overrides))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
