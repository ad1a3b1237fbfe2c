"""Tensor types with symbolic dimensions.

A dimension is an ``int`` or a ``str`` holding an expression over named symbols
(``"T"``, ``"B"``, ``"2*T"``). Symbols are bound to integers when a graph runs;
``concrete`` evaluates a type under such a binding.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional, Union

import torch

Dim = Union[int, str]


class DType(str, Enum):
    """An element type. Its value is the IR's spelling (``f32``); ``DType("fp32")``,
    ``DType("float32")`` and the other spellings users and libraries write are accepted too."""
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    F64 = "f64"
    I64 = "i64"
    I32 = "i32"
    I8 = "i8"
    U8 = "u8"
    BOOL = "bool"
    # quantized weight formats (ir/quant.py): stored as uint8 blocks along the last dim
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q8_0 = "q8_0"
    Q4_K = "q4_k"
    Q6_K = "q6_k"
    I4G64 = "i4g64"
    I8R = "i8r"

    @classmethod
    def _missing_(cls, value):
        alias = _ALIASES.get(str(value).lower()) if isinstance(value, str) else None
        return cls(alias) if alias else None

    @classmethod
    def of(cls, dtype: torch.dtype) -> "DType":
        """The DType of a torch dtype."""
        for d in cls:
            if _TORCH[d] == dtype:
                return d
        raise ValueError(f"dtype {dtype} has no ffc name; supported: {', '.join(d.value for d in cls)}")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self]

    @property
    def itemsize(self) -> int:
        """Bytes of one stored element (a quantized format: of its uint8 storage)."""
        return _TORCH[self].itemsize

    @property
    def quantized(self) -> bool:
        """A block format (ir/quant.py): the storage is uint8 blocks, not one element per value."""
        return self in _QUANTIZED

    @property
    def element_bytes(self) -> float:
        """Bytes per value as stored, scales included (2 for bf16, 0.5625 for q4_0, ...)."""
        q = QUANT.get(self)
        if q is None:
            return float(self.itemsize)
        return 1.0 if q.block == 0 else q.block_bytes / q.block

    def storage_cols(self, k: int) -> int:
        """Elements of storage a row of ``k`` values takes (bytes, for a quantized format)."""
        q = QUANT.get(self)
        if q is None:
            return k
        if q.block == 0:
            return k + q.block_bytes
        if k % q.block:
            raise ValueError(f"a row of {k} values is not a whole number of {self} blocks of {q.block}")
        return k // q.block * q.block_bytes

    @property
    def ctype(self) -> str:
        """The C/C++ storage type generated kernels use (csrc/ffc_common.h)."""
        return _CTYPES[self]

    @property
    def narrow_float(self) -> bool:
        """Stored in 16 bits and widened to f32 when read (weights with --dtype bf16/fp16)."""
        return self in (DType.BF16, DType.F16)


_ALIASES = {"fp32": "f32", "float32": "f32", "float": "f32", "fp16": "f16", "float16": "f16", "half": "f16",
            "bfloat16": "bf16", "fp64": "f64", "float64": "f64", "double": "f64", "int64": "i64", "long": "i64",
            "int32": "i32", "int": "i32", "int8": "i8", "uint8": "u8"}
_TORCH = {DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F64: torch.float64,
          DType.I64: torch.int64, DType.I32: torch.int32, DType.I8: torch.int8, DType.U8: torch.uint8,
          DType.BOOL: torch.bool}


@dataclass(frozen=True)
class QuantInfo:
    """A quantized format's blocks along the last dim (ir/quant.py has the layouts)."""
    block: int            # values per block (0: the whole row, i8r)
    block_bytes: int      # bytes per block (i8r: per row beyond its K int8 values)
    bits: int             # bits of a stored value (4 or 8): the kernels' unpacking class
    gguf: Optional[str]   # the GGML type name, for formats a GGUF file can hold


QUANT: dict[DType, QuantInfo] = {
    DType.Q4_0: QuantInfo(32, 18, 4, "Q4_0"),
    DType.Q4_1: QuantInfo(32, 20, 4, "Q4_1"),
    DType.Q8_0: QuantInfo(32, 34, 8, "Q8_0"),
    DType.Q4_K: QuantInfo(256, 144, 4, "Q4_K"),
    DType.Q6_K: QuantInfo(256, 210, 8, "Q6_K"),
    DType.I4G64: QuantInfo(64, 36, 4, None),
    DType.I8R: QuantInfo(0, 4, 8, None),
}
_QUANTIZED = set(QUANT)
_TORCH.update({d: torch.uint8 for d in _QUANTIZED})
_CTYPES = {DType.F32: "float", DType.BF16: "ffc_bf16", DType.F16: "ffc_f16", DType.I64: "int64_t",
           DType.I32: "int32_t", DType.BOOL: "bool", DType.F64: "double", DType.U8: "uint8_t", DType.I8: "int8_t",
           **{d: "uint8_t" for d in _QUANTIZED}}
