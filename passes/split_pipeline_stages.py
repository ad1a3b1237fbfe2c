"""Split every graph into pipeline stages: ``prefill`` -> ``prefill_stage0`` .. ``prefill_stage{pp-1}``.

Matches: graphs over a KV cache and the stages of ``ctx.strategy`` (per stage, its first and
last layer, from the strategy search). Guarantees: stage s holds its layers' nodes (by the
layer index the frontend stamped on each node's origin), the nodes
before the first layer go to stage 0 and those after the last layer to the last stage; a value
a stage needs from an earlier one is recomputed there when it depends only on graph inputs and
weights (rotary tables), else it crosses the boundary (the residual stream, and with tensor
parallelism its shards): the earlier stage ends with ``send(%x) {peer=tp}`` for each such
value (the send's result is what it returns), the next begins with ``recv() {peer=-tp, ...}``
in the same order (``peer``: the rank offset, the same tp rank of the neighbouring stage).
Each stage's ``kv_cache`` holds only its layers (renumbered from 0). Chained, the stages
compute what the whole graph did.
"""
from __future__ import annotations

from ffc.ir import Graph, Module, Node, Op
from ffc.ir.graph import stage_graph

from .manager import PassContext


def split_pipeline_stages(module: Module, ctx: PassContext) -> Module:
    """One graph per (graph, stage) of the strategy's stages (no-op with one stage)."""
    st = ctx.strategy
    stages = tuple((s.first_layer, s.last_layer) for s in st.stages) if st is not None else ()
    if len(stages) <= 1 or any("_stage" in name for name in module.graphs):
        return module
    out = module.clone()
    for name in list(out.graphs):
        g = out.graphs.pop(name)
        for s, graph in enumerate(_split(g, stages, st.tp)):
            graph.name = stage_graph(name, s)
            out.graphs[graph.name] = graph
    out.meta = dict(out.meta, pp=len(stages))
    out.prune_params()
    return out


def _split(g: Graph, stages: tuple, tp: int) -> list[Graph]:
    last = len(stages) - 1
    order = {n: k for k, n in enumerate(g.nodes)}
    layered = [n for n in g.nodes if n.origin.layer is not None]
    end_of_layers = max(order[n] for n in layered)

    def stage_of(n: Node) -> int:
        layer = n.origin.layer
        if layer is None:
            return 0 if order[n] < end_of_layers else last
        for s, (a, b) in enumerate(stages):
            if a <= layer <= b:
                return s
        raise ValueError(f"layer {layer} of %{n.name} is in no pipeline stage {stages}")

    pure: dict[Node, bool] = {}
    for n in g.nodes:   # depends only on graph inputs and weights (safe to recompute anywhere)
        pure[n] = n.op is not Op.CACHED_ATTENTION and all(
            pure.get(i, True) for i in n.inputs if isinstance(i, Node))
    inputs = set(g.inputs)
    cache = g.input("kv_cache")
    graphs = []
    carried: list = []   # the values the previous stage hands on, in graph order
    for s in range(len(stages)):
        first_layer = stages[s][0]
        mine = [n for n in g.nodes if stage_of(n) == s]
        need = set(mine)
        crossing = set()
        stack = list(mine)
        while stack:   # pull in recomputable producers from earlier stages
            n = stack.pop()
            for i in n.inputs:
                if not isinstance(i, Node) or i in inputs or i in need:
                    continue
                if pure[i]:
                    need.add(i)
                    stack.append(i)
                else:
                    crossing.add(i)
        if s == 0 and crossing:
            raise ValueError("the first pipeline stage needs values it does not compute")
        if s > 0 and not crossing <= set(carried):
            raise ValueError(f"pipeline stage {s} needs {sorted('%' + c.name for c in crossing - set(carried))} from "
                             f"before stage {s - 1}; only values the previous stage hands on can cross")
        nlayers = stages[s][1] - stages[s][0] + 1
        new_cache = Node(Op.INPUT, type=cache.type.with_shape((nlayers,) + tuple(cache.type.shape[1:])),
                         name="kv_cache")
        new_inputs = [new_cache if n is cache else Node(Op.INPUT, type=n.type, name=n.name) for n in g.inputs]
        mapping = {old: new for old, new in zip(g.inputs, new_inputs)}
        nodes = []
        for x in carried if s > 0 else ():
            r = Node(Op.RECV, (), {"peer": -tp, "shape": tuple(x.type.shape), "dtype": x.type.dtype}, x.type, x.origin)
            nodes.append(r)
            mapping[x] = r
        for n in g.nodes:
            if n not in need:
                continue
            attrs = dict(n.attrs)
            if n.op is Op.CACHED_ATTENTION:
                attrs["layer"] = n.attrs["layer"] - _first_cache_layer(g, first_layer)
            c = Node(n.op, tuple(mapping.get(i, i) if isinstance(i, Node) else i for i in n.inputs), attrs,
                     n.type, n.origin)
            mapping[n] = c
            nodes.append(c)
        if s < len(stages) - 1:
            # what the next stage needs from this one and before (in graph order): it is sent on
            nxt = [n for n in g.nodes if stage_of(n) == s + 1]
            handed = {i for n in nxt for i in n.inputs if isinstance(i, Node) and i not in inputs
                      and stage_of(i) <= s and not pure[i]}
            if not handed:
                raise ValueError(f"pipeline stage {s + 1} takes nothing from stage {s}")
            missing = [x for x in handed if x not in mapping]
            if missing:
                raise ValueError(f"stage {s + 1} needs %{missing[0].name}, which stage {s} neither computes nor "
                                 "receives")
            carried = sorted(handed, key=lambda x: order[x])
            outputs = [Node(Op.SEND, (mapping[x],), {"peer": tp}, x.type, x.origin) for x in carried]
            nodes += outputs
        else:
            outputs = [mapping[o] for o in g.outputs]
        graphs.append(Graph(g.name, new_inputs, nodes, outputs))
    return graphs


def _first_cache_layer(g: Graph, first_model_layer: int) -> int:
    """The KV-cache layer index of the first attention in model layer ``first_model_layer``."""
    for n in g.nodes:
        if n.op is Op.CACHED_ATTENTION and (n.origin.layer or 0) >= first_model_layer:
            return n.attrs["layer"]
    return 0
