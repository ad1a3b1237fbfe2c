"""JSON in and out for the plan's frozen dataclasses, driven by their type annotations.

``encode`` turns a dataclass into plain JSON values (enums by value, expressions by
``expr.to_json``, tuples as lists); ``decode(cls, data)`` builds it back and checks every
field's type on the way, so a plan read from disk is either exactly what the annotations
say or a ``PlanFormatError`` naming the field (``graphs.decode.steps[3].args[1].offset``).
Supported annotations: the dataclasses themselves, Enum subclasses, Expr, int, float, bool,
str, ``Optional[X]``, ``tuple[X, ...]`` and ``dict[str, X]``; a field whose type depends on
another (a kernel's spec on its family) is decoded by the owner's ``_decode_field`` hook.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import Enum
from functools import lru_cache

from ffc.errors import ArtifactError

from . import expr as ex


class PlanFormatError(ArtifactError):
    """A plan file does not have the form this ffc reads."""


def encode(value):
    if isinstance(value, ex.Expr):
        return ex.to_json(value)
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fail(path: str, want: str, data) -> PlanFormatError:
    return PlanFormatError(f"{path}: expected {want}, got {str(data)[:80]!r}")


def decode(tp, data, path: str = "plan"):
    """``data`` (parsed JSON) as a value of annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        if len(options) != 1:
            raise PlanFormatError(f"{path}: the codec cannot decode the union {tp}")
        return decode(options[0], data, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise _fail(path, "a list", data)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{path}[{k}]") for k, v in enumerate(data))
        if not args:
            return tuple(data)
        if len(args) != len(data):
            raise _fail(path, f"a list of {len(args)}", data)
        return tuple(decode(a, v, f"{path}[{k}]") for k, (a, v) in enumerate(zip(args, data)))
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(data, dict):
            raise _fail(path, "an object", data)
        return {k: decode(vt, v, f"{path}.{k}") for k, v in data.items()}
    if tp is ex.Expr:
        try:
            return ex.from_json(data)
        except (ValueError, TypeError) as e:
            raise PlanFormatError(f"{path}: {e}") from None
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(data)
        except ValueError:
            raise _fail(path, f"one of {', '.join(str(m.value) for m in tp)}", data) from None
    if dataclasses.is_dataclass(tp):
        return decode_dataclass(tp, data, path)
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail(path, "true or false", data)
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _fail(path, "an integer", data)
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
            raise _fail(path, "a finite number", data)
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise _fail(path, "a string", data)
        return data
    raise PlanFormatError(f"{path}: the codec has no rule for {tp}")


def decode_dataclass(cls, data, path: str):
    if not isinstance(data, dict):
        raise _fail(path, f"an object ({cls.__name__})", data)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(data) - names)
    if extra:
        raise PlanFormatError(f"{path}: unknown field {extra[0]!r} of {cls.__name__}")
    kw = {}
    hook = getattr(cls, "_decode_field", None)
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanFormatError(f"{sub}: missing")
            continue
        custom = hook(f.name, data, sub) if hook is not None else NotImplemented
        kw[f.name] = decode(hints[f.name], data[f.name], sub) if custom is NotImplemented else custom
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise PlanFormatError(f"{path}: {e}") from None