# the storage types of weights that --dtype offers (computation stays f32)
WEIGHT_DTYPES = (DType.F32, DType.BF16, DType.F16)
# the storage types of the KV cache that --kv-dtype offers (i8: a scale per position and head)
KV_DTYPES = (DType.F32, DType.BF16, DType.F16, DType.I8)


def parse_dtype(value) -> DType:
    """A DType from any of its spellings or a torch dtype; ValueError names the known ones."""
    if isinstance(value, torch.dtype):
        return DType.of(value)
    try:
        return DType(value)
    except ValueError:
        raise ValueError(f"unknown dtype {value!r}; known: {', '.join(d.value for d in DType)}") from None


class PlacementKind(Enum):
    R = "R"     # replicated: every rank holds all of the value
    S = "S"     # sharded on one dim: rank r holds the r-th of tp equal slices along it
    P = "P"     # partial sum: the value is the sum of what the ranks hold


@dataclass(frozen=True)
class Placement:
    """How the ranks of a tensor-parallel group hold a value (see ir/sharding.py)."""
    kind: PlacementKind
    dim: int = -1      # the sharded dim for S (non-negative)

    def __post_init__(self):
        if not isinstance(self.kind, PlacementKind):
            object.__setattr__(self, "kind", PlacementKind(self.kind))
        if self.kind is PlacementKind.S and (isinstance(self.dim, bool) or not isinstance(self.dim, int)
                                             or self.dim < 0):
            raise ValueError(f"a sharded placement needs a dim >= 0, got {self.dim!r}")

    @property
    def sharded(self) -> bool:
        return self.kind is PlacementKind.S

    def __str__(self) -> str:
        return f"S({self.dim})" if self.kind is PlacementKind.S else self.kind.value

    @staticmethod
    def parse(text: str) -> "Placement":
        text = text.strip()
        if text in ("R", "P"):
            return Placement(PlacementKind(text))
        if text.startswith("S(") and text.endswith(")") and text[2:-1].isdigit():
            return Placement(PlacementKind.S, int(text[2:-1]))
        raise ValueError(f"bad placement {text!r}: use R, P or S(dim)")


_DIM_EXPR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[A-Za-z0-9_+\-*/() ]+$")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


@functools.lru_cache(maxsize=4096)
def _dim_code(d: str):
    """A dimension expression compiled once (passes and the verifier evaluate millions), and its symbols."""
    return compile(d, "<dim>", "eval"), frozenset(_SYMBOL.findall(d))


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    if d in env:                 # a bare symbol
        return int(env[d])
    code, symbols = _dim_code(d)
    missing = symbols - set(env)
    if missing:
        raise KeyError(f"dimension {d!r} needs a value for {sorted(missing)}")
    return int(eval(code, {"__builtins__": {}}, dict(env)))  # noqa: S307 - validated by normalize_dim


def rename_dim(d: Dim, mapping: Mapping[str, str]) -> Dim:
    if isinstance(d, int):
        return d
    return normalize_dim(_SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), d))


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]
    # on a tensor-parallel graph: how the ranks hold the value, R | P | S(dim) (ir/sharding.py);
    # the shape is then what one rank holds. None: not placed (a single-rank graph, or R)
    placement: Optional[Placement] = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if isinstance(self.placement, str):
            object.__setattr__(self, "placement", Placement.parse(self.placement))
        elif self.placement is not None and not isinstance(self.placement, Placement):
            raise ValueError(f"bad placement {self.placement!r}; expected R, P or S(dim)")
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype.torch

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

    def storage_shape(self, env: Mapping[str, int] = {}) -> tuple[int, ...]:
        """The shape of the tensor that holds this type (a quantized format: uint8 rows of blocks)."""
        shape = self.concrete(env)
        return (*shape[:-1], self.dtype.storage_cols(shape[-1])) if shape else shape

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape, self.placement)

    def placed(self, placement: Optional[Placement]) -> "TensorType":
        return TensorType(self.dtype, self.shape, placement)

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
