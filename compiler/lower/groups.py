"""Kernel groups: which IR nodes one kernel computes. Fusion forms groups around anchors;
partition puts every remaining node in one; the order of the groups is the plan's steps.

A ``Grouping`` is the one piece of state these two phases share: the graph, its users,
the groups formed so far and the owner of each node. Fusion builds it, partition finishes
it, and from then on it is only read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ffc.errors import FfcError
from ffc.ir import Graph, Node, Op
from ffc.ir.types import eval_dim
from ffc.plan.kernels import Family

from .views import VIEW_OPS


class LoweringError(FfcError):
    """An IR graph cannot be lowered to generated kernels."""


@dataclass(frozen=True)
class GluParts:
    """A linear whose output halves feed act(gate) * up: the act and where each half starts."""
    act: str
    gate_start: int
    up_start: int


@dataclass(eq=False)
class Group:
    family: Family
    nodes: list[Node]                      # the anchor first
    outputs: dict[str, Node]               # role -> the node whose value this kernel writes
    reasons: list[str] = field(default_factory=list)
    glu: Optional[GluParts] = None         # linear: the GLU epilogue
    residual: Optional[Node] = None        # linear: the addend of its epilogue; norm: the add of its prologue
    gather: Optional[Node] = None          # norm: the row indices it normalizes
    rope: bool = False                     # attention: q and k rotated inside

    @property
    def anchor(self) -> Node:
        return self.nodes[0]


def bytes_per_token(node: Node) -> float:
    """Bytes of a value per token (per unit of its dynamic dims; the whole value if static)."""
    env = {"T": 1, "N": 1, "S": 1, "B": 1}
    try:
        return float(math.prod(eval_dim(d, env) for d in node.type.shape)) * node.type.dtype.itemsize
    except KeyError:
        return 0.0


class Grouping:
    """The groups of one graph and the owner of each node."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.users()
        self.index = {n: k for k, n in enumerate(graph.all_nodes())}
        self.owner: dict[Node, Group] = {}
        self.groups: list[Group] = []

    def group(self, anchor: Node, family: Family) -> Group:
        """The group anchored at ``anchor``, made if it does not exist yet."""
        g = self.owner.get(anchor)
        if g is None:
            g = Group(family, [anchor], {"out": anchor})
            self.owner[anchor] = g
            self.groups.append(g)
        return g

    def add(self, g: Group, *nodes: Node) -> None:
        for n in nodes:
            if n not in g.nodes:
                g.nodes.append(n)
            self.owner[n] = g

    def only_user(self, n: Node) -> Optional[Node]:
        us = self.users.get(n, [])
        return us[0] if len(us) == 1 and n not in self.graph.outputs else None

    def free(self, *nodes) -> bool:
        return all(isinstance(n, Node) and n not in self.owner for n in nodes)

    def consumers(self, n: Node) -> list[Node]:
        """Users of ``n``, looking through view ops."""
        out = []
        for u in self.users.get(n, []):
            if u.op in VIEW_OPS and u in self.graph.outputs:
                out.append(u)
            out.extend(self.consumers(u) if u.op in VIEW_OPS else [u])
        return out

    def materialized(self, n: Node) -> bool:
        """Whether a kernel writes ``n`` (or it is a graph input)."""
        if n.op is Op.INPUT:
            return True
        g = self.owner.get(n)
        return g is not None and any(o is n for o in g.outputs.values())
