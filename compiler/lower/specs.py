"""Kernel specs: for each kernel group, its family's spec and the arguments of its launch.

One builder per family (``BUILDERS``). A builder reads the group's nodes, works out how each
input is read (``views``: strides, rows of contiguous elements) and fills the family's spec
(``ffc.plan.kernels``) with sizes and strides as expressions; what the target needs beyond
that (CPU weights repacked in panels) comes from its ``TargetPolicy``.
"""
from __future__ import annotations

import math
from typing import Callable

from ffc.ir import Module, Node, Op, ParamRef, TensorType
from ffc.ir.attention import KV_SCALE_BYTES
from ffc.ir.ops import WEIGHT_READS
from ffc.ir.types import DType
from ffc.plan import expr as ex
from ffc.plan.expr import Fn
from ffc.plan.kernels import (GEMV_MAX_M, AttentionSpec, CollectiveSpec, Family, GatherSpec, LinearSpec,
                              MoeSpec, NormSpec)
from ffc.plan.schema import Arg, ArgKind, Packed

from .groups import Group, LoweringError
from .partition import Partition
from .pointwise import ACTIVATIONS, function_of, pointwise_spec
from .targets import TargetPolicy
from .views import Affine, RowAccess, View, view_of

class SpecContext:
    """What every builder of one graph reads: its partition, the module's weights, how
    attention outputs are laid out, the target's policy; and the packed weights they ask for."""

    def __init__(self, part: Partition, module: Module, policy: TargetPolicy):
        self.part, self.gr, self.module, self.policy = part, part.grouping, module, policy
        self.graph = part.grouping.graph
        self.packed: dict[str, Packed] = {}
        # attention writes its output token-major ([T, H, D]) though its type is [1, H, T, D]
        self.layouts = {}
        for g in part.groups:
            if g.family is Family.ATTENTION:
                _, H, _, D = g.anchor.type.shape
                self.layouts[g.anchor] = (Affine(0, H * D), Affine(D), Affine(H * D), Affine(1))

    def view(self, value) -> View:
        return view_of(value, self.module, self.gr.materialized, self.layouts.get)

    def arg(self, value, what: str, need_const: bool = True) -> tuple[Arg, View]:
        v = self.view(value)
        if v is None:
            raise LoweringError(f"graph {self.graph.name}: {what} (%{getattr(value, 'name', value)}) is a view "
                                "that no stride pattern describes; this is a missing copy kernel")
        if need_const and not v.offset.is_const():
            raise LoweringError(f"graph {self.graph.name}: {what} starts at an offset that depends on T")
        return Arg(v.kind, v.name, v.offset.c, v.dtype), v

    def rows(self, value, what: str) -> tuple[Arg, RowAccess]:
        a, v = self.arg(value, what)
        ra = v.row_access()
        if ra is None:
            raise LoweringError(f"graph {self.graph.name}: {what} (%{value.name}) is not rows of contiguous elements")
        return a, ra

    def weight(self, value) -> Arg:
        """The stored weight a kernel reads (through a cast or dequantize: its storage)."""
        if isinstance(value, Node) and value.op in WEIGHT_READS and isinstance(value.inputs[0], ParamRef):
            value = value.inputs[0]
        if not isinstance(value, ParamRef):
            raise LoweringError(f"graph {self.graph.name}: a linear's weight is computed at run time "
                                f"(%{value.name}); only parameters are supported as weights")
        return Arg(ArgKind.PARAM, value.name, 0, self.module.params[value.name].type.dtype)

    @staticmethod
    def out(node: Node) -> Arg:
        return Arg(ArgKind.BUF, node.name, 0, node.type.dtype)

    def panel_rows(self, w: Arg) -> int:
        """Rows per panel the target packs weight ``w`` in (0: read as stored)."""
        return self.policy.qpanel_rows if w.dtype.quantized else self.policy.panel_rows

    def pack(self, w: Arg, rows: list[tuple[int, int]]) -> Arg:
        """Weight ``w``'s row ranges packed in the policy's panels, made once when the plan is bound."""
        whole = [(0, self.module.params[w.name].type.shape[0])]
        key = w.name if rows == whole else w.name + "#" + ",".join(f"{a}:{n}" for a, n in rows)
        self.packed[key] = Packed(w.name, self.panel_rows(w), tuple(tuple(r) for r in rows))
        return Arg(ArgKind.PACKED, key, 0, w.dtype)

    def tied(self, param: str) -> bool:
        """Whether ``param`` is also the weight of a plain linear (an lm_head tied to the embedding)."""
        for g in self.part.groups:
            if g.family is Family.LINEAR and g.glu is None:
                w = g.anchor.inputs[1]
                w = w.inputs[0] if isinstance(w, Node) and w.op in WEIGHT_READS else w
                if isinstance(w, ParamRef) and w.name == param:
                    return True
        return False


