"""The ffc IR: a Module of named Graphs over shared, named parameters.

A Graph is an SSA list of Nodes in topological order. A node's inputs are other
nodes, parameter references (``ParamRef``) or scalar literals. Parameters live in the
Module; a parameter may carry a *recipe* (an op over other parameters) that the
compiler evaluates when it writes weights, which is how passes transform weights
(concatenate Q/K/V, transpose Conv1D) while staying pure functions of the IR.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

from .ops import Op
from .types import TensorType

Scalar = Union[int, float, bool, None]


@dataclass(frozen=True)
class ParamRef:
    name: str

    def __str__(self) -> str:
        return f"@{self.name}"


def freeze(value: Any) -> Any:
    """Attribute values are immutable: lists become tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


@dataclass(eq=False)
class Node:
    op: Op
    inputs: tuple = ()
    attrs: dict = field(default_factory=dict)
    type: Optional[TensorType] = None
    origin: str = ""
    name: str = ""

    def __post_init__(self):
        self.inputs = tuple(self.inputs)
        self.attrs = {k: freeze(v) for k, v in sorted(self.attrs.items())}

    @property
    def node_inputs(self) -> list["Node"]:
        return [i for i in self.inputs if isinstance(i, Node)]

    @property
    def param_inputs(self) -> list[ParamRef]:
        return [i for i in self.inputs if isinstance(i, ParamRef)]

    def __repr__(self) -> str:
        return f"<Node %{self.name} {self.op.value}>"


@dataclass(frozen=True)
class Recipe:
    """How a derived parameter is computed from others at compile time."""
    op: Op
    args: tuple  # ParamRef or scalar
    attrs: tuple = ()  # sorted (key, value) pairs

    @property
    def attr_dict(self) -> dict:
        return dict(self.attrs)


@dataclass(frozen=True)
class Param:
    name: str
    type: TensorType
    recipe: Optional[Recipe] = None


class Graph:
    def __init__(self, name: str, inputs: Iterable[Node] = (), nodes: Iterable[Node] = (),
                 outputs: Iterable[Node] = ()):
        self.name = name
        self.inputs: list[Node] = list(inputs)
        self.nodes: list[Node] = list(nodes)
        self.outputs: list[Node] = list(outputs)

    def all_nodes(self) -> Iterator[Node]:
        yield from self.inputs
        yield from self.nodes

    def input(self, name: str) -> Node:
        for n in self.inputs:
            if n.name == name:
                return n
        raise KeyError(f"graph {self.name} has no input %{name}")

    def users(self) -> dict[Node, list[Node]]:
        out: dict[Node, list[Node]] = {n: [] for n in self.all_nodes()}
        for n in self.nodes:
            for i in n.node_inputs:
                out.setdefault(i, []).append(n)
        return out

    def replace_uses(self, old: Node, new: "Node | ParamRef") -> None:
        """Every use of ``old`` becomes ``new`` (a node, or a parameter for folded constants)."""
        for n in self.nodes:
            if any(i is old for i in n.inputs):
                n.inputs = tuple(new if i is old else i for i in n.inputs)
        if isinstance(new, Node):
            self.outputs = [new if o is old else o for o in self.outputs]

    def insert_before(self, anchor: Node, new_nodes: list[Node]) -> None:
        idx = next(k for k, n in enumerate(self.nodes) if n is anchor)
        self.nodes[idx:idx] = new_nodes

    def param_names(self) -> set[str]:
        return {p.name for n in self.nodes for p in n.param_inputs}

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for n in self.all_nodes():
            out |= n.type.symbols()
        return out

    def clone(self) -> "Graph":
        mapping: dict[Node, Node] = {}

        def copy(n: Node) -> Node:
            c = Node(n.op, tuple(mapping.get(i, i) if isinstance(i, Node) else i for i in n.inputs),
                     dict(n.attrs), n.type, n.origin, n.name)
            mapping[n] = c
            return c
        inputs = [copy(n) for n in self.inputs]
        nodes = [copy(n) for n in self.nodes]
        return Graph(self.name, inputs, nodes, [mapping[o] for o in self.outputs])


class Module:
    def __init__(self, graphs: Iterable[Graph] = (), params: Iterable[Param] = (),
                 meta: Optional[dict] = None):
        self.graphs: dict[str, Graph] = {g.name: g for g in graphs}
        self.params: dict[str, Param] = {p.name: p for p in params}
        self.meta: dict = dict(meta or {})  # free-form facts kept with the IR (e.g. model family)

    def clone(self) -> "Module":
        return Module([g.clone() for g in self.graphs.values()], self.params.values(), self.meta)

    def node_count(self) -> int:
        return sum(len(g.nodes) for g in self.graphs.values())

    def prune_params(self) -> None:
        """Drop parameters no graph and no used recipe refers to."""
        used: set[str] = set()
        stack = [name for g in self.graphs.values() for name in g.param_names()]
        while stack:
            name = stack.pop()
            if name in used:
                continue
            used.add(name)
            recipe = self.params[name].recipe
            if recipe:
                stack.extend(a.name for a in recipe.args if isinstance(a, ParamRef))
        self.params = {k: v for k, v in self.params.items() if k in used}
