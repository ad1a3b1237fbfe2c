"""Lowering: the final IR graphs become a plan (``ffc.plan.schema.Plan``), in phases.

    canonical   decode's token dim B is named T, so prefill and decode share kernels
    fusion      which ops share a kernel: a rule table, legality apart from profit (fusion.py)
    partition   every node in one kernel; kernels in topological order (partition.py)
    specs       each kernel's family spec and arguments, through strided views (specs.py); an
                lm_head larger than a layer as chunk steps over its rows (split.py)
    memory      buffers by liveness in one arena (memory.py)
then the kernels of all graphs are deduplicated by spec. Each phase's result can be dumped
(``dump(name, text)``; ``ffc inspect --plan PHASE`` prints it from the artifact).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from ffc.choices import PHASES
from ffc.ir import Graph, Module
from ffc.ir.ops import SHAPE_ATTRS
from ffc.ir.text import node_names
from ffc.ir.types import rename_dim
from ffc.plan.kernels import Family
from ffc.plan.schema import DIMS, PLAN_VERSION, GraphPlan, Kernel, ParamInfo, Plan, Step, Target

from . import describe
from .fusion import fuse
from .groups import LoweringError
from .memory import plan_memory
from .partition import partition
from .specs import BUILDERS, SpecContext
from .split import largest_layer, split_large_linears
from .targets import POLICIES
from .views import VIEW_OPS

__all__ = ["lower_module", "lower_graph", "LoweringError", "PHASES"]

Dump = Optional[Callable[[str, str], None]]


def canonical(graph: Graph) -> Graph:
    """A copy whose token dim is named T in every graph (decode's B), with printed node names."""
    g = graph.clone()
    for n, name in node_names(g).items():
        n.name = name
    for n in g.all_nodes():
        n.type = n.type.renamed({"B": "T"})
        key = SHAPE_ATTRS.get(n.op)
        if key is not None:
            n.attrs[key] = tuple(rename_dim(d, {"B": "T"}) for d in n.attrs[key])
    return g


def lower_graph(graph: Graph, module: Module, max_tokens: int, max_rows: int, target: Target = Target.CPU,
                dump: Dump = None):
    """(graph plan, each step's spec, packed weights) for one graph; the steps name no kernel
    until lower_module has deduplicated them over all graphs."""
    g = canonical(graph)
    grouping, decisions = fuse(g)
    part, pointwise = partition(grouping)
    ctx = SpecContext(part, module, POLICIES[Target(target)])
    steps = [(grp, *BUILDERS[grp.family](ctx, grp)) for grp in part.groups]
    if ctx.policy.panel_rows:       # an lm_head larger than a layer in chunks of at most a layer (split.py)
        steps = split_large_linears(ctx, steps, largest_layer(module))
    mem = plan_memory(g, steps, max_tokens, max_rows)
    if dump is not None:
        dump("fusion", describe.fusion_dump(g.name, decisions + pointwise))
        dump("partition", describe.partition_dump(g.name, part.groups))
        dump("specs", describe.specs_dump(g.name, steps))
        dump("memory", describe.memory_dump(g.name, mem))
    specs = [spec for _, spec, _ in steps]
    plan_steps = tuple(Step(grp.family, None, tuple(args), tuple(f"%{n.name}" for n in grp.nodes if n.op not in VIEW_OPS),
                            str(grp.anchor.origin), tuple(grp.reasons),
                            spec if grp.family is Family.COLLECTIVE else None)
                       for grp, spec, args in steps)
    gp = GraphPlan(max_tokens, min(max_rows, max_tokens), mem.inputs, mem.outputs, mem.buffers, mem.arena_bytes,
                   plan_steps, tuple(decisions + pointwise))
    return gp, specs, ctx.packed


def lower_module(module: Module, *, target="cpu", prefill_tokens: int = 2048, max_batch: int = 128,
                 dump: Dump = None) -> Plan:
    """The plan for every graph of ``module``: steps refer to kernels by name; kernels are unique."""
    target = Target(target)
    graphs, kernels, packed = {}, {}, {}
    by_spec: dict[tuple, str] = {}
    for name, g in module.graphs.items():
        tmax = max_batch if name.startswith("decode") else prefill_tokens   # decode, decode_stage1, ...
        gp, specs, pk = lower_graph(g, module, tmax, max_batch, target, dump)
        packed.update(pk)
        steps = []
        for st, spec in zip(gp.steps, specs):
            if st.family is not Family.COLLECTIVE:     # collectives run in the runtime, between segments
                key = (st.family, spec)
                if key not in by_spec:
                    by_spec[key] = f"k{len(by_spec)}_{st.family.value}"
                    kernels[by_spec[key]] = Kernel(st.family, spec)
                st = replace(st, kernel=by_spec[key])
            steps.append(st)
        graphs[name] = replace(gp, steps=tuple(steps))
    return Plan(PLAN_VERSION, target, DIMS, kernels, graphs, packed,
                max(gp.arena_bytes for gp in graphs.values()),
                {n: ParamInfo(p.type.dtype, tuple(p.type.shape)) for n, p in module.params.items()})
