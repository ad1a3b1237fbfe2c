"""Placements and sharding rules: how each op kind may be split over a tensor-parallel axis.

A value's placement on a mesh axis of size ``tp`` is one of
  ``R``     replicated: every rank holds all of it;
  ``S(d)``  sharded on dim d: rank r holds the r-th of tp equal slices along d;
  ``P``     partial sum: the value is the sum of what the ranks hold.
Each op kind has a rule listing its legal (input placements -> output placement)
combinations for a node, next to its shape rule in spirit: the strategy search picks one
per node, and the collectives between a producer's placement and what a consumer needs
(``reshard``) are priced by the cost model. Every op may run replicated (all ``R``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping, Optional, Sequence

from .graph import Node, ParamRef
from .ops import BINARY, SHAPE_ATTRS, STORAGE_RECIPES, UNARY, WEIGHT_READS, Op
from .types import Placement, PlacementKind


R = Placement(PlacementKind.R)
P = Placement(PlacementKind.P)


def S(dim: int) -> Placement:
    return Placement(PlacementKind.S, dim)


class CollectiveKind(str, Enum):
    """The communication a change of placement costs; a device profile prices each by its value."""
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    SEND_RECV = "send_recv"         # between pipeline stages

    def __str__(self) -> str:
        return self.value


def reshard_kind(src: Placement, dst: Placement) -> Optional[CollectiveKind] | bool:
    """The collective turning ``src`` into ``dst``; False if free (the same, or a local slice
    of a replicated value), None if nothing can (a partial sum is only ever produced)."""
    if src == dst or (src.kind is PlacementKind.R and dst.kind is PlacementKind.S):
        return False
    if dst.kind is PlacementKind.P:
        return None
    if src.kind is PlacementKind.S:
        return CollectiveKind.ALL_GATHER if dst.kind is PlacementKind.R else CollectiveKind.ALL_TO_ALL
    return CollectiveKind.ALL_REDUCE if dst.kind is PlacementKind.R else CollectiveKind.REDUCE_SCATTER


@dataclass(frozen=True)
class OpStrategy:
    """One legal way to run a node: a placement per input (None for literals) and for the output."""
    name: str
    inputs: tuple
    output: Placement


Shape = Callable[[object], Optional[tuple]]   # a node's or a parameter's shape; None for literals


def _divisible(size, tp: int) -> bool:
    return isinstance(size, int) and size >= tp and size % tp == 0


def _shardable_dims(shape: Sequence, tp: int) -> list[int]:
    """Static dims that split evenly (symbolic token/batch dims stay whole)."""
    return [d for d, size in enumerate(shape) if _divisible(size, tp)]


def _aligned(out_shape: Sequence, in_shape: Optional[Sequence], d: int) -> Optional[int]:
    """Input dim that broadcasting aligns with output dim d, if it has the same size."""
    if in_shape is None:
        return None
    k = d - (len(out_shape) - len(in_shape))
    if k < 0 or in_shape[k] != out_shape[d]:
        return None
    return k


def _broadcast(node: Node, tp: int, shape: Shape, partial_ok: Callable[[int], bool] = lambda k: False
               ) -> list[OpStrategy]:
    """Elementwise with broadcasting: the output sharded on d needs each input sharded on its
    aligned dim, or replicated where it broadcasts. ``partial_ok(k)`` says the op is linear in
    input k (a partial sum stays one when the other inputs are replicated)."""
    out = node.type.shape
    ins = node.inputs
    whole = tuple(None if shape(i) is None else R for i in ins)
    res = [OpStrategy("replicated", whole, R)]
    for d in _shardable_dims(out, tp):
        places = []
        for i in ins:
            k = _aligned(out, shape(i), d)
            places.append(None if shape(i) is None else (S(k) if k is not None else R))
        res.append(OpStrategy(f"split d{d}", tuple(places), S(d)))
    tensors = [k for k, i in enumerate(ins) if isinstance(i, Node)]
    if node.op in (Op.ADD, Op.SUB) and len(tensors) > 1:   # a sum of partial sums
        res.append(OpStrategy("partial", tuple(P if k in tensors else p for k, p in enumerate(whole)), P))
    for k in tensors:                                      # linear in one input, the others whole
        if partial_ok(k) and (node.op not in (Op.ADD, Op.SUB) or len(tensors) == 1):
            res.append(OpStrategy(f"partial in{k}", tuple(P if j == k else p for j, p in enumerate(whole)), P))
    return res


def _linear(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    bias = len(node.inputs) > 2 and node.inputs[2] is not None
    n_out, k_in = shape(node.inputs[1])
    last = len(node.type.shape) - 1
    res = [OpStrategy("replicated", (R, R) + ((R,) if bias else ()), R)]
    if _divisible(n_out, tp):   # column parallel: output features split, the input whole
        res.append(OpStrategy("column", (R, S(0)) + ((S(0),) if bias else ()), S(last)))
    if _divisible(k_in, tp) and not bias:   # row parallel: reduction split, partial sums out
        res.append(OpStrategy("row", (S(last), S(1)), P))
    return res


def _embedding(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    vocab, hidden = shape(node.inputs[1])
    last = len(node.type.shape) - 1
    # (vocab-parallel lookup, rows split with a masked gather and a partial sum, is not offered
    # yet: its local op differs from the global one; the lm_head shares rows as a column linear)
    res = [OpStrategy("replicated", (R, R), R)]
    del vocab
    if _divisible(hidden, tp):
        res.append(OpStrategy("hidden", (R, S(1)), S(last)))
    return res


def _norm(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    shape = node.type.shape
    tail = tuple(R for _ in node.inputs[1:])
    res = [OpStrategy("replicated", (R,) + tail, R)]
    for d in _shardable_dims(shape[:-1], tp):   # rows split; the normalized dim stays whole
        res.append(OpStrategy(f"split d{d}", (S(d),) + tail, S(d)))
    return res


def _attention(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    """Replicated, or heads split (GQA groups kept; ALiBi's slopes [H] split with the heads)."""
    q, k = node.inputs[0], node.inputs[1]
    slopes = len(node.inputs) - 3
    res = [OpStrategy("replicated", (R, R, R) + (R,) * slopes, R)]
    if _divisible(q.type.shape[1], tp) and _divisible(k.type.shape[1], tp):
        res.append(OpStrategy("heads", (S(1), S(1), S(1)) + (S(0),) * slopes, S(1)))
    return res


def _cached_attention(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    """Attention over the KV cache (after insert_kv_cache): heads split as for attention, the
    cache [L, 2, S, Hkv, BS, D] then holding each rank's KV heads; bookkeeping (and a verify
    step's tree) replicated; ALiBi's slopes (the last input) as the heads."""
    books = (R, R, R)
    slopes = 1 if node.attrs.get("alibi") is not None else 0
    tree = (R,) * (len(node.inputs) - 7 - slopes)
    res = [OpStrategy("replicated", (R, R, R) + books + (R,) + tree + (R,) * slopes, R)]
    q, k = node.inputs[0], node.inputs[1]
    if _divisible(q.type.shape[1], tp) and _divisible(k.type.shape[1], tp):
        res.append(OpStrategy("heads", (S(1), S(1), S(1)) + books + (S(3),) + tree + (S(0),) * slopes, S(1)))
    return res


def _moe_experts(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    """Expert parallelism: each rank holds E/tp experts (their gate_up and down, split on dim 0)
    and its columns of the dense routing weights (a free slice of replicated weights: every
    rank routes over all experts), and runs them for every token; the ranks' outputs are
    partial sums of the full one."""
    experts = shape(node.inputs[2])[0]
    res = [OpStrategy("replicated", (R, R, R, R), R)]
    for d in _shardable_dims(node.type.shape[:-1], tp):    # rows (x and its weights alike)
        res.append(OpStrategy(f"split d{d}", (S(d), S(d), R, R), S(d)))
    if _divisible(experts, tp):
        res.append(OpStrategy("experts", (R, S(len(node.inputs[1].type.shape) - 1), S(0), S(0)), P))
    return res


def _dim_groups(a: Sequence, b: Sequence) -> Optional[list[tuple[list[int], list[int]]]]:
    """A reshape's factorization: groups of dims of ``a`` and ``b`` with equal products (size-1
    dims skipped, symbolic dims matched one to one); None if they do not line up."""
    groups, i, j = [], 0, 0
    while True:
        while i < len(a) and a[i] == 1:
            i += 1
        while j < len(b) and b[j] == 1:
            j += 1
        if i == len(a) or j == len(b):
            return groups if i == len(a) and j == len(b) else None
        if not isinstance(a[i], int) or not isinstance(b[j], int):
            if a[i] != b[j]:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ga, gb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(a) or not isinstance(a[i], int):
                    return None
                pa, i = pa * a[i], i + 1
                ga.append(i - 1)
            else:
                if j == len(b) or not isinstance(b[j], int):
                    return None
                pb, j = pb * b[j], j + 1
                gb.append(j - 1)
        groups.append((ga, gb))


def _view_map(node: Node, tp: int, shape: Shape) -> list[OpStrategy]:
    """Reshape/transpose/permute/unsqueeze/expand: a sharded dim follows the view."""
    x = node.inputs[0]
    src, dst = x.type.shape, node.type.shape
    mapping: dict[int, int] = {}
    if node.op is Op.TRANSPOSE:
        d0, d1 = node.attrs["dim0"] % len(src), node.attrs["dim1"] % len(src)
        perm = list(range(len(src)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        mapping = {perm[o]: o for o in range(len(dst))}
    elif node.op is Op.PERMUTE:
        mapping = {p % len(src): o for o, p in enumerate(node.attrs["dims"])}
    elif node.op is Op.UNSQUEEZE:
        u = node.attrs["dim"] % len(dst)
        mapping = {d: (d if d < u else d + 1) for d in range(len(src))}
    elif node.op is Op.EXPAND:
        off = len(dst) - len(src)
        mapping = {d: d + off for d in range(len(src)) if src[d] == dst[d + off]}
    elif node.op is Op.RESHAPE:
        for ga, gb in _dim_groups(src, dst) or []:
            mapping[ga[0]] = gb[0]   # the outermost factor carries the split
    res = [OpStrategy("replicated", (R,) + tuple(None for _ in node.inputs[1:]), R)]
    for d, o in sorted(mapping.items()):
        if _divisible(src[d], tp) and _divisible(dst[o], tp):
            res.append(OpStrategy(f"split d{o}", (S(d),) + tuple(None for _ in node.inputs[1:]), S(o)))
    if node.op is not Op.EXPAND:
        res.append(OpStrategy("partial", (P,) + tuple(None for _ in node.inputs[1:]), P))
    return res


def _along(node: Node, tp: int, shape: Shape, axis_attr: str, partial: bool) -> list[OpStrategy]:
    """Concat/slice/take/softmax/reductions along one dim: split any other dim."""
    out = node.type.shape
    axis = node.attrs.get(axis_attr)
    axes = set(axis if isinstance(axis, tuple) else (axis,)) if axis is not None else set()
    rank_in = len(node.inputs[0].type.shape)
    axes = {a % rank_in for a in axes}
    ins = node.inputs
    res = [OpStrategy("replicated", tuple(R if shape(i) is not None else None for i in ins), R)]
    keep = node.attrs.get("keepdim", True)
    for d in _shardable_dims(node.inputs[0].type.shape, tp):
        if d in axes:
            continue
        o = d if keep or node.op not in (Op.MEAN, Op.SUM) else d - sum(1 for a in axes if a < d)
        if o >= len(out) or not _divisible(out[o], tp):
            continue
        places = tuple((S(d) if k == 0 or node.op is Op.CONCAT else R) if shape(i) is not None else None
                       for k, i in enumerate(ins))
        res.append(OpStrategy(f"split d{o}", places, S(o)))
    if partial:
        res.append(OpStrategy("partial", tuple((P if k == 0 else R) if shape(i) is not None else None
                                               for k, i in enumerate(ins)), P))
    return res


_LINEAR_UNARY = {Op.NEG, Op.CAST}
_Rule = Callable[[Node, int, Shape], list[OpStrategy]]
RULES: dict[Op, _Rule] = {
    Op.LINEAR: _linear,
    Op.EMBEDDING: _embedding,
    Op.RMS_NORM: _norm,
    Op.LAYER_NORM: _norm,
    Op.ATTENTION: _attention,
    Op.SDPA: _attention,
    Op.CACHED_ATTENTION: _cached_attention,
    # rope rotates pairs across the head dim: any dim but the last may split
    Op.ROPE: lambda n, tp, sh: [st for st in _broadcast(n, tp, sh) if st.output.dim != len(n.type.shape) - 1],
    Op.GLU: lambda n, tp, sh: _broadcast(n, tp, sh),
    Op.TOP_K: _norm,            # per row (over the last dim)
    Op.MOE_ROUTE: _norm,
    Op.MOE_EXPERTS: _moe_experts,
    Op.ADD: lambda n, tp, sh: _broadcast(n, tp, sh, lambda k: True),
    Op.SUB: lambda n, tp, sh: _broadcast(n, tp, sh, lambda k: True),
    Op.MUL: lambda n, tp, sh: _broadcast(n, tp, sh, lambda k: True),
    Op.DIV: lambda n, tp, sh: _broadcast(n, tp, sh, lambda k: k == 0),
    Op.POW: lambda n, tp, sh: _broadcast(n, tp, sh),
    **{op: (lambda n, tp, sh, lin=op in _LINEAR_UNARY: _broadcast(n, tp, sh, lambda k: lin)) for op in UNARY},
    Op.DEQUANTIZE: lambda n, tp, sh: _broadcast(n, tp, sh, lambda k: True),
    Op.RESHAPE: _view_map, Op.TRANSPOSE: _view_map, Op.PERMUTE: _view_map, Op.UNSQUEEZE: _view_map,
    Op.EXPAND: _view_map,
    Op.CONCAT: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=False),
    Op.SLICE: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=True),
    Op.TAKE: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=True),
    Op.SOFTMAX: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=False),
    Op.MEAN: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=False),
    Op.SUM: lambda n, tp, sh: _along(n, tp, sh, "dim", partial=True),
}
assert BINARY <= set(RULES)


