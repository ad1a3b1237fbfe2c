"""The pointwise family's spec: a tree of elementwise, view, concat and rope nodes as one
expression per output over the output's indices (``i0, i1, ...``).

Each input the tree reads becomes a load ``in<k>[sum of index * stride]`` through the
strides its views imply; views inside the tree map indices (a transpose swaps them, a
reshape flattens and unflattens, a slice offsets); broadcasting pins an index to 0.
"""
from __future__ import annotations

from ffc.ir import Node, Op, ParamRef
from ffc.ir.ops import BINARY, UNARY
from ffc.ir.types import DType
from ffc.plan import expr as ex
from ffc.plan.expr import Expr, Fn, X
from ffc.plan.kernels import PointwiseLoad, PointwiseOutput, PointwiseSpec

from .groups import Group, LoweringError
from .views import VIEW_OPS, Affine

# The function each unary op computes (GELU: see function_of); the activations among them are
# what a linear's epilogue can apply.
_UNARY = {Op.RSQRT: Fn.RSQRT, Op.SQRT: Fn.SQRT, Op.EXP: Fn.EXP, Op.TANH: Fn.TANH, Op.COS: Fn.COS, Op.SIN: Fn.SIN,
          Op.SILU: Fn.SILU, Op.RELU: Fn.RELU, Op.SIGMOID: Fn.SIGMOID, Op.GELU: Fn.GELU}
ACTIVATIONS = frozenset({Op.SILU, Op.GELU, Op.RELU, Op.SIGMOID, Op.TANH})


def function_of(n: Node) -> Fn:
    """The function unary node ``n`` computes."""
    if n.op is Op.GELU and n.attrs.get("approximate") == "tanh":
        return Fn.GELU_TANH
    return _UNARY[n.op]


_BINARY = {Op.ADD: X.ADD, Op.SUB: X.SUB, Op.MUL: X.MUL, Op.DIV: X.DIV}


