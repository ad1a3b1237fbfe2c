"""Partition: every node of the graph in exactly one kernel, and the kernels in order.

After fusion, each remaining anchor op (kernels.KERNEL_OF_OP) gets a kernel of its own; a
weight read through a cast (bf16/fp16 storage) joins the kernels that read it; the rest
are pointwise: the values some other kernel (or the graph's output) needs are the roots,
each root's kernel evaluates the pointwise and view nodes it depends on inline, and roots
of the same shape that share inlined work become one kernel with several outputs. The
groups are then ordered topologically (ties: graph order), the order of the plan's steps.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ffc.ir import Node, Op, ParamRef
from ffc.ir.ops import ELEMENTWISE, WEIGHT_INPUTS, WEIGHT_READS
from ffc.plan.kernels import KERNEL_OF_OP, Family
from ffc.plan.schema import FusionDecision, FusionKind

from .groups import Group, Grouping, LoweringError, bytes_per_token
from .views import VIEW_OPS, strip_views

POINTWISE_OPS = ELEMENTWISE | {Op.GLU, Op.CONCAT, Op.ROPE}


@dataclass(frozen=True)
class Partition:
    groups: tuple          # Group, in execution order
    grouping: Grouping     # the owner of every node


def _anchors(gr: Grouping) -> None:
    for n in gr.graph.nodes:
        if n in gr.owner or n.op in VIEW_OPS or n.op is Op.DEQUANTIZE:    # blocks: read by their kernel
            continue
        if n.op in KERNEL_OF_OP:
            gr.group(n, KERNEL_OF_OP[n.op])
        elif n.op not in POINTWISE_OPS:
            raise LoweringError(
                f"op {n.op.value} (%{n.name}, from {n.origin or 'the model'}) has no generated kernel; "
                "run this model with the interpreter (ffc.load(..., backend='interpreter'))")
    # A weight read through a cast (bf16/fp16 storage) or a dequantize (blocks) is converted
    # inside the kernel that reads it.
    for n in gr.graph.nodes:
        for k in WEIGHT_INPUTS.get(n.op, ()):
            w = n.inputs[k]
            if isinstance(w, Node) and w.op in WEIGHT_READS and isinstance(w.inputs[0], ParamRef) \
                    and w not in gr.owner and all(u.op in WEIGHT_INPUTS for u in gr.users[w]):
                gr.owner[w] = gr.owner[n]
                gr.owner[n].nodes.append(w)
    for n in gr.graph.nodes:
        if n.op is Op.DEQUANTIZE and n not in gr.owner:
            raise LoweringError(f"quantized weight {n.inputs[0]} (%{n.name}) is read by something other than a linear or "
                                "an embedding; no kernel reads blocks there")


def _inlined(gr: Grouping, root: Node, roots: set) -> list[Node]:
    """Pointwise and view nodes evaluated inside the kernel that computes ``root``."""
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.append(n)
        for i in n.node_inputs:
            if i in roots or i.op is Op.INPUT or (i in gr.owner and gr.materialized(i)):
                continue
            if i.op in POINTWISE_OPS or i.op in VIEW_OPS:
                # a view of another kernel's result reads its buffer; a view of pointwise work
                # another kernel inlines without writing it out is recomputed here too
                base = strip_views(i)
                if i.op in VIEW_OPS and base in gr.owner and (gr.materialized(base) or base.op not in POINTWISE_OPS):
                    continue
                stack.append(i)
    return out


def _pointwise(gr: Grouping) -> list[FusionDecision]:
    g = gr.graph
    roots = []
    for n in g.nodes:   # values some non-pointwise kernel (or the graph output) needs
        if n in gr.owner or n.op not in POINTWISE_OPS:
            continue
        cons = gr.consumers(n)
        if n in g.outputs or not cons or \
                any((c.op not in POINTWISE_OPS and c.op not in VIEW_OPS) or c in gr.owner for c in cons):
            roots.append(n)
    # a graph output that is a view is written out contiguous by a pointwise kernel
    roots += [o for o in g.outputs if o.op in VIEW_OPS and o not in roots]
    parent = {r: r for r in roots}

    def find(r):
        while parent[r] is not r:
            r = parent[r]
        return r
    seen: dict[Node, Node] = {}
    rootset = set(roots)

    inlined = {r: _inlined(gr, r, rootset) for r in roots}
    # the kernels each root's inlined work reads
    deps = {r: frozenset(id(gr.owner.get(i) or gr.owner[strip_views(i)]) for m in inlined[r] for i in m.node_inputs
                         if i in gr.owner or strip_views(i) in gr.owner) for r in roots}
    # roots that share inlined work, have the same shape and read the same kernels form one
    # kernel (two layers' rotary embeddings share cos/sin, but one layer's waits for the other)
    for r in roots:
        for m in inlined[r]:
            if m in seen and seen[m].type.shape == r.type.shape and deps[seen[m]] == deps[r]:
                parent[find(r)] = find(seen[m])
            seen.setdefault(m, r)
    buckets: dict[Node, list[Node]] = {}
    for r in roots:
        buckets.setdefault(find(r), []).append(r)
    decisions = []
    for rs in buckets.values():
        nodes = []
        for r in rs:
            nodes += [m for m in _inlined(gr, r, rootset) if m not in nodes]
        grp = Group(Family.POINTWISE, nodes, {f"out{k}": r for k, r in enumerate(rs)})
        gr.groups.append(grp)
        for m in nodes:
            if m.op not in VIEW_OPS:
                gr.owner[m] = grp
        for r in rs:
            gr.owner[r] = grp
        inner = [m for m in nodes if m.op in POINTWISE_OPS and m not in rs]
        if inner:
            decisions.append(FusionDecision(FusionKind.POINTWISE, tuple(f"%{m.name}" for m in (*rs, *inner)),
                                            sum(2 * bytes_per_token(m) for m in inner), True,
                                            f"{len(inner) + len(rs)} elementwise ops in one loop"))
    return decisions


def _order(gr: Grouping) -> list[Group]:
    deps: dict[int, set[int]] = {id(g): set() for g in gr.groups}
    by_id = {id(g): g for g in gr.groups}
    for g in gr.groups:
        inside = set(g.nodes)    # pointwise work several kernels recompute is inside each of them
        for n in g.nodes:
            for i in n.node_inputs:
                if i in inside:
                    continue
                og = gr.owner.get(strip_views(i))
                if og is not None and og is not g:
                    deps[id(g)].add(id(og))
    indeg = {k: len(v) for k, v in deps.items()}
    rev: dict[int, list[int]] = {k: [] for k in deps}
    for k, v in deps.items():
        for d in v:
            rev[d].append(k)

    def first(k):
        return min(gr.index[n] for n in by_id[k].nodes)
    heap = [(first(k), k) for k, d in indeg.items() if d == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, k = heapq.heappop(heap)
        out.append(by_id[k])
        for u in rev[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (first(u), u))
    if len(out) != len(gr.groups):
        left = [by_id[k] for k in deps if indeg[k] > 0]
        names = "; ".join(f"{g.family.value}[{', '.join('%' + n.name + ':' + n.op.value for n in g.nodes[:8])}]"
                          for g in left[:12])
        raise LoweringError(f"graph {gr.graph.name}: fused kernels form a cycle ({names}); this is a bug in fusion")
    return out


def partition(gr: Grouping) -> tuple[Partition, list[FusionDecision]]:
    """Finish the grouping fusion began; the groups in order, and the pointwise fusions made."""
    _anchors(gr)
    decisions = _pointwise(gr)
    return Partition(tuple(_order(gr)), gr), decisions