def strategies(node: Node, tp: int, params: Mapping) -> list[OpStrategy]:
    """The legal strategies of ``node`` on a tensor-parallel axis of size ``tp`` (replicated
    first). ``params``: the module's parameters (for weight shapes)."""
    def shape(v) -> Optional[tuple]:
        if isinstance(v, Node):
            return tuple(v.type.shape)
        if isinstance(v, ParamRef):
            return tuple(params[v.name].type.shape)
        return None
    rule = RULES.get(node.op)
    if rule is None or tp == 1:
        return [OpStrategy("replicated", tuple(None if shape(i) is None else R for i in node.inputs), R)]
    return rule(node, tp, shape)


def local_shape(shape: Sequence, placement: Placement, tp: int) -> tuple:
    """The shape one rank holds."""
    if placement.kind is not PlacementKind.S:
        return tuple(shape)
    out = list(shape)
    out[placement.dim] = out[placement.dim] // tp
    return tuple(out)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


# collective -> (input placement, output placement) given its dim attribute
_COLLECTIVES = {
    Op.ALL_REDUCE: lambda d: (P, R),
    Op.ALL_GATHER: lambda d: (S(d), R),
    Op.REDUCE_SCATTER: lambda d: (P, S(d)),
    Op.LOCAL_SHARD: lambda d: (R, S(d)),
}


