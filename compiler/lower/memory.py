"""Memory: every value a kernel writes (and every graph input but the KV cache) gets a buffer
in one arena, live from the step that writes it to the last step that reads it; buffers whose
lives do not overlap share memory (largest first, at the lowest offset that fits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ffc.ir import Graph, Op
from ffc.plan import expr as ex
from ffc.plan.schema import ArgKind, Buffer, GraphInput, GraphOutput

from .groups import LoweringError


@dataclass(frozen=True)
class Memory:
    buffers: dict          # name -> Buffer
    arena_bytes: int
    inputs: dict           # name -> GraphInput
    outputs: tuple         # GraphOutput


def _place(sizes: dict[str, int], live: dict[str, list]) -> tuple[dict[str, int], int]:
    """Offsets in one arena: largest first, lowest offset that no live-overlapping buffer uses."""
    placed: list[tuple[int, int, int, int]] = []      # offset, end, live start, live end
    offsets = {}
    for name in sorted(sizes, key=lambda b: (-sizes[b], b)):
        size = (sizes[name] + 63) // 64 * 64
        s, e = live[name]
        clashes = sorted((o, oe) for o, oe, ls, le in placed if not (le < s or e < ls))
        off = 0
        for o, oe in clashes:
            if off + size <= o:
                break
            off = max(off, oe)
        offsets[name] = off
        placed.append((off, off + size, s, e))
    return offsets, max((oe for _, oe, _, _ in placed), default=0)


def plan_memory(g: Graph, steps: list, max_tokens: int, max_rows: int) -> Memory:
    """Buffers for ``steps`` ([(group, spec, args)] in order) of graph ``g``, sized for the
    plan's largest step (``max_tokens`` tokens, ``max_rows`` rows)."""
    env = {"T": max_tokens, "N": min(max_rows, max_tokens), "S": 1}
    caches = {n.inputs[6].name for n in g.nodes if n.op is Op.CACHED_ATTENTION}
    types, live = {}, {}
    for n in g.inputs:
        if n.name not in caches:
            types[n.name], live[n.name] = n.type, [0, 0]
    for k, (grp, _, _) in enumerate(steps):
        for o in grp.outputs.values():       # a group split in steps (split.py) writes from its first
            types[o.name] = o.type
            live.setdefault(o.name, [k, k])[1] = k
    for k, (_, _, args) in enumerate(steps):
        for a in args:
            if a.kind is ArgKind.BUF:
                if a.name not in live:
                    reader = steps[k][0]
                    raise LoweringError(f"graph {g.name}: %{a.name} is read but never written (by the "
                                        f"{reader.family.value} kernel of %{', %'.join(n.name for n in reader.nodes)})")
                live[a.name][1] = max(live[a.name][1], k)
    outputs = []
    for o in g.outputs:
        if o.name not in live:
            raise LoweringError(f"graph {g.name}: output %{o.name} must be a kernel's result")
        live[o.name][1] = len(steps)
        outputs.append(GraphOutput(o.name, o.type.dtype, tuple(ex.from_dim(d) for d in o.type.shape)))
    sizes = {name: math.prod(t.concrete(env)) * t.dtype.itemsize for name, t in types.items()}
    offsets, arena = _place(sizes, live)
    buffers = {name: Buffer(t.dtype, tuple(ex.from_dim(d) for d in t.shape), tuple(live[name]), sizes[name],
                            offsets[name]) for name, t in types.items()}
    inputs = {n.name: GraphInput(n.type.dtype, tuple(ex.from_dim(d) for d in n.type.shape),
                                 n.name if n.name in buffers else None) for n in g.inputs}
    return Memory(buffers, arena, inputs, tuple(outputs))
