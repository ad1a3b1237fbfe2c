"""Merge nodes that compute the same op on the same operands with the same attributes."""
from __future__ import annotations

from ffc.ir import Node
from ffc.ir.ops import EFFECTFUL

from .rewrite import per_graph


def _key(n: Node):
    ins = tuple(("n", id(i)) if isinstance(i, Node) else ("v", repr(i)) for i in n.inputs)
    return (n.op, ins, tuple(sorted((k, repr(v)) for k, v in n.attrs.items())), n.type)


@per_graph
def eliminate_common_subexpressions(graph, module, ctx):
    """Merge duplicate pure nodes; the first occurrence (and its origin) is kept."""
    seen: dict = {}
    keep = []
    for n in graph.nodes:
        if n.op in EFFECTFUL:
            keep.append(n)
            continue
        k = _key(n)
        if k in seen:
            graph.replace_uses(n, seen[k])
            continue
        seen[k] = n
        keep.append(n)
    graph.nodes = keep
