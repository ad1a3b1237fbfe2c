"""Fuse the Q, K and V projections of each attention (sibling linears whose results
reach the same attention op) into one linear over concatenated weights."""
from __future__ import annotations

from ffc.ir import Node, Op
from ffc.ir.ops import LAYOUT

from .horizontal import fuse_siblings
from .quantize_weights import source_format
from .rewrite import per_graph

_PASS_THROUGH = LAYOUT | {Op.ROPE}
_ATTENTION = {Op.ATTENTION, Op.SDPA, Op.CACHED_ATTENTION}


def _attention_of(n: Node, users: dict, depth: int = 6):
    """The attention op that n's result flows into through layout ops and rope, if any."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            for u in users.get(f, []):
                if u.op in _ATTENTION:
                    return u
                if u.op in _PASS_THROUGH:
                    nxt.append(u)
        frontier = nxt
    return None


def _choose(siblings: list[Node], users: dict) -> list[list[Node]]:
    groups: dict[Node, list[Node]] = {}
    for n in siblings:
        att = _attention_of(n, users)
        if att is not None:
            groups.setdefault(att, []).append(n)
    return [g for g in groups.values() if len(g) == 3]


@per_graph
def fuse_qkv(graph, module, ctx):
    """Fuse each attention's Q/K/V projections into one linear."""
    fuse_siblings(graph, module, _choose, lambda w: source_format(module, w, ctx.source_formats))
