"""Delete nodes whose results reach no graph output and that have no effect."""
from __future__ import annotations

from ffc.ir.ops import EFFECTFUL

from .rewrite import per_graph


@per_graph
def eliminate_dead_code(graph, module, ctx):
    """Delete nodes whose results reach no output (effectful nodes stay)."""
    live = set()
    stack = list(graph.outputs) + [n for n in graph.nodes if n.op in EFFECTFUL]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.node_inputs)
    graph.nodes = [n for n in graph.nodes if n in live]
