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


@dataclass(frozen=True)
class Origin:
    """Where a node came from: the HF module path (``model.layers.3.self_attn``) and the index
    of the transformer layer it belongs to (None outside the layers: embedding, final norm,
    lm_head). The frontend stamps both; passes copy a node's origin to what replaces it, and
    nothing reads a layer out of the path."""
    module: str = ""
    layer: Optional[int] = None

    def __post_init__(self):
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValueError(f"bad layer index {self.layer!r}")

    def __bool__(self) -> bool:
        return bool(self.module) or self.layer is not None

    def __str__(self) -> str:
        return self.module

    def text(self) -> str:
        """As the IR text writes it after a node: ``[layer 3] model.layers.3.self_attn``."""
        return (f"[layer {self.layer}] " if self.layer is not None else "") + self.module

    @staticmethod
    def parse(text: str) -> "Origin":
        text = text.strip()
        if text.startswith("[layer "):
            head, sep, rest = text.partition("]")
            if not sep or not head[7:].strip().isdigit():
                raise ValueError(f"bad origin {text!r}; expected [layer N] module.path")
            return Origin(rest.strip(), int(head[7:]))
        return Origin(text)


NO_ORIGIN = Origin()


def common_origin(origins) -> Origin:
    """The origin of a node that replaces several (a fused linear): their common module path,
    and their layer if they share one."""
    origins = list(origins)
    parts = [o.module.split(".") for o in origins]
    prefix = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        prefix.append(col[0])
    layers = {o.layer for o in origins}
    return Origin(".".join(prefix), layers.pop() if len(layers) == 1 else None)


@dataclass(eq=False)
class Node:
    op: Op
    inputs: tuple = ()
    attrs: dict = field(default_factory=dict)
    type: Optional[TensorType] = None
    origin: Origin = NO_ORIGIN
    name: str = ""

    def __post_init__(self):
        self.inputs = tuple(self.inputs)
        self.attrs = {k: freeze(v) for k, v in sorted(self.attrs.items())}
        if isinstance(self.origin, str):
            self.origin = Origin(self.origin)
        elif not isinstance(self.origin, Origin):
            raise ValueError(f"a node's origin must be an Origin, got {self.origin!r}")

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


def stage_graph(name: str, stage: int) -> str:
    """What pipeline stage ``stage`` calls its part of graph ``name`` (split_pipeline_stages)."""
    return f"{name}_stage{stage}"


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

    def stage_params(self, stage: int, pp: int) -> set[str]:
        """Weights the graphs of pipeline ``stage`` read (all graphs' when pp == 1)."""
        graphs = [g for n, g in self.graphs.items() if pp == 1 or n.endswith(stage_graph("", stage))]
        return set().union(*(g.param_names() for g in graphs))

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