def _slots(names) -> tuple:
    return tuple((n, k) for k, n in enumerate(names))


def linear_spec(c: SpecContext, g: Group):
    lin, out = g.anchor, g.outputs["out"]
    x, xr = c.rows(lin.inputs[0], "the linear's input")
    w = c.weight(lin.inputs[1])
    N = out.type.shape[-1]
    glu = ex.call(Fn(g.glu.act), ex.var("v")) if g.glu else None
    gate_off, up_off = (g.glu.gate_start, g.glu.up_start) if g.glu else (0, 0)
    nr = c.panel_rows(w)
    panels = -(-N // nr) if nr else 0
    if nr:
        w = c.pack(w, [(gate_off, N), (up_off, N)] if glu else [(0, N)])
    args = [c.out(out), x, w]
    bias = len(lin.inputs) > 2 and lin.inputs[2] is not None
    if bias:
        args.append(c.weight(lin.inputs[2]))
    act = None
    for n in g.nodes:
        if n.op in ACTIVATIONS:
            act = ex.call(function_of(n), ex.var("v"))
    res_ld = ex.const(0)
    if g.residual is not None:
        r, rr = c.rows(g.residual, "the residual")
        args.append(r)
        res_ld = rr.ld
    residual = g.residual is not None
    slots = (("out", 0), ("x", 1), ("w", 2), ("bias", 3 if bias else None),
             ("res", len(args) - 1 if residual else None))
    return LinearSpec(wtype=w.dtype, K=xr.K, N=N, M=xr.rows, x_ld=xr.ld, out_ld=ex.const(N), res_ld=res_ld,
                      bias=bias, residual=residual, glu=glu, act=act, gate_off=gate_off, up_off=up_off, nr=nr,
                      panels=panels, up_panel=panels, gemv_max_m=GEMV_MAX_M, arg=slots,
                      wformat=w.dtype.value if w.dtype.quantized else ""), args


def norm_spec(c: SpecContext, g: Group):
    n, out = g.anchor, g.outputs["out"]
    args = [c.out(out)]
    names = ["out", "a"]
    b_ld = sum_ld = None
    write_sum = False
    if g.residual is not None:
        add = g.residual
        a, ar = c.rows(add.inputs[0], "the norm's residual input")
        b, br = c.rows(add.inputs[1], "the norm's residual input")
        args += [a, b]
        names.append("b")
        b_ld = br.ld
        if "sum" in g.outputs:
            args.append(c.out(g.outputs["sum"]))
            names.append("sum")
            write_sum, sum_ld = True, ex.const(ar.K)
    else:
        a, ar = c.rows(n.inputs[0], "the norm's input")
        args.append(a)
    M = ar.rows
    if g.gather is not None:
        args.append(c.arg(g.gather, "the row indices")[0])
        names.append("idx")
        M = ex.from_dim(out.type.shape[-2])
    flags = {}
    for k, p in (("weight", 1), ("bias", 2)):
        flags[k] = len(n.inputs) > p and n.inputs[p] is not None
        if flags[k]:
            args.append(c.weight(n.inputs[p]))
            names.append(k)
    return NormSpec(kind=n.op, eps=float(n.attrs["eps"]), residual=g.residual is not None, write_sum=write_sum,
                    gather=g.gather is not None, weight=flags["weight"], bias=flags["bias"], K=ar.K, M=M,
                    out_ld=ex.const(ar.K), a_ld=ar.ld, arg=_slots(names), b_ld=b_ld, sum_ld=sum_ld), args


def attention_spec(c: SpecContext, g: Group):
    n = g.anchor
    q, k, v, pos, seqs, tables, cache = n.inputs[:7]
    H, D = q.type.shape[1], q.type.shape[3]
    ctype = cache.type
    Hkv, BS, MB = ctype.shape[3], ctype.shape[4], tables.type.shape[1]
    if tables.type.shape[0] != "N" or not isinstance(MB, int):
        raise LoweringError(f"block tables %{tables.name} must be [N, blocks per sequence], got {tables.type}")
    row = D + KV_SCALE_BYTES if ctype.dtype is DType.I8 else D
    if ctype.shape[5] != row:
        raise LoweringError(f"KV cache %{cache.name} has rows of {ctype.shape[5]}, a {ctype.dtype} cache of head dim {D} "
                            f"needs {row}")
    if ctype.dtype not in c.policy.kv_dtypes:
        raise LoweringError(f"a {ctype.dtype} KV cache has no {c.policy.target.value} attention kernel; use --kv-dtype "
                            f"{' or '.join(d.value for d in c.policy.kv_dtypes)}")
    if g.rope:
        cos, sin = q.inputs[1], q.inputs[2]
        q, k = q.inputs[0], k.inputs[0]
    args = [Arg(ArgKind.BUF, n.name, 0, DType.F32)]
    strides = {}
    for role, val in (("q", q), ("k", k), ("v", v)):
        a, vw = c.arg(val, f"attention {role}")
        # strides may depend on T (an all_gather's output over heads); one head: its stride is unused
        hs = Affine(0) if vw.shape[1] == 1 else vw.strides[1]
        if vw.strides[3] != Affine(1) or vw.shape[0] != 1:
            raise LoweringError(f"attention {role} (%{val.name}) is not [1, heads, tokens, D] with unit D stride")
        strides[f"{role}_hs"], strides[f"{role}_ts"] = hs.expr(), vw.strides[2].expr()
        args.append(a)
    args += [c.arg(pos, "positions")[0], c.arg(seqs, "sequence ids")[0], c.arg(tables, "block tables")[0],
             Arg(ArgKind.CACHE, cache.name, int(n.attrs["layer"]), ctype.dtype)]
    names = ["out", "q", "k", "v", "pos", "seq", "table", "cache"]
    tree = n.attrs.get("form") == "verify"
    if tree:
        if n.attrs.get("window") is not None:
            raise LoweringError(f"a verify step's attention (%{n.name}) has a sliding window; trees need none")
        for role, val in zip(("tree_base", "tree_mask"), n.inputs[7:9]):
            args.append(c.arg(val, role)[0])
            names.append(role)
    alibi = n.attrs.get("alibi")
    if alibi is not None:                   # the heads' slopes [H], the last input
        slopes = c.weight(n.inputs[-1])
        if slopes.dtype is not DType.F32 or c.module.params[slopes.name].type.shape != (H,):
            raise LoweringError(f"ALiBi slopes @{slopes.name} of attention %{n.name} must be f32[{H}]")
        args.append(slopes)
        names.append("slopes")
    if g.rope:
        for role, val in (("cos", cos), ("sin", sin)):
            a, vw = c.arg(val, f"rope {role}")
            if vw.strides[-1] != Affine(1) or not vw.strides[-2].is_const():
                raise LoweringError(f"rope table {role} (%{val.name}) is not [tokens, D] rows")
            strides[f"{role}_ts"] = vw.strides[-2].expr()
            args.append(a)
            names.append(role)
    return AttentionSpec(H=H, Hkv=Hkv, D=D, BS=BS, MB=MB, ctype=ctype.dtype, row=ctype.shape[5],
                         scale=float(n.attrs.get("scale") or 1.0 / math.sqrt(D)), window=n.attrs.get("window"),
                         rope=g.rope, arg=_slots(names), tree=tree, softcap=n.attrs.get("softcap"), alibi=alibi,
                         **strides), args


def gather_spec(c: SpecContext, g: Group):
    n, out = g.anchor, g.outputs["out"]
    if n.op is Op.EMBEDDING:
        ids, table = n.inputs[0], n.inputs[1]
        tab = c.weight(table)
        rows, K = c.module.params[tab.name].type.shape
        idx, _ = c.arg(ids, "token ids")
        nr = 0
        if tab.dtype.quantized and c.panel_rows(tab):    # blocks read from panels (the lm_head's, when tied)
            tab, nr = c.pack(tab, [(0, rows)]), c.panel_rows(tab)
        elif c.policy.panel_rows and c.tied(tab.name):   # read the lm_head's panels: no second copy
            tab, nr = c.pack(tab, [(0, rows)]), c.policy.panel_rows
        M = ex.product(ex.from_dim(d) for d in ids.type.shape if d != 1)
        return GatherSpec(wtype=tab.dtype, rows=ex.const(rows), K=K, M=M, tab_ld=ex.const(K), out_ld=ex.const(K),
                          nr=nr, arg=_slots(["out", "table", "idx"]),
                          wformat=tab.dtype.value if tab.dtype.quantized else ""), [c.out(out), tab, idx]
    x, idxv = n.inputs     # take rows along the token dim
    if n.attrs["dim"] % n.type.rank != n.type.rank - 2:
        raise LoweringError(f"take along dim {n.attrs['dim']} (%{n.name}) has no kernel")
    a, rr = c.rows(x, "the take input")
    return GatherSpec(wtype=DType.F32, rows=rr.rows, K=rr.K, M=ex.from_dim(out.type.shape[-2]), tab_ld=rr.ld,
                      out_ld=ex.const(rr.K), nr=0, arg=_slots(["out", "table", "idx"])), \
        [c.out(out), a, c.arg(idxv, "indices")[0]]


def moe_spec(c: SpecContext, g: Group):
    """Routing (moe_route) or the grouped experts (moe_experts), whose act(gate) * up rows go
    to a buffer of their own: a second output, ``work``, that no IR node names."""
    n, out = g.anchor, g.outputs["out"]
    if n.op is Op.MOE_ROUTE:
        a, ar = c.rows(n.inputs[0], "the router logits")
        return MoeSpec(route=True, M=ar.rows, E=ar.K, top_k=int(n.attrs["top_k"]), in_ld=ar.ld, w_ld=ex.const(0),
                       out_ld=ex.const(ar.K), normalize=bool(n.attrs["normalize"]),
                       arg=_slots(["out", "x"])), [c.out(out), a]
    x, xr = c.rows(n.inputs[0], "the experts' input")
    w, wr = c.rows(n.inputs[1], "the routing weights")
    gu, dn = c.weight(n.inputs[2]), c.weight(n.inputs[3])
    if gu.dtype.quantized or dn.dtype.quantized:
        raise LoweringError(f"graph {c.graph.name}: the experts of %{n.name} are in quantized blocks, which no "
                            "kernel reads yet")
    E, inner2, H = c.module.params[gu.name].type.shape
    k = int(n.attrs["top_k"])
    work = Node(Op.INPUT, type=TensorType(DType.F32, tuple(n.type.shape[:-1]) + (k * (inner2 // 2),)),
                name=f"{n.name}_work")
    g.outputs["work"] = work
    return MoeSpec(route=False, M=xr.rows, E=E, top_k=k, in_ld=xr.ld, w_ld=wr.ld, out_ld=ex.const(H), H=H,
                   I=inner2 // 2, act=ex.call(Fn(n.attrs["act"]), ex.var("v")), wtype=gu.dtype,
                   arg=_slots(["out", "x", "w", "gate_up", "down", "work"])), [c.out(out), x, w, gu, dn, c.out(work)]


def collective_spec(c: SpecContext, g: Group):
    """Not a kernel: the executor stops here and the runtime runs the collective on the arena.
    The input may be any view (its strides, affine in T and N, are in the spec: the runtime
    reads it with as_strided); the output is written contiguous."""
    n = g.anchor
    out_shape = tuple(ex.from_dim(d) for d in n.type.shape)
    if n.op is Op.RECV:     # from the previous pipeline stage, into its arena buffer
        return CollectiveSpec(Op.RECV, out_shape, peer=n.attrs["peer"]), [c.out(g.outputs["out"])]
    a, v = c.arg(n.inputs[0], f"{n.op.value} input")
    return CollectiveSpec(n.op, out_shape, in_shape=tuple(ex.from_dim(d) for d in n.inputs[0].type.shape),
                          in_strides=tuple(s.expr() for s in v.strides), dim=n.attrs.get("dim"),
                          ranks=n.attrs.get("ranks"), peer=n.attrs.get("peer")), [c.out(g.outputs["out"]), a]


BUILDERS: dict[Family, Callable] = {
    Family.LINEAR: linear_spec, Family.NORM: norm_spec, Family.ATTENTION: attention_spec,
    Family.GATHER: gather_spec, Family.POINTWISE: pointwise_spec, Family.COLLECTIVE: collective_spec,
    Family.MOE: moe_spec,
}
