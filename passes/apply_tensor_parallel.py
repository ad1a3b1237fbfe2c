"""Apply a tensor-parallel strategy: the forward graph becomes what one rank runs (SPMD).

Matches: a ``forward`` graph and ``ctx.strategy`` (per node, by its printed name: input
placements and output placement), which the strategy search made on this same graph. Guarantees: every
value gets its rank-local shape; sharded weights become ``local_shard`` recipes (each rank's
weights file holds only its slice); between a producer's placement and what a consumer needs,
the collective that converts it is inserted once per (value, placement): all_reduce (P->R),
all_gather (S->R), reduce_scatter (P->S), all_gather + local_shard (S->S'), local_shard (R->S);
graph outputs are replicated. Every value's type carries its placement (``f32[1,T,288]<S(2)>``,
sharded weights too) and ``meta.tp`` the degree, so the verifier checks each node's placements
against its op's sharding rule. The result equals the unsharded graph on every rank.
"""
from __future__ import annotations

from dataclasses import replace

from ffc.ir import Graph, Module, Node, Op, TensorType
from ffc.ir.graph import Param, ParamRef, Recipe
from ffc.ir.ops import SHAPE_ATTRS
from ffc.ir.sharding import Placement, R, local_shape
from ffc.ir.text import node_names
from ffc.ir.types import PlacementKind

from .manager import PassContext


def apply_tensor_parallel(module: Module, ctx: PassContext) -> Module:
    """Rewrite ``forward`` for one rank of the strategy's tp (no-op without one or at tp=1)."""
    st = ctx.strategy
    if st is None or st.tp == 1 or "forward" not in module.graphs:
        return module
    tp = st.tp
    out = module.clone()
    g = out.graphs["forward"]
    names = node_names(g)
    choice = st.placements()
    missing = [names[n] for n in g.nodes if names[n] not in choice]
    if missing:
        raise ValueError(f"the tensor-parallel plan has no placement for %{missing[0]} "
                         f"({len(missing)} nodes); it was made for another graph")
    placed: dict[Node, Placement] = {n: R for n in g.inputs}
    converted: dict[tuple, Node] = {}
    new_nodes: list[Node] = []

    def emit(op, inputs, attrs, type_, origin) -> Node:
        n = Node(op, inputs, attrs, type_, origin)
        new_nodes.append(n)
        return n

    def reshard(v: Node, want: Placement) -> Node:
        have = placed[v]
        if have == want or (want.kind is PlacementKind.P and have.kind is PlacementKind.P):
            return v
        key = (v, want)
        if key in converted:
            return converted[key]
        t = v.type
        if want.kind is PlacementKind.P:
            raise ValueError(f"%{names.get(v, v.name)} is {have}; nothing turns that into a partial sum")
        if have.kind is PlacementKind.P:
            if want.kind is PlacementKind.R:
                res = emit(Op.ALL_REDUCE, (v,), {"ranks": tp}, t.placed(R), v.origin)
            else:
                res = emit(Op.REDUCE_SCATTER, (v,), {"dim": want.dim, "ranks": tp},
                           t.with_shape(local_shape(t.shape, want, tp)).placed(want), v.origin)
        elif have.kind is PlacementKind.S:
            full = list(t.shape)
            full[have.dim] = full[have.dim] * tp
            res = emit(Op.ALL_GATHER, (v,), {"dim": have.dim, "ranks": tp}, t.with_shape(tuple(full)).placed(R),
                       v.origin)
            if want.kind is PlacementKind.S:
                res = emit(Op.LOCAL_SHARD, (res,), {"dim": want.dim, "ranks": tp},
                           t.with_shape(local_shape(tuple(full), want, tp)).placed(want), v.origin)
        else:   # R -> S: this rank's slice
            res = emit(Op.LOCAL_SHARD, (v,), {"dim": want.dim, "ranks": tp},
                       t.with_shape(local_shape(t.shape, want, tp)).placed(want), v.origin)
        converted[key] = res
        return res

    def shard_param(ref: ParamRef, want: Placement) -> ParamRef:
        if want is None or want.kind is PlacementKind.R:
            return ref
        if want.kind is not PlacementKind.S:
            raise ValueError(f"weight @{ref.name} cannot be {want}")
        name = f"{ref.name}.shard{want.dim}of{tp}"
        if name not in out.params:
            p = out.params[ref.name]
            out.params[name] = Param(name, TensorType(p.type.dtype, local_shape(p.type.shape, want, tp), want),
                                     Recipe(Op.LOCAL_SHARD, (ref,), (("dim", want.dim), ("ranks", tp))))
        return ParamRef(name)

    mapping: dict[Node, Node] = {n: n for n in g.inputs}
    for n in g.nodes:
        ins_want, out_place = choice[names[n]]
        new_inputs = []
        for v, want in zip(n.inputs, ins_want):
            if isinstance(v, Node):
                new_inputs.append(reshard(mapping[v], want if want is not None else R))
            elif isinstance(v, ParamRef):
                new_inputs.append(shard_param(v, want))
            else:
                new_inputs.append(v)
        attrs = dict(n.attrs)
        key = SHAPE_ATTRS.get(n.op)
        if key is not None and out_place.kind is PlacementKind.S:
            attrs[key] = local_shape(tuple(attrs[key]), out_place, tp)
        nn = emit(n.op, tuple(new_inputs), attrs,
                  n.type.with_shape(local_shape(n.type.shape, out_place, tp)).placed(out_place), n.origin)
        mapping[n] = nn
        placed[nn] = out_place
    outputs = [reshard(mapping[o], R) for o in g.outputs]
    for n in g.inputs:
        n.type = n.type.placed(R)
    out.graphs["forward"] = Graph("forward", g.inputs, new_nodes, outputs)
    out.meta = dict(out.meta, tp=tp)
    out.prune_params()
    out.params = {k: p if p.type.placement else replace(p, type=p.type.placed(R))   # every weight placed
                  for k, p in out.params.items()}
    return out
