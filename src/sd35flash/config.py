"""Typed configuration: dataclasses loaded from YAML, strictly.

An unknown or mistyped key is a :class:`ConfigError` that names the key and lists the valid ones.
Nested dataclasses are filled recursively; values are type-checked against the annotations.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _as_number(value: Any) -> float | int | None:
    """An int / float, or a string that parses as one (YAML 1.1 reads ``1e-4`` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


#: Allowed ranges of numeric config fields by field name (``fnmatch`` patterns, first match wins):
#: ``(low, high, low_open)``. A dataclass may override entries with a ``RANGES`` class attribute.
#: Unmatched ints lie in the 32-bit range and unmatched floats in [-1e9, 1e9]; every float is finite.
RANGES: list[tuple[str, tuple[float, float, bool]]] = [
    ("seed", (0, 2**31 - 1, False)),
    ("*_seed", (0, 2**31 - 1, False)),
    ("lr", (0.0, 10.0, True)),
    ("*_lr", (0.0, 10.0, True)),
    ("weight_decay", (0.0, 1.0, False)),
    ("*decay", (0.0, 0.999999, False)),
    ("*dropout", (0.0, 1.0, False)),
    ("*_prob", (0.0, 1.0, False)),
    ("collapse_ratio", (0.0, 100.0, False)),
    ("*ratio", (0.0, 1.0, False)),
    ("*patience", (1, 10**6, False)),
    ("checkpoint_every", (1, 10**8, False)),
    ("log_every", (1, 10**8, False)),
    ("*_every", (0, 10**8, False)),
    ("*batch_size", (1, 2**16, False)),
    ("probe_batch", (1, 2**16, False)),
    ("updates", (1, 1000, False)),
    ("teacher_steps", (1, 10**4, False)),
    ("probe_steps", (1, 10**4, False)),
    ("*steps", (0, 10**8, False)),
    ("warmup", (0, 10**8, False)),
    ("num_threads", (0, 4096, False)),
    ("num_real", (0, 10**8, False)),  # 0 = every training spec (gan.real: renders)
    ("probe_images", (0, 10**8, False)),  # 0 = no probe
    ("num_*", (1, 10**8, False)),
    ("*_images", (1, 10**8, False)),
    ("*weight", (0.0, 1e6, False)),
    ("grad_clip", (0.0, 1e6, True)),
    ("*guidance", (0.0, 100.0, False)),
    ("shift", (0.0, 100.0, True)),
    ("logit_std", (0.0, 100.0, True)),
    ("logit_mean", (-100.0, 100.0, False)),
    ("image_size", (8, 8192, False)),
    ("*channels", (1, 65536, False)),
    ("*layers*", (1, 1024, False)),
    ("*heads", (1, 1024, False)),
    ("*_dim", (1, 65536, False)),
    ("*_size", (1, 65536, False)),
    ("*_model", (1, 65536, False)),
    ("*length", (1, 65536, False)),
    ("*hidden", (1, 65536, False)),
]
_DEFAULT_RANGE = {int: (-(2**31), 2**31 - 1, False), float: (-1e9, 1e9, False)}


def _numeric_type(tp: Any) -> type | None:
    """``int`` or ``float`` for an annotation that is one (optionally ``| None``), else None."""
    if tp in (int, float):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float):
            return inner[0]
    return None


def field_range(cls: type, name: str, tp: type) -> tuple[float, float, bool]:
    """The allowed ``(low, high, low_open)`` of numeric field ``name`` of dataclass ``cls``."""
    own = getattr(cls, "RANGES", None)
    if isinstance(own, dict) and name in own:
        return own[name]
    for pattern, rng in RANGES:
        if fnmatch.fnmatchcase(name, pattern):
            return rng
    return _DEFAULT_RANGE[tp]


def check_ranges(obj: Any, where: str) -> None:
    """Every numeric field of dataclass ``obj`` within :func:`field_range` (ConfigError naming it)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = _numeric_type(hints.get(f.name))
        v = getattr(obj, f.name)
        if tp is None or v is None or isinstance(v, bool):
            continue
        lo, hi, lo_open = field_range(type(obj), f.name, tp)
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            left = "(" if lo_open else "["
            raise ConfigError(f"{where}.{f.name} must be in {left}{_num(lo)}, {_num(hi)}], got {v!r}")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after resolving), converting int->float and list->tuple."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # ``X | None``: X's own error names the key inside a nested section
            return _coerce(value, members[0], where)
        for a in members:
            try:
                return _coerce(value, a, where)
            except ConfigError:  # try the next member
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        v = _as_number(value)
        if v is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return v
    if tp is int:
        v = _as_number(value)
        if v is None or not math.isfinite(v) or v != int(v):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(v)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{where}.{key}'{hint}; valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_ranges(obj, where)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def merge(base: T, overrides: dict[str, Any], where: str = "config") -> T:
    """Return a copy of dataclass ``base`` with a (nested) mapping of overrides applied strictly."""
    data = to_dict(base)
    _deep_update(data, overrides, where, type(base))
    return from_dict(type(base), data, where)


def _deep_update(dst: dict, src: dict, where: str, cls: Any) -> None:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for k, v in src.items():
        if names and k not in names:
            close = difflib.get_close_matches(str(k), list(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}.{k}'{hint}; valid keys: {', '.join(sorted(names))}")
        sub = hints.get(k)
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and dataclasses.is_dataclass(sub):
            _deep_update(dst[k], v, f"{where}.{k}", sub)
        else:
            dst[k] = v


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (tuples become lists) suitable for YAML / JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; pass a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass a YAML file such as configs/toy-pretrain.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p} ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{at}; fix the syntax") from None
    if data is None:
        raise ConfigError(f"config file {p} is empty; write the keys to change (see the presets in configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML file, strictly."""
    return from_dict(cls, load_yaml(path), where=Path(path).stem)


def fingerprint(obj: Any, length: int = 12) -> str:
    """A stable short hash of a config (dataclass or mapping), used to key caches."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=true"]`` -> ``{"a": {"b": 1}, "c": True}`` (values parsed as YAML scalars/lists)."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("--set expects KEY=VALUE with a dotted key (e.g. dmd.timestep_sharing=false), "
                              f"got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse the value {text!r}") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is set both as a value and as a section")
        node[leaf] = value
    return out
