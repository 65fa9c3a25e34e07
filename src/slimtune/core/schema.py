"""Config schema machinery: dataclasses that check themselves, and dict -> dataclass with every problem collected.

Every config dataclass lists its fields with a docstring line each and a ``check()`` that returns
``(field, message)`` pairs; :func:`build` turns a plain dict into the dataclass, collecting unknown keys, wrong
types and bad values before the caller raises one :class:`~slimtune.core.errors.ConfigError`.

This module imports nothing of slimtune's but its errors, so method configs can use it without importing the run
config (which imports the method registry).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from slimtune.core.errors import ConfigError

Problem = tuple[str, str]  # (field name, message)


class Checked:
    """Mixin: ``__post_init__`` raises a ConfigError listing every problem ``check()`` finds."""

    def check(self) -> list[Problem]:
        return []

    def __post_init__(self) -> None:
        problems = self.check()
        if problems:
            raise ConfigError([f"{k}: {msg}" for k, msg in problems])


def choice(name: str, value: Any, allowed: tuple) -> list[Problem]:
    if value not in allowed:
        return [(name, f"{value!r} is not one of {', '.join(map(str, allowed))}")]
    return []


def positive(obj: Any, *names: str, allow_zero: bool = False) -> list[Problem]:
    out = []
    for n in names:
        v = getattr(obj, n)
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            out.append((n, f"{v!r} must be {'>= 0' if allow_zero else '> 0'}"))
    return out


# ---------------------------------------------------------------- dict -> dataclass with collected problems


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is list:
        return f"a list of {type_name(args[0])}"
    if typing.get_origin(tp) is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value) converting YAML scalars to the annotated type where that is lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        items = [coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, value
        out = {}
        for k, v in value.items():
            if key_tp is int and isinstance(k, str) and k.strip().isdigit():  # `a.b.3=x` overrides
                k = int(k)
            ok_k, k = coerce(k, key_tp)
            ok_v, v = coerce(v, val_tp)
            if not (ok_k and ok_v):
                return False, value
            out[k] = v
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is Any:
        return True, value
    return isinstance(value, tp), value


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``; append 'dotted.key: message' strings to ``problems``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs, local = {}, []
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = (
                f" (did you mean '{prefix}.{near[0]}'?)"
                if near
                else f" (allowed: {', '.join(sorted(fields))})"
            )
            local.append(f"{prefix}.{key}: unknown key{hint}")
            continue
        ok, coerced = coerce(value, hints[key])
        if not ok:
            local.append(f"{prefix}.{key}: {value!r} is not {type_name(hints[key])}")
            continue
        kwargs[key] = coerced
    problems.extend(local)
    try:  # value checks still run on the well-typed keys (defaults stand in for the rest)
        obj = cls(**kwargs)
    except ConfigError as err:
        problems.extend(f"{prefix}.{p}" for p in err.problems)
        return None
    return None if local else obj
