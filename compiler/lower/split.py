"""A linear over a weight larger than a layer's, read outside the layers (the lm_head of a large
vocabulary, tied or not), lowered as one step per chunk of its rows.

Each chunk step reads a panel-aligned range of the weight's rows and writes those columns of
the output (its row stride stays the whole output's). The point is placement: a load under a
memory budget (runtime/offload.py) streams weights a unit at a time through slots as large as
its largest streamed unit, and a 113 MB lm_head (the default model's tied embedding: 21% of its
weights) would otherwise need slots of that size or stay in RAM. Loads without a budget view the
chunks in one packing of the whole weight, so the split costs no memory and only a few kernel
launches (the chunks share one kernel). CPU targets only (their weights are packed in panels).
"""
from __future__ import annotations

import math
from dataclasses import replace

from ffc.ir import Module, ParamRef
from ffc.ir.types import TensorType
from ffc.plan.kernels import Family, LinearSpec
from ffc.plan.schema import Arg, ArgKind

MIN_CHUNK = 4 << 20     # bytes: a model of small layers does not get its lm_head in hundreds of pieces


def param_bytes(t: TensorType) -> int:
    """Bytes of a parameter as stored (a quantized one: its blocks)."""
    shape = [int(d) for d in t.shape]
    if not shape:
        return t.dtype.itemsize
    return math.prod(shape[:-1]) * t.dtype.storage_cols(shape[-1]) * t.dtype.itemsize


def largest_layer(module: Module, graph_name: str = "forward") -> int:
    """Bytes of the largest transformer layer's parameters (each counted once per layer)."""
    seen: dict[int, set] = {}
    graph = module.graphs.get(graph_name) or next(iter(module.graphs.values()))
    for n in graph.nodes:
        if n.origin.layer is not None:
            for v in n.inputs:
                if isinstance(v, ParamRef):
                    seen.setdefault(n.origin.layer, set()).add(v.name)
    return max((sum(param_bytes(module.params[p].type) for p in names) for names in seen.values()), default=0)


def chunk_rows(rows: int, row_bytes: float, nr: int, limit: int) -> list[tuple[int, int]]:
    """Row ranges of a weight of ``rows`` rows, each at most ``limit`` bytes (MIN_CHUNK at
    least) and a whole number of ``nr``-row panels but the last; one range when it fits."""
    limit = max(limit, MIN_CHUNK)
    if nr <= 0 or rows * row_bytes <= limit:
        return [(0, rows)]
    k = math.ceil(rows * row_bytes / limit)
    per = math.ceil(math.ceil(rows / k) / nr) * nr
    return [(a, min(per, rows - a)) for a in range(0, rows, per)]


def split_large_linears(ctx, steps: list, limit: int) -> list:
    """``steps`` ([(group, spec, args)]) with each plain linear outside the layers whose packed
    weight exceeds ``limit`` bytes replaced by its chunk steps."""
    out = []
    for grp, spec, args in steps:
        ranges = None
        if (grp.family is Family.LINEAR and isinstance(spec, LinearSpec) and spec.nr and spec.glu is None
                and not spec.bias and not spec.residual and grp.anchor.origin.layer is None):
            w = args[2]
            p = ctx.packed.get(w.name)
            if p is not None and p.rows == ((0, spec.N),):
                t = ctx.module.params[p.param].type
                ranges = chunk_rows(spec.N, param_bytes(t) / spec.N, spec.nr, limit)
        if ranges is None or len(ranges) == 1:
            out.append((grp, spec, args))
            continue
        param = Arg(ArgKind.PARAM, ctx.packed[args[2].name].param, 0, args[2].dtype)
        for first, n in ranges:
            chunk = [replace(args[0], offset=args[0].offset + first), args[1], ctx.pack(param, [(first, n)])]
            out.append((grp, replace(spec, N=n, panels=-(-n // spec.nr), up_panel=-(-n // spec.nr)),
                        chunk + list(args[3:])))
    used = {a.name for _, _, args in out for a in args if a.kind is ArgKind.PACKED}
    for name in [k for k in ctx.packed if k not in used]:     # the whole weight's packing, if only the split read it
        del ctx.packed[name]
    return out