def _stacked_part(n: Node, params: Mapping) -> bool:
    """A slice taking one part of a horizontally fused column-parallel linear (fuse_qkv,
    fuse_gate_up after tensor parallelism): the fused weight is the concat of the parts' S(0)
    shards, so each rank's output is its shards side by side and the slice, at the part's
    rank-local rows, is that part's S(last) shard. No global op says this; it is checked here."""
    if n.op is not Op.SLICE or not isinstance(n.inputs[0], Node) or n.inputs[0].op is not Op.LINEAR:
        return False
    lin = n.inputs[0]
    w = lin.inputs[1]
    w = w.inputs[0] if isinstance(w, Node) and w.op in WEIGHT_READS else w
    p = params.get(w.name) if isinstance(w, ParamRef) else None
    while p is not None and p.recipe is not None and p.recipe.op in STORAGE_RECIPES:   # narrow copies of it
        p = params.get(p.recipe.args[0].name)
    if p is None or p.recipe is None or p.recipe.op is not Op.CONCAT:
        return False
    parts = [params[a.name] for a in p.recipe.args]
    last = lin.type.rank - 1
    if any(q.type.placement != S(0) for q in parts) or lin.type.placement != S(last) \
            or n.type.placement != S(last) or n.attrs["dim"] % lin.type.rank != last or n.attrs["step"] != 1:
        return False
    bounds, start = [], 0
    for q in parts:
        bounds.append((start, start + q.type.shape[0]))
        start += q.type.shape[0]
    return (n.attrs["start"], n.attrs["end"]) in bounds


