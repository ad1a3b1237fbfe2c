"""Horizontal fusion of sibling linears (shared input) into one linear over weights
concatenated at compile time, followed by slices of its output. Used by fuse_qkv and
fuse_gate_up, which differ only in which sibling groups they choose."""
from __future__ import annotations

from typing import Callable

from ffc.ir import Graph, Module, Node, Op, Param, ParamRef, Recipe
from ffc.ir.graph import common_origin


def _common(parts: list[list[str]]) -> tuple[list[str], list[str]]:
    prefix = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        prefix.append(col[0])
    suffix = []
    for col in zip(*[p[len(prefix):][::-1] for p in parts]):
        if len(set(col)) != 1:
            break
        suffix.append(col[0])
    return prefix, suffix[::-1]


def fused_param_name(names: list[str]) -> str:
    """q_proj / k_proj / v_proj weights of one layer -> '...self_attn.q_proj+k_proj+v_proj.weight'."""
    parts = [n.split(".") for n in names]
    prefix, suffix = _common(parts)
    middles = [".".join(p[len(prefix):len(p) - len(suffix)]) for p in parts]
    return ".".join(prefix + ["+".join(middles)] + suffix)


def _fusable(n: Node) -> bool:
    return n.op is Op.LINEAR and all(isinstance(i, ParamRef) for i in n.inputs[1:])


def fuse_group(graph: Graph, module: Module, group: list[Node]) -> None:
    """Replace ``group`` (linears over the same input, in graph order) by one linear + slices."""
    x = group[0].inputs[0]
    weights = [n.inputs[1] for n in group]
    wtypes = [module.params[w.name].type for w in weights]
    rows = [t.shape[0] for t in wtypes]
    total = sum(rows)
    w_name = fused_param_name([w.name for w in weights])
    module.params[w_name] = Param(w_name, wtypes[0].with_shape((total, wtypes[0].shape[1])),
                                  Recipe(Op.CONCAT, tuple(weights), (("dim", 0),)))
    ins = [x, ParamRef(w_name)]
    if len(group[0].inputs) == 3:
        biases = [n.inputs[2] for n in group]
        b_name = fused_param_name([b.name for b in biases])
        btype = module.params[biases[0].name].type
        module.params[b_name] = Param(b_name, btype.with_shape((total,)),
                                      Recipe(Op.CONCAT, tuple(biases), (("dim", 0),)))
        ins.append(ParamRef(b_name))
    origin = common_origin(n.origin for n in group)
    out_type = group[0].type.with_shape(tuple(group[0].type.shape[:-1]) + (total,))
    fused = Node(Op.LINEAR, tuple(ins), {}, out_type, origin)
    new = [fused]
    start = 0
    last_dim = out_type.rank - 1
    for n, r in zip(group, rows):
        s = Node(Op.SLICE, (fused,), {"dim": last_dim, "start": start, "end": start + r, "step": 1},
                 n.type, n.origin)
        new.append(s)
        start += r
    graph.insert_before(group[0], new)
    for n, s in zip(group, new[1:]):
        graph.replace_uses(n, s)
    graph.nodes = [n for n in graph.nodes if n not in group]


def fuse_siblings(graph: Graph, module: Module, choose: Callable[[list[Node], dict], list[list[Node]]],
                  stored: Callable[[str], object] = lambda name: None):
    """Group fusable linears by their input; ``choose(siblings, users)`` picks the groups to fuse.
    On a tensor-parallel graph only linears with the same placement are siblings: column-parallel
    parts fuse into one rank-local stack of their shards, replicated ones into one replicated.
    ``stored(weight)``: how the model file stores a weight (a GGUF block format); only weights
    stored alike fuse, so a fused weight keeps the file's blocks (--quant gguf)."""
    by_input: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        if _fusable(n) and isinstance(n.inputs[0], Node):
            by_input.setdefault((n.inputs[0], n.type.placement), []).append(n)
    users = graph.users()
    for siblings in by_input.values():
        if len(siblings) < 2:
            continue
        for group in choose(siblings, users):
            if len(group) >= 2 and len({len(n.inputs) for n in group}) == 1 and \
                    len({module.params[n.inputs[1].name].type.shape[1] for n in group}) == 1 and \
                    len({stored(n.inputs[1].name) for n in group}) == 1:
                fuse_group(graph, module, sorted(group, key=graph.nodes.index))