class _Tree:
    """The expressions of one pointwise kernel and the inputs they load."""

    def __init__(self, c, nodes: set):
        self.c, self.nodes = c, nodes
        self.args: list = []
        self.vars: dict[tuple, int] = {}

    def load(self, value, idx: list[Expr]) -> Expr:
        a, v = self.c.arg(value, "a pointwise input")
        key = (a.kind, a.name, a.offset)
        if key not in self.vars:
            self.vars[key] = len(self.args)
            self.args.append(a)
        lin = ex.total(i * s.expr() for i, s, d in zip(idx, v.strides, v.shape) if s != Affine(0) and d != 1)
        return ex.load(self.vars[key], lin, v.dtype)

    def expr(self, n, idx: list[Expr]) -> Expr:
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            return ex.const(n)
        if isinstance(n, ParamRef) or n.op is Op.INPUT or n not in self.nodes:
            return self.load(n, idx)
        shape = n.type.shape
        if n.op in VIEW_OPS:
            return self.expr(n.inputs[0], self.view_index(n, idx))
        ins = n.inputs
        if n.op in UNARY:
            x = self.expr(ins[0], self.bcast(ins[0], shape, idx))
            if n.op is Op.CAST:
                return ex.cast(DType(n.attrs["dtype"]), x)
            if n.op is Op.NEG:
                return Expr(X.NEG, (x,))
            return ex.call(function_of(n), x)
        if n.op in BINARY:
            a, b = (self.expr(x, self.bcast(x, shape, idx)) for x in ins[:2])
            return ex.call(Fn.POW, a, b) if n.op is Op.POW else Expr(_BINARY[n.op], (a, b))
        if n.op is Op.GLU:
            a, b = (self.expr(x, self.bcast(x, shape, idx)) for x in ins[:2])
            return Expr(X.MUL, (ex.call(Fn(n.attrs["act"]), a), b))
        if n.op is Op.ROPE:
            x, cos, sin = ins
            half = shape[-1] // 2
            j = idx[-1]
            lo, hi = idx[:-1] + [j + half], idx[:-1] + [j - half]
            rot = ex.where(ex.less(j, half), Expr(X.NEG, (self.expr(x, lo),)), self.expr(x, hi))
            return Expr(X.ADD, (Expr(X.MUL, (self.expr(x, idx), self.expr(cos, self.bcast(cos, shape, idx)))),
                                Expr(X.MUL, (rot, self.expr(sin, self.bcast(sin, shape, idx))))))
        if n.op is Op.CONCAT:
            dim = n.attrs["dim"] % len(shape)
            start, parts = ex.const(0), []
            for x in ins:
                sub = list(idx)
                sub[dim] = idx[dim] - start
                start = start + ex.from_dim(x.type.shape[dim])
                parts.append((start, self.expr(x, sub)))
            out = parts[-1][1]
            for bound, e in reversed(parts[:-1]):
                out = ex.where(ex.less(idx[dim], bound), e, out)
            return out
        raise LoweringError(f"op {n.op.value} cannot be rendered as a pointwise expression")

    def bcast(self, x, shape, idx: list[Expr]) -> list[Expr]:
        if not isinstance(x, (Node, ParamRef)):
            return idx
        xs = x.type.shape if isinstance(x, Node) else self.c.module.params[x.name].type.shape
        lead = len(shape) - len(xs)
        return [(ex.const(0) if d == 1 and shape[lead + k] != 1 else idx[lead + k]) for k, d in enumerate(xs)]

    @staticmethod
    def view_index(n: Node, idx: list[Expr]) -> list[Expr]:
        """The indices of a view's source for the view's indices ``idx``."""
        src, a = n.inputs[0].type.shape, n.attrs
        if n.op is Op.TRANSPOSE:
            out = list(idx)
            d0, d1 = a["dim0"] % len(idx), a["dim1"] % len(idx)
            out[d0], out[d1] = idx[d1], idx[d0]
            return out
        if n.op is Op.PERMUTE:
            out = [None] * len(idx)
            for k, d in enumerate(a["dims"]):
                out[d % len(idx)] = idx[k]
            return out
        if n.op is Op.UNSQUEEZE:
            d = a["dim"] % len(idx)
            return idx[:d] + idx[d + 1:]
        if n.op is Op.EXPAND:
            lead = len(idx) - len(src)
            return [(ex.const(0) if s == 1 and n.type.shape[lead + k] != 1 else idx[lead + k])
                    for k, s in enumerate(src)]
        if n.op is Op.SLICE:
            d = a["dim"] % len(idx)
            out = list(idx)
            out[d] = ex.const(a.get("start") or 0) + ex.const(a.get("step") or 1) * idx[d]
            return out
        # reshape: flatten over the output shape, unflatten over the input shape
        lin = ex.const(0)
        for i, size in zip(idx, n.type.shape):
            lin = lin * ex.from_dim(size) + i
        out, rest = [], lin
        for size in reversed(src):
            out.append(rest % ex.from_dim(size))
            rest = rest // ex.from_dim(size)
        return list(reversed(out))


def pointwise_spec(c, g: Group):
    outs = list(g.outputs.values())
    shape = outs[0].type.shape
    tree = _Tree(c, set(g.nodes))
    idx = [ex.var(f"i{k}") for k in range(len(shape))]
    exprs = [tree.expr(o, idx) for o in outs]
    args = [c.out(o) for o in outs] + tree.args
    dims = tuple(ex.from_dim(d) for d in shape)
    spec = PointwiseSpec(
        shape=dims, numel=ex.product(dims),
        ops=tuple(sorted({n.op for n in g.nodes if n.op not in VIEW_OPS}, key=lambda o: o.value)),
        outputs=tuple(PointwiseOutput(f"o{k}", o.type.dtype, k, e) for k, (o, e) in enumerate(zip(outs, exprs))),
        loads=tuple(PointwiseLoad(f"in{k}", a.dtype, len(outs) + k) for k, a in enumerate(tree.args)))
    return spec, args
