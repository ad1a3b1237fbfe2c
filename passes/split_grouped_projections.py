"""Split a fused projection whose output is laid out in groups - reshaped to [..., G, P, D] and
sliced along P - into one linear per slice. Falcon's new decoder architecture (40B, 180B)
stores its QKV weight per KV group: that group's query heads, then its K head and its V head.
Read in place, the query heads are strided twice (no view describes them) and K/V are
broadcast to every query head. Split, each part's weight is its rows of every group
(concatenated at compile time; row slices, so a GGUF file's blocks are kept exact), its
output contiguous as separate Q/K/V projections' are: the search shards them by heads and
fuse_qkv fuses them again after it."""
from __future__ import annotations

from ffc.ir import Node, Op, Param, ParamRef, Recipe

from .rewrite import per_graph


def _part_name(name: str, *parts: str) -> str:
    """'...query_key_value.weight' -> '...query_key_value.part1.g0.weight' (the class suffix kept)."""
    stem, _, last = name.rpartition(".")
    return ".".join([stem, *parts, last]) if stem else ".".join([*parts, name])


def _rows(module, name: str, groups: int, period: int, start: int, end: int, part: int) -> str:
    """A parameter of ``name``'s rows [g*period + start, g*period + end) for every group g."""
    src = module.params[name].type
    width = end - start
    pieces = []
    for g in range(groups):
        piece = _part_name(name, f"part{part}", f"g{g}")
        attrs = (("dim", 0), ("end", g * period + end), ("start", g * period + start), ("step", 1))
        module.params[piece] = Param(piece, src.with_shape((width,) + tuple(src.shape[1:])),
                                     Recipe(Op.SLICE, (ParamRef(name),), attrs))
        pieces.append(ParamRef(piece))
    whole = _part_name(name, f"part{part}")
    module.params[whole] = Param(whole, src.with_shape((groups * width,) + tuple(src.shape[1:])),
                                 Recipe(Op.CONCAT, tuple(pieces), (("dim", 0),)))
    return whole


def _grouped(lin: Node, users: dict):
    """(reshape, slices, G, P, D) when ``lin``'s only use is a reshape (or a chain of them) into
    groups that only slices along P read; else None."""
    if lin.op is not Op.LINEAR or not all(isinstance(i, ParamRef) for i in lin.inputs[1:]):
        return None
    us = users.get(lin, [])
    if len(us) != 1 or us[0].op is not Op.RESHAPE:
        return None
    r = us[0]
    while len(users.get(r, [])) == 1 and users[r][0].op is Op.RESHAPE:   # [.., G*P, D] then [.., G, P, D]
        r = users[r][0]
    lead, shape = tuple(lin.type.shape[:-1]), tuple(r.type.shape)
    if len(shape) != len(lead) + 3 or shape[:len(lead)] != lead:
        return None
    g, p, d = shape[-3:]
    if not all(isinstance(v, int) for v in (g, p, d)) or g < 2 or g * p * d != lin.type.shape[-1]:
        return None
    slices = users.get(r, [])
    if not slices or any(s.op is not Op.SLICE or s.attrs["dim"] != len(lead) + 1 or (s.attrs.get("step") or 1) != 1
                         for s in slices):
        return None
    return r, slices, g, p, d


@per_graph
def split_grouped_projections(graph, module, ctx):
    """Split each linear whose output is sliced per group (Falcon's QKV) into one linear per slice."""
    users = graph.users()
    for lin in list(graph.nodes):
        found = _grouped(lin, users)
        if found is None:
            continue
        r, slices, g, p, d = found
        new = []
        for k, s in enumerate(slices):
            a, b = s.attrs["start"], p if s.attrs["end"] is None else s.attrs["end"]
            ins = [lin.inputs[0]] + [ParamRef(_rows(module, w.name, g, p * d, a * d, b * d, k))
                                     for w in lin.inputs[1:]]
            part = Node(Op.LINEAR, tuple(ins), {}, lin.type.with_shape(tuple(lin.type.shape[:-1]) + (g * (b - a) * d,)),
                        lin.origin)
            view = Node(Op.RESHAPE, (part,), {"shape": list(s.type.shape)}, s.type, s.origin)
            new += [part, view]
            graph.replace_uses(s, view)
        graph.insert_before(lin, new)
        gone = {lin, *slices}
        while r is not lin:                 # the reshapes between them
            gone.add(r)
            r = r.inputs[0]
        graph.nodes = [n for n in graph.nodes if n not in gone]
