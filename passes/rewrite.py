"""Pattern-rewrite driver: a table of op -> rules, applied to a fixed point.

A rule gets the matched node and a ``Match`` helper and returns a list of new nodes
(in order; the last one replaces the matched node) or ``None`` when it does not apply.
"""
from __future__ import annotations

from typing import Callable, Optional

from ffc.ir import Graph, Module, Node, Op, ParamRef

Rule = Callable[[Node, "Match"], Optional[list]]


class Match:
    """Read-only helpers for rules: operand inspection over the current graph."""

    def __init__(self, graph: Graph, module: Module):
        self.graph = graph
        self.module = module

    @staticmethod
    def is_op(x, *ops: Op) -> bool:
        return isinstance(x, Node) and x.op in ops

    @staticmethod
    def scalar(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def param_type(self, x):
        return self.module.params[x.name].type if isinstance(x, ParamRef) else None

    @staticmethod
    def operands(node: Node, first_pred) -> Optional[tuple]:
        """For a two-operand commutative node: (a, b) with ``first_pred(a)`` true, either order."""
        a, b = node.inputs
        if first_pred(a):
            return a, b
        if first_pred(b):
            return b, a
        return None


def apply_rules(graph: Graph, module: Module, rules: dict[Op, list[Rule]], max_rounds: int = 20) -> int:
    """Rewrite ``graph`` in place until no rule applies; returns the number of rewrites."""
    m = Match(graph, module)
    total = 0
    for _ in range(max_rounds):
        changed = 0
        for node in list(graph.nodes):
            for rule in rules.get(node.op, ()):
                new = rule(node, m)
                if new is None:
                    continue
                existing = set(graph.all_nodes())
                added = [n for n in new if isinstance(n, Node) and n not in existing]
                graph.insert_before(node, added)
                graph.replace_uses(node, new[-1])
                graph.nodes.remove(node)
                changed += 1
                break
        total += changed
        if not changed:
            return total
    return total


def per_graph(fn: Callable[[Graph, Module, object], None]):
    """Lift an in-place graph transformation to a pure Module -> Module pass."""
    def run(module: Module, ctx) -> Module:
        out = module.clone()
        for g in out.graphs.values():
            fn(g, out, ctx)
        out.prune_params()
        return out
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run
