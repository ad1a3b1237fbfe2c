"""Evaluate cheap ops whose operands are all weights at compile time: the node becomes
a derived parameter whose recipe the artifact writer evaluates (e.g. GPT-2's Conv1D
weight transposed into linear layout)."""
from __future__ import annotations

import re

from ffc.ir import Node, Param, ParamRef, Recipe
from ffc.ir.ops import FOLDABLE

from .rewrite import per_graph


def _name(n: Node) -> str:
    """A readable, parseable name: 'h.0.attn.c_attn.weight.transpose_0_1'."""
    base = "+".join(p.name for p in n.param_inputs)
    attrs = "_".join(re.sub(r"[^\w.-]", "", str(v)) for _, v in sorted(n.attrs.items()))
    return f"{base}.{n.op.value}" + (f"_{attrs}" if attrs else "")


@per_graph
def fold_constants(graph, module, ctx):
    """Fold elementwise/layout nodes over parameters into derived parameters."""
    keep = []
    for n in graph.nodes:
        if n.op in FOLDABLE and n.param_inputs and not n.node_inputs and n not in graph.outputs \
                and not n.type.symbols():
            name = _name(n)
            module.params.setdefault(name, Param(name, n.type, Recipe(n.op, n.inputs,
                                                                        tuple(sorted(n.attrs.items())))))
            graph.replace_uses(n, ParamRef(name))
            continue
        keep.append(n)
    graph.nodes = keep
