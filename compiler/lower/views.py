"""Views as strides: how a kernel reads a value through reshape/transpose/slice/... nodes.

View ops (reshape, transpose, permute, unsqueeze, expand, slice) cost nothing: a kernel
reads their source through the strides and offset they imply. Those are worked out by
replaying the view chain on meta tensors at a few bindings of the dims and fitting each
stride and the offset as ``c + a*T + b*N`` (``Affine``); a chain no affine pattern fits has
no strided form (it would need a copy kernel). Pure functions: the caller says which
values are materialized and in which layout a kernel wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ffc.ir import Module, Node, Op, ParamRef
from ffc.ir.types import DType
from ffc.ir.verify import bind_attrs
from ffc.plan import expr as ex
from ffc.plan.expr import Expr
from ffc.plan.schema import ArgKind

VIEW_OPS = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.PERMUTE, Op.UNSQUEEZE, Op.EXPAND, Op.SLICE})
# Symbol bindings at which views are evaluated; strides and offsets are fitted as c + a*T + b*N.
BINDINGS = ({"T": 5, "N": 3, "S": 2}, {"T": 9, "N": 3, "S": 2}, {"T": 5, "N": 7, "S": 2},
            {"T": 13, "N": 11, "S": 2})


@dataclass(frozen=True)
class Affine:
    """c + t*T + n*N."""
    c: int = 0
    t: int = 0
    n: int = 0

    def is_const(self) -> bool:
        return self.t == 0 and self.n == 0

    def expr(self) -> Expr:
        return ex.var("T") * self.t + ex.var("N") * self.n + self.c

    def __str__(self) -> str:
        return ex.describe(self.expr())


def fit(values: list[int]) -> Optional[Affine]:
    """The affine function of T and N taking ``values`` at BINDINGS, if there is one."""
    b0, b1, b2, _ = BINDINGS
    a_t = (values[1] - values[0]) // (b1["T"] - b0["T"])
    a_n = (values[2] - values[0]) // (b2["N"] - b0["N"])
    c = values[0] - a_t * b0["T"] - a_n * b0["N"]
    ok = all(c + a_t * b["T"] + a_n * b["N"] == v for b, v in zip(BINDINGS, values))
    return Affine(c, a_t, a_n) if ok else None


@dataclass(frozen=True)
class RowAccess:
    """A value read as ``rows`` rows of K contiguous elements, ``ld`` elements apart."""
    rows: Expr
    ld: Expr
    K: int


@dataclass(frozen=True)
class View:
    """How a kernel reads a value: base storage plus element offset and strides."""
    kind: ArgKind              # BUF (an arena buffer: a node's result or a graph input) or PARAM
    name: str
    dtype: DType
    shape: tuple               # IR dims (int or expression)
    strides: tuple             # Affine per dim
    offset: Affine

    def row_access(self) -> Optional[RowAccess]:
        """The value as rows of K contiguous elements, or None if it is not."""
        if not self.shape or self.strides[-1] != Affine(1):
            return None
        K = self.shape[-1]
        if not isinstance(K, int):
            return None
        lead = list(zip(self.shape[:-1], self.strides[:-1]))
        contiguous = True
        expect = Affine(K)
        for d, s in reversed(lead):
            if d != 1 and s != expect:
                contiguous = False
            if isinstance(d, int) and expect.is_const():
                expect = Affine(expect.c * d)
            else:
                break
        big = [(d, s) for d, s in lead if d != 1]
        if not big:
            return RowAccess(ex.const(1), ex.const(K), K)
        if len(big) == 1:
            return RowAccess(ex.from_dim(big[0][0]), big[0][1].expr(), K)
        if contiguous:
            return RowAccess(ex.product(ex.from_dim(d) for d, _ in big), ex.const(K), K)
        return None


def strip_views(n):
    """The value a chain of views reads."""
    while isinstance(n, Node) and n.op in VIEW_OPS:
        n = n.inputs[0]
    return n


def _replay(t: torch.Tensor, v: Node, env: dict) -> torch.Tensor:
    attrs = bind_attrs(v, env)
    if v.op is Op.RESHAPE:
        return t.view(attrs["shape"])
    if v.op is Op.TRANSPOSE:
        return t.transpose(attrs["dim0"], attrs["dim1"])
    if v.op is Op.PERMUTE:
        return t.permute(attrs["dims"])
    if v.op is Op.UNSQUEEZE:
        return t.unsqueeze(attrs["dim"])
    if v.op is Op.EXPAND:
        return t.expand(attrs["shape"])
    dim, start, step = attrs["dim"], attrs.get("start") or 0, attrs.get("step") or 1
    end = attrs.get("end")
    end = t.shape[dim] if end is None else min(end, t.shape[dim])
    return t[(slice(None),) * (dim % t.dim()) + (slice(start, end, step),)]


def view_of(value, module: Module, materialized: Callable[[Node], bool],
            layout: Callable[[Node], Optional[tuple]] = lambda n: None) -> Optional[View]:
    """Strided access to ``value`` (a node or a param), or None if its views have no strided
    form. ``materialized(n)``: a kernel writes n (the chain stops there); ``layout(n)``: the
    strides (Affine) n was written with, when not contiguous."""
    chain = []
    n = value
    while isinstance(n, Node) and n.op in VIEW_OPS and not materialized(n):
        chain.append(n)
        n = n.inputs[0]
    if isinstance(n, ParamRef):
        p = module.params[n.name]
        kind, name, btype, strides = ArgKind.PARAM, n.name, p.type, None
    else:
        kind, name, btype = ArgKind.BUF, n.name, n.type
        strides = None if n.op is Op.INPUT else layout(n)
    results = []
    for env in BINDINGS:
        shape = btype.concrete(env)
        if strides is not None:
            st = tuple(s.c + s.t * env["T"] + s.n * env["N"] for s in strides)
        else:
            st = torch.empty(shape, device="meta").stride()
        t = torch.empty_strided(shape, st, device="meta")
        try:
            for v in reversed(chain):
                t = _replay(t, v, env)
        except RuntimeError:
            return None
        results.append((t.stride(), t.storage_offset()))
    fitted = [fit([r[0][k] for r in results]) for k in range(len(results[0][0]))]
    off = fit([r[1] for r in results])
    if off is None or any(f is None for f in fitted):
        return None
    shape = value.type.shape if isinstance(value, Node) else module.params[value.name].type.shape
    return View(kind, name, btype.dtype, tuple(shape), tuple(fitted), off)
