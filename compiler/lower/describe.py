"""Plans and lowering phases as text: ``ffc inspect --plan [PHASE]`` prints these.

Each phase of the lowering writes one dump per graph (fusion decisions, the partition into
kernels in order, each step's spec and arguments, the buffers and arena), as MLC dumps each
phase; ``describe_plan`` is the whole plan.
"""
from __future__ import annotations

import dataclasses
import math
from enum import Enum

from ffc.ir.types import TensorType
from ffc.plan import expr as ex
from ffc.plan.schema import ArgKind, Plan

_SHOWN = ("K", "N", "wtype", "wformat", "ctype", "glu", "act", "residual", "rope", "kind", "gather", "ops")


def _value(v) -> str:
    if isinstance(v, ex.Expr):
        return ex.describe(v)
    if isinstance(v, Enum):
        return str(v.value)
    if isinstance(v, tuple):
        return " ".join(_value(x) for x in v)
    return str(v)


def spec_fields(spec, names=None) -> str:
    """``K=576, N=960, wtype=f32, ...``: the fields of a spec that are set."""
    out = []
    for f in dataclasses.fields(spec):
        if (names is None or f.name in names) and f.name != "arg":
            v = getattr(spec, f.name)
            if v not in (None, False, ()):
                out.append(f"{f.name}={_value(v)}")
    return ", ".join(out)


def fusion_dump(graph: str, decisions) -> str:
    acc = [d for d in decisions if d.accepted]
    lines = [f"graph {graph}: {len(acc)} fusions formed, {len(decisions) - len(acc)} candidates rejected"]
    for d in decisions:
        lines.append(f"  {'fused' if d.accepted else 'not fused'} {d.kind.value} {' '.join(d.nodes)} "
                     f"({d.saved_bytes_per_token:.0f} B/token): {d.reason}")
    return "\n".join(lines)


def partition_dump(graph: str, groups) -> str:
    lines = [f"graph {graph}: {len(groups)} kernels in order"]
    for k, g in enumerate(groups):
        outs = ", ".join(f"{r}=%{n.name}" for r, n in g.outputs.items())
        lines.append(f"  [{k:3d}] {g.family.value:<10} {' '.join('%' + n.name for n in g.nodes):<40} -> {outs}"
                     f"  # {g.anchor.origin}")
    return "\n".join(lines)


def specs_dump(graph: str, steps) -> str:
    lines = [f"graph {graph}: {len(steps)} steps"]
    for k, (g, spec, args) in enumerate(steps):
        lines.append(f"  [{k:3d}] {g.family.value:<10} {spec_fields(spec)}")
        lines.append(f"        args: {' '.join(str(a) for a in args)}")
    return "\n".join(lines)


def memory_dump(graph: str, memory) -> str:
    lines = [f"graph {graph}: arena {memory.arena_bytes} bytes, {len(memory.buffers)} buffers"]
    for name, b in sorted(memory.buffers.items(), key=lambda kv: (kv[1].offset, kv[0])):
        lines.append(f"  %{name:<10} {b.dtype.value}[{','.join(ex.describe(d) for d in b.shape)}] "
                     f"at {b.offset:>10} size {b.bytes:>10}  live steps {b.live[0]}..{b.live[1]}")
    return "\n".join(lines)


def weight_bytes(plan: Plan) -> dict[str, tuple[int, int]]:
    """{storage format: (weights, bytes)} of the weights the plan's kernels read (each once)."""
    used = {plan.packed[a.name].param if a.kind is ArgKind.PACKED else a.name
            for gp in plan.graphs.values() for st in gp.steps for a in st.args
            if a.kind in (ArgKind.PARAM, ArgKind.PACKED)}
    out: dict[str, tuple[int, int]] = {}
    for name in used:
        info = plan.params[name]
        t = TensorType(info.dtype, info.shape)
        n, b = out.get(info.dtype.value, (0, 0))
        out[info.dtype.value] = (n + 1, b + math.prod(t.storage_shape()) * info.dtype.itemsize)
    return dict(sorted(out.items()))


def describe_plan(plan: Plan) -> str:
    """Human-readable plan: weights by format, kernels per graph, fusion groups formed and
    rejected, arena."""
    lines = [f"plan v{plan.version} target={plan.target.value}: {len(plan.kernels)} unique kernels, "
             f"arena {plan.arena_bytes / 2**20:.1f} MiB",
             "weights by format: " + ", ".join(f"{fmt} {n} tensors {b / 2**20:.1f} MiB"
                                               for fmt, (n, b) in weight_bytes(plan).items())]
    for name, k in plan.kernels.items():
        lines.append(f"  {name}: {spec_fields(k.spec, _SHOWN)}")
    for gname, gp in plan.graphs.items():
        lines.append(f"graph {gname} (max {gp.max_tokens} tokens, arena {gp.arena_bytes / 2**20:.1f} MiB, "
                     f"{len(gp.steps)} kernel launches):")
        for k, st in enumerate(gp.steps):
            args = " ".join(str(a) for a in st.args)
            what = st.kernel or f"{st.collective.op.value} (torch.distributed)"
            lines.append(f"  [{k:3d}] {what:<18} {' '.join(st.nodes):<28} <- {args}  # {st.origin}")
            for w in st.why:
                lines.append(f"        fused: {w}")
        acc = [d for d in gp.fusion if d.accepted]
        rej = [d for d in gp.fusion if not d.accepted]
        lines.append(f"  fusion: {len(acc)} groups formed, {len(rej)} candidates rejected")
        for d in rej:
            lines.append(f"    not fused {d.kind.value} {' '.join(d.nodes)} "
                         f"({d.saved_bytes_per_token:.0f} B/token): {d.reason}")
    return "\n".join(lines)
