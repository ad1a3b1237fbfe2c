"""A small expression tree: the sizes, strides and element computations kernel specs carry.

A plan never holds C text. Everything a template prints that is computed (a size such as
``T * 576``, a row stride, a pointwise kernel's body ``silu(in0[i0 * 7 + i1]) * in1[i1]``,
a linear's epilogue ``gelu_tanh(v)``) is an ``Expr``: an op kind, its operands and one
argument (a constant's value, a variable's name, a function, a dtype, a load's input).
``codegen`` renders it to C; the runtime and the cost model evaluate it. Variables are
limited to the kernel ABI's names (the dims T, N, S; loop indices i0, i1, ...; the epilogue
values v and w), so a plan read from disk cannot smuggle code into a generated kernel.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping, Union

from ffc.ir.types import DType, Dim

_VAR = re.compile(r"^(T|N|S|v|w|i\d{1,2})$")


class X(Enum):
    """Expression node kinds."""
    CONST = "const"     # arg: an int or a float
    VAR = "var"         # arg: a name (see _VAR)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"         # integer operands: C's truncating division (all of them are non-negative)
    MOD = "mod"
    NEG = "neg"
    LT = "lt"
    WHERE = "where"     # args: condition, then, else
    CALL = "call"       # arg: a Fn
    CAST = "cast"       # arg: a DType (storage type of the result)
    LOAD = "load"       # arg: the kernel's input number; args: (element index,); arg2: its dtype


class Fn(Enum):
    """Functions an expression may call: math and the activations of ffc_common.h."""
    EXP = "exp"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    TANH = "tanh"
    COS = "cos"
    SIN = "sin"
    POW = "pow"
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"
    SIGMOID = "sigmoid"


ARITY = {Fn.POW: 2}
BINARY_OPS = (X.ADD, X.SUB, X.MUL, X.DIV, X.MOD, X.LT)


@dataclass(frozen=True)
class Expr:
    op: X
    args: tuple = ()
    arg: object = None
    dtype: DType | None = None      # LOAD: the element type read (narrow types are widened to f32)

    def __post_init__(self):
        if not isinstance(self.op, X):
            raise ValueError(f"expression op {self.op!r} is not an X")
        if any(not isinstance(a, Expr) for a in self.args):
            raise ValueError(f"{self.op.value}: operands must be expressions")
        want = {X.CONST: 0, X.VAR: 0, X.NEG: 1, X.WHERE: 3, X.CAST: 1, X.LOAD: 1}.get(self.op)
        if self.op in BINARY_OPS:
            want = 2
        if self.op is X.CALL:
            if not isinstance(self.arg, Fn):
                raise ValueError(f"call of {self.arg!r}: not a known function")
            want = ARITY.get(self.arg, 1)
        if want is not None and len(self.args) != want:
            raise ValueError(f"{self.op.value} takes {want} operands, got {len(self.args)}")
        if self.op is X.CONST and (isinstance(self.arg, bool) or not isinstance(self.arg, (int, float))
                                   or (isinstance(self.arg, float) and not math.isfinite(self.arg))):
            raise ValueError(f"constant {self.arg!r} is not a finite number")
        if self.op is X.VAR and not (isinstance(self.arg, str) and _VAR.match(self.arg)):
            raise ValueError(f"variable {self.arg!r} is not a kernel variable (T, N, S, v, w, i<k>)")
        if self.op is X.CAST and not isinstance(self.arg, DType):
            raise ValueError(f"cast to {self.arg!r}: not a dtype")
        if self.op is X.LOAD and (isinstance(self.arg, bool) or not isinstance(self.arg, int) or self.arg < 0
                                  or not isinstance(self.dtype, DType)):
            raise ValueError(f"load from input {self.arg!r} ({self.dtype!r}): needs an input number and a dtype")

    # -- building, with the folding that keeps rendered sizes short
    def __add__(self, o: "Expr | int") -> "Expr":
        o = lift(o)
        if is_const(self, 0):
            return o
        if is_const(o, 0):
            return self
        if _ints(self, o):
            return const(self.arg + o.arg)
        return Expr(X.ADD, (self, o))

    def __sub__(self, o: "Expr | int") -> "Expr":
        o = lift(o)
        if is_const(o, 0):
            return self
        if _ints(self, o):
            return const(self.arg - o.arg)
        return Expr(X.SUB, (self, o))

    def __mul__(self, o: "Expr | int") -> "Expr":
        o = lift(o)
        if is_const(self, 0) or is_const(o, 0):
            return const(0)
        if is_const(self, 1):
            return o
        if is_const(o, 1):
            return self
        if _ints(self, o):
            return const(self.arg * o.arg)
        return Expr(X.MUL, (self, o))

    def __floordiv__(self, o: "Expr | int") -> "Expr":
        o = lift(o)
        return self if is_const(o, 1) else Expr(X.DIV, (self, o))

    def __mod__(self, o: "Expr | int") -> "Expr":
        return Expr(X.MOD, (self, lift(o)))

    def __neg__(self) -> "Expr":
        return Expr(X.NEG, (self,))

    def __str__(self) -> str:
        return describe(self)

    # -- evaluation (sizes and strides, at run time)
    def evaluate(self, env: Mapping[str, int]) -> int | float:
        op, a = self.op, self.args
        if op is X.CONST:
            return self.arg
        if op is X.VAR:
            return env[self.arg]
        v = [x.evaluate(env) for x in a]
        if op is X.ADD:
            return v[0] + v[1]
        if op is X.SUB:
            return v[0] - v[1]
        if op is X.MUL:
            return v[0] * v[1]
        if op is X.DIV:
            return int(v[0] / v[1]) if isinstance(v[0], int) and isinstance(v[1], int) else v[0] / v[1]
        if op is X.MOD:
            return v[0] % v[1]
        if op is X.NEG:
            return -v[0]
        if op is X.LT:
            return int(v[0] < v[1])
        if op is X.WHERE:
            return v[1] if v[0] else v[2]
        raise ValueError(f"{op.value} expressions are not evaluated outside a kernel")

    def variables(self) -> set[str]:
        out = {self.arg} if self.op is X.VAR else set()
        for x in self.args:
            out |= x.variables()
        return out


Value = Union[Expr, int]


def const(v: int | float) -> Expr:
    return Expr(X.CONST, (), v)


def var(name: str) -> Expr:
    return Expr(X.VAR, (), name)


def _ints(a: Expr, b: Expr) -> bool:
    return all(e.op is X.CONST and isinstance(e.arg, int) for e in (a, b))


def lift(v: Value) -> Expr:
    return v if isinstance(v, Expr) else const(v)


def is_const(e: Expr, value=None) -> bool:
    """A constant (equal to the integer ``value`` when given: only integer arithmetic folds,
    so an element computation keeps exactly the IR's float operations)."""
    if e.op is not X.CONST:
        return False
    return value is None or (isinstance(e.arg, int) and e.arg == value)


def call(fn: Fn, *args: Value) -> Expr:
    return Expr(X.CALL, tuple(lift(a) for a in args), fn)


def cast(dtype: DType, e: Expr) -> Expr:
    return Expr(X.CAST, (e,), DType(dtype))


def load(index: int, element: Expr, dtype: DType) -> Expr:
    return Expr(X.LOAD, (element,), index, DType(dtype))


def where(cond: Expr, then: Expr, other: Expr) -> Expr:
    return Expr(X.WHERE, (cond, then, other))


def less(a: Value, b: Value) -> Expr:
    return Expr(X.LT, (lift(a), lift(b)))


def product(xs) -> Expr:
    out = const(1)
    for x in xs:
        out = out * lift(x)
    return out


def total(xs) -> Expr:
    out = const(0)
    for x in xs:
        out = out + lift(x)
    return out


_AST_OPS = {ast.Add: X.ADD, ast.Sub: X.SUB, ast.Mult: X.MUL, ast.FloorDiv: X.DIV, ast.Div: X.DIV, ast.Mod: X.MOD}


def from_dim(d: Dim) -> Expr:
    """An IR dimension (an int, or an expression over symbols such as ``"2*T"``) as an Expr."""
    if isinstance(d, int):
        return const(d)

    def conv(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int) and not isinstance(n.value, bool):
            return const(n.value)
        if isinstance(n, ast.Name):
            return var(n.id)
        if isinstance(n, ast.BinOp) and type(n.op) in _AST_OPS:
            return Expr(_AST_OPS[type(n.op)], (conv(n.left), conv(n.right)))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -conv(n.operand)
        raise ValueError(f"dimension {d!r} is not an expression over T, N, S")
    try:
        return conv(ast.parse(str(d), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"dimension {d!r} is not an expression over T, N, S") from None


_SYMBOLS = {X.ADD: "+", X.SUB: "-", X.MUL: "*", X.DIV: "/", X.MOD: "%", X.LT: "<"}


@dataclass(frozen=True)
class Spelling:
    """How a renderer writes the parts of an expression that differ between languages."""
    const: Callable[[int | float], str]
    call: Callable[[Fn, list[str]], str]
    cast: Callable[[DType, str], str]
    load: Callable[[int, DType, str], str]


def render(e: Expr, spell: Spelling) -> str:
    """``e`` as infix text, every compound parenthesized; ``spell`` writes constants, calls,
    casts and loads (codegen's C, describe's readable form)."""
    if e.op is X.CONST:
        return spell.const(e.arg)
    if e.op is X.VAR:
        return e.arg
    a = [render(x, spell) for x in e.args]
    if e.op in _SYMBOLS:
        return f"({a[0]} {_SYMBOLS[e.op]} {a[1]})"
    if e.op is X.NEG:
        return f"(-{a[0]})"
    if e.op is X.WHERE:
        return f"({a[0]} ? {a[1]} : {a[2]})"
    if e.op is X.CALL:
        return spell.call(e.arg, a)
    if e.op is X.CAST:
        return spell.cast(e.arg, a[0])
    return spell.load(e.arg, e.dtype, a[0])


READABLE = Spelling(const=repr, call=lambda fn, a: f"{fn.value}({', '.join(a)})",
                    cast=lambda dtype, a: f"{dtype.value}({a})", load=lambda k, dtype, i: f"in{k}[{i}]")


def describe(e: Expr) -> str:
    """Readable text (for plan dumps): ``(T * 576)``, ``silu(in0[i0])``."""
    return render(e, READABLE)


# ---------------------------------------------------------------- JSON form
# numbers are constants, strings variables, lists [op, ...]: ["add", a, b], ["call", "exp", a],
# ["cast", "f32", a], ["load", k, "bf16", index]

def to_json(e: Expr):
    if e.op is X.CONST:
        return e.arg
    if e.op is X.VAR:
        return e.arg
    args = [to_json(x) for x in e.args]
    if e.op in (X.CALL, X.CAST):
        return [e.op.value, e.arg.value, *args]
    if e.op is X.LOAD:
        return [e.op.value, e.arg, e.dtype.value, *args]
    return [e.op.value, *args]


def from_json(data) -> Expr:
    """The inverse of ``to_json``; ValueError names what is wrong."""
    if isinstance(data, bool):
        raise ValueError(f"{data!r} is not an expression")
    if isinstance(data, (int, float)):
        return const(data)
    if isinstance(data, str):
        return var(data)
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError(f"{str(data)[:60]!r} is not an expression")
    try:
        op = X(data[0])
    except ValueError:
        raise ValueError(f"unknown expression op {data[0]!r}") from None
    if op is X.CALL:
        return Expr(op, tuple(from_json(a) for a in data[2:]), Fn(data[1]))
    if op is X.CAST:
        return Expr(op, tuple(from_json(a) for a in data[2:]), DType(data[1]))
    if op is X.LOAD:
        if len(data) < 3:
            raise ValueError("a load needs an input number and a dtype")
        return Expr(op, tuple(from_json(a) for a in data[3:]), data[1], DType(data[2]))
    if op in (X.CONST, X.VAR):
        raise ValueError(f"{op.value} is written as a bare value")
    return Expr(op, tuple(from_json(a) for a in data[1:]))