def check_placements(graph, params: Mapping, tp: int, outputs_replicated: bool = True
                     ) -> Optional[tuple[Node, str]]:
    """The first node of a tensor-parallel ``graph`` whose placements break its op's rule, and
    why; None if all hold. A value's placement is its type's (unplaced: R); shapes are
    rank-local, so each node is checked as its global counterpart (sharded dims times tp)
    against ``strategies``; collectives must convert what they claim; outputs are R (except
    an inner pipeline stage's, which the next stage's ranks take as they are)."""
    def place_of(t) -> Placement:
        return t.placement or R

    def global_type(t):
        p = place_of(t)
        if p.kind is not PlacementKind.S:
            return t
        shape = list(t.shape)
        shape[p.dim] = shape[p.dim] * tp if isinstance(shape[p.dim], int) else shape[p.dim]
        return t.with_shape(shape)

    class _Global:      # a parameter as strategies() sees it: its whole shape
        def __init__(self, p):
            self.type = global_type(p.type)

    gparams = {k: _Global(p) for k, p in params.items()}
    shadow: dict = {n: Node(n.op, type=global_type(n.type), name=n.name) for n in graph.inputs}

    def placement(v) -> Optional[Placement]:
        if isinstance(v, Node):
            return place_of(v.type)
        if isinstance(v, ParamRef):
            return place_of(params[v.name].type)
        return None

    for n in graph.nodes:
        ins = tuple(placement(v) for v in n.inputs)
        out = place_of(n.type)
        if _stacked_part(n, params) or n.op is Op.RECV:      # recv: as the previous stage sent it
            shadow[n] = Node(n.op, type=global_type(n.type), name=n.name)
            continue
        if n.op is Op.SEND:
            if ins[0] != out:
                return n, f"send of a {ins[0]} value says it sends {out}"
            shadow[n] = Node(n.op, type=global_type(n.type), name=n.name)
            continue
        if n.op in _COLLECTIVES:
            if n.attrs.get("ranks") != tp:
                return n, f"{n.op.value} over {n.attrs.get('ranks')} ranks in a tp={tp} graph"
            want = _COLLECTIVES[n.op](n.attrs.get("dim"))
            if (ins[0], out) != want:
                return n, f"{n.op.value} turns {want[0]} into {want[1]}, but its input is {ins[0]} and its type says {out}"
        else:
            attrs = dict(n.attrs)
            key = SHAPE_ATTRS.get(n.op)
            if key is not None and out.kind is PlacementKind.S and isinstance(attrs[key][out.dim], int):
                sizes = list(attrs[key])
                sizes[out.dim] *= tp
                attrs[key] = tuple(sizes)
            g = Node(n.op, tuple(shadow.get(v, v) if isinstance(v, Node) else v for v in n.inputs), attrs,
                      global_type(n.type), n.origin)
            legal = strategies(g, tp, gparams)
            if not any(st.inputs == ins and st.output == out for st in legal):
                have = ", ".join("-" if p is None else str(p) for p in ins)
                options = "; ".join(f"{st.name}: ({', '.join('-' if p is None else str(p) for p in st.inputs)})"
                                    f" -> {st.output}" for st in legal)
                return n, f"placements ({have}) -> {out} are not a legal {n.op.value} strategy (legal: {options})"
        shadow[n] = g if n.op not in _COLLECTIVES else Node(n.op, type=global_type(n.type), name=n.name)
    for o in graph.outputs if outputs_replicated else ():
        if place_of(o.type) != R:
            return o, f"graph output is {place_of(o.type)}; outputs must be replicated"
    return None
