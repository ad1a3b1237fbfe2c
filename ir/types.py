"""Tensor types with symbolic dimensions.

A dimension is an ``int`` or a ``str`` holding an expression over named symbols
(``"T"``, ``"B"``, ``"2*T"``). Symbols are bound to integers when a graph runs;
``concrete`` evaluates a type under such a binding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

Dim = Union[int, str]

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
    "i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_DIM_EXPR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[A-Za-z0-9_+\-*/() ]+$")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no ffc name; supported: {sorted(DTYPES)}") from None


def normalize_dim(d: Dim) -> Dim:
    """An int stays an int; an expression string loses its spaces, and becomes an int if constant."""
    if isinstance(d, bool):
        raise ValueError(f"bad dimension {d!r}")
    if isinstance(d, int):
        return d
    s = str(d).replace(" ", "")
    if not s or not _DIM_EXPR.match(s):
        raise ValueError(f"bad dimension expression {d!r}")
    if not _SYMBOL.search(s):
        return int(eval(s, {"__builtins__": {}}, {}))  # noqa: S307 - digits and operators only
    return s


def symbols_of(d: Dim) -> set[str]:
    return set(_SYMBOL.findall(d)) if isinstance(d, str) else set()


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    missing = symbols_of(d) - set(env)
    if missing:
        raise KeyError(f"dimension {d!r} needs a value for {sorted(missing)}")
    return int(eval(d, {"__builtins__": {}}, dict(env)))  # noqa: S307 - validated by normalize_dim


def rename_dim(d: Dim, mapping: Mapping[str, str]) -> Dim:
    if isinstance(d, int):
        return d
    return normalize_dim(_SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), d))


_PLACEMENT = re.compile(r"^(R|P|S\(\d+\))$")


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]
    # on a tensor-parallel graph: how the ranks hold the value, R | P | S(dim) (ir/sharding.py);
    # the shape is then what one rank holds. None: not placed (a single-rank graph, or R)
    placement: Optional[str] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPES)}")
        if self.placement is not None and not _PLACEMENT.match(self.placement):
            raise ValueError(f"bad placement {self.placement!r}; expected R, P or S(dim)")
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            out |= symbols_of(d)
        return out

    def concrete(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def renamed(self, mapping: Mapping[str, str]) -> "TensorType":
        return TensorType(self.dtype, tuple(rename_dim(d, mapping) for d in self.shape), self.placement)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape), self.placement)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape, self.placement)

    def placed(self, placement) -> "TensorType":
        return TensorType(self.dtype, self.shape, None if placement is None else str(placement))

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"
        return text + (f"<{self.placement}>" if self.placement else "")


_TYPE_RE = re.compile(r"^(\w+)\[(.*)\](?:<(.*)>)?$")


def parse_type(text: str) -> TensorType:
    m = _TYPE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad type {text!r}; expected e.g. f32[T,576] or, placed on tensor-parallel ranks, f32[T,288]<S(1)>")
    dims = [p.strip() for p in m.group(2).split(",")] if m.group(2).strip() else []
    return TensorType(m.group(1), tuple(int(p) if re.fullmatch(r"-?\d+", p) else p for p in dims), m.group(3))
