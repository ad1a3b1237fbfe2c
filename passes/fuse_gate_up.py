"""Fuse the gate and up projections of a gated MLP (the two linears feeding one glu)
into one linear over concatenated weights."""
from __future__ import annotations

from ffc.ir import Node, Op

from .horizontal import fuse_siblings
from .quantize_weights import source_format
from .rewrite import per_graph


def _choose(siblings: list[Node], users: dict) -> list[list[Node]]:
    groups: dict[Node, list[Node]] = {}
    for n in siblings:
        for u in users.get(n, []):
            if u.op is Op.GLU:
                groups.setdefault(u, []).append(n)
    return [g for glu, g in groups.items() if len(g) == 2 and set(glu.inputs) == set(g)]


@per_graph
def fuse_gate_up(graph, module, ctx):
    """Fuse each gated MLP's gate/up projections into one linear."""
    fuse_siblings(graph, module, _choose, lambda w: source_format(module, w, ctx.source_formats))
