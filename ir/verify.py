"""The verifier: SSA, definitions before uses, parameters, attributes and types.

Types are checked by evaluating each op's shape rule (or its reference implementation
on meta tensors) under two different bindings of the graph's symbols, so a type that
is right for one sequence length by accident is still caught.
"""
from __future__ import annotations

import torch

from .graph import Graph, Module, Node, ParamRef
from .ops import REGISTRY, SHAPE_ATTRS, Op
from .sharding import check_placements
from .text import format_node, node_names
from .types import DType, eval_dim


class VerifyError(ValueError):
    def __init__(self, msg: str, node_line: str = ""):
        super().__init__(msg + (f"\n    {node_line}" if node_line else ""))
        self.node_line = node_line


def bind_attrs(node: Node, env: dict[str, int]) -> dict:
    """Attributes with symbolic shape entries evaluated under ``env``."""
    attrs = dict(node.attrs)
    key = SHAPE_ATTRS.get(node.op)
    if key is not None:
        attrs[key] = tuple(eval_dim(d, env) for d in attrs[key])
    return attrs


_SHAPES: dict = {}   # (op, attrs, input shapes/dtypes/scalars) -> output shape: layers repeat


def infer_shape(node: Node, in_types: list, env: dict[str, int]) -> tuple[int, ...]:
    """Output shape of ``node`` for concrete inputs under ``env``."""
    opdef = REGISTRY[node.op]
    attrs = bind_attrs(node, env)
    shapes = [t.concrete(env) if t is not None else None for t in in_types]
    key = (node.op, tuple(sorted(attrs.items())), tuple(shapes),
           tuple(t.dtype if t is not None else repr(a) for a, t in zip(node.inputs, in_types)))
    try:
        hit = _SHAPES.get(key)
    except TypeError:  # an unhashable attribute value: compute without the memo
        key, hit = None, None
    if hit is not None:
        return hit
    if opdef.shape is not None:
        out = tuple(opdef.shape(shapes, **attrs))
    else:
        args = [torch.empty(s, dtype=t.torch_dtype, device="meta") if t is not None else a
                for a, t, s in zip(node.inputs, in_types, shapes)]
        out = tuple(opdef.ref(*args, **attrs).shape)
    if key is not None and len(_SHAPES) < 100_000:
        _SHAPES[key] = out
    return out


def verify_module(module: Module) -> None:
    for p in module.params.values():
        if p.recipe:
            for a in p.recipe.args:
                if isinstance(a, ParamRef) and a.name not in module.params:
                    raise VerifyError(f"param @{p.name}: recipe uses unknown param @{a.name}")
    for g in module.graphs.values():
        verify_graph(g, module)


def verify_graph(g: Graph, module: Module) -> None:
    names = node_names(g)
    defined: set[int] = set()
    seen_names: set[str] = set()
    for n in g.inputs:
        if n.op is not Op.INPUT or n.name in seen_names:
            raise VerifyError(f"graph {g.name}: bad or duplicate input %{n.name}")
        seen_names.add(n.name)
        defined.add(id(n))
    symbols = sorted(g.symbols())
    bindings = [{s: 5 + 3 * k for k, s in enumerate(symbols)},
                {s: 13 + 2 * k for k, s in enumerate(symbols)}]
    for n in g.nodes:
        line = format_node(n, names) if all(i in names for i in n.node_inputs) else repr(n)
        if n.op is Op.INPUT:
            raise VerifyError(f"graph {g.name}: input node among the body", line)
        if id(n) in defined:
            raise VerifyError(f"graph {g.name}: node appears twice", line)
        if n.type is None:
            raise VerifyError(f"graph {g.name}: node has no type", line)
        for i in n.node_inputs:
            if id(i) not in defined:
                raise VerifyError(f"graph {g.name}: operand %{names.get(i, i.name)} is used before "
                                  "it is defined", line)
        in_types = []
        for i in n.inputs:
            if isinstance(i, ParamRef):
                if i.name not in module.params:
                    raise VerifyError(f"graph {g.name}: unknown parameter @{i.name}", line)
                in_types.append(module.params[i.name].type)
            elif isinstance(i, Node):
                in_types.append(i.type)
            else:
                in_types.append(None)
        allowed = set(REGISTRY[n.op].attrs)
        if set(n.attrs) - allowed:
            raise VerifyError(f"graph {g.name}: {n.op.value} takes attributes {sorted(allowed)}, "
                              f"not {sorted(set(n.attrs) - allowed)}", line)
        if n.op is Op.DEQUANTIZE and (in_types[0] is None or in_types[0].dtype.value != n.attrs.get("format")
                                      or n.type.dtype is not DType.F32):
            raise VerifyError(f"graph {g.name}: dequantize reads a {n.attrs.get('format')} weight into f32, but its "
                              f"operand is {in_types[0]} and its result {n.type}", line)
        for env in bindings:
            try:
                shape = infer_shape(n, in_types, env)
            except Exception as e:  # the op's own rule rejected the operands
                raise VerifyError(f"graph {g.name}: {n.op.value} rejects its operands ({e})", line) from None
            declared = n.type.concrete(env)
            if shape != declared:
                raise VerifyError(f"graph {g.name}: declared type {n.type} but the op gives shape "
                                  f"{list(shape)} when {env}", line)
        defined.add(id(n))
    for o in g.outputs:
        if id(o) not in defined:
            raise VerifyError(f"graph {g.name}: output %{o.name} is not defined")
    tp = int(module.meta.get("tp", 1))
    if tp > 1:
        stage = g.name.rpartition("_stage")[2]
        inner = stage.isdigit() and int(stage) < int(module.meta.get("pp", 1)) - 1
        bad = check_placements(g, module.params, tp, outputs_replicated=not inner)
        if bad is not None:
            n, why = bad
            raise VerifyError(f"graph {g.name}: {why}", format_node(n, names) if n in names else f"%{n.name}")
