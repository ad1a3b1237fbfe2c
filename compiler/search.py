"""Parallelization search: a placement for every op, and a pipeline split, by cost model.

Tensor parallelism (Alpa's intra-op pass, solved exactly): every node of the forward graph
has the strategies its sharding rule allows (ir/sharding.py). Choosing one per node is an
integer program: minimise the predicted time of a workload (one prefill of the prompt plus
``output_tokens`` decode steps of a batch) = sum of node times under their strategies + the
collectives that placements imply between producer and consumer, subject to each rank's
memory (weights, KV cache). Edge variables linearise the pairwise resharding costs; scipy's
HiGHS MILP solves a 7B Llama (750 nodes) in seconds. Pipeline parallelism then splits the
layer sequence into stages balanced by predicted cost (dynamic programming, bottleneck
stage plus the send/recv between stages). The result is a frozen ``Strategy``: printable,
stored in the manifest, and applied by a separate pass.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from ffc.ir import Graph, Module, Node, Op
from ffc.ir.graph import ParamRef
from ffc.ir.ops import LAYOUT, Estimate, attention_work, kv_row_bytes, node_cost
from ffc.ir.sharding import CollectiveKind, OpStrategy, Placement, R, local_shape, numel, reshard_kind, strategies
from ffc.ir.strategy import (Choice, CollectiveEdge, Prediction, Reference, Rejected, Stage, Strategy,
                             Workload)
from ffc.ir.text import node_names
from ffc.ir.types import DType, PlacementKind, eval_dim
from ffc.plan.kernels import ATTENTION_OPS, cost_family

from .cluster import DeviceProfile
from .errors import InvalidRequestError

__all__ = ["Workload", "Strategy", "search"]


class _Problem:
    """The graph's nodes, their strategies and costs, and the edges between them."""

    def __init__(self, module: Module, graph: Graph, tp: int, profile: DeviceProfile, workload: Workload,
                 pp: int = 1):
        self.module, self.g, self.tp, self.profile, self.w = module, graph, tp, profile, workload
        self.one_rank = tp == 1 and pp == 1
        self.nodes = [n for n in graph.nodes]
        self.index = {n: k for k, n in enumerate(self.nodes)}
        self.strats = [strategies(n, tp, module.params) for n in self.nodes]
        self.phases = workload.phases()
        self.env = [{**dims, "B": dims["T"]} for _, dims, _ in self.phases]
        # seconds per step of each phase, and over the workload (weighted by steps)
        self.step_cost = [[self._node_times(n, s) for s in ss] for n, ss in zip(self.nodes, self.strats)]
        self.cost = [[sum(w * t for (_, _, w), t in zip(self.phases, ts)) for ts in row] for row in self.step_cost]
        # a weight read by several nodes (a tied embedding and lm_head) is held once by one rank: its
        # first reader counts it (ranks may hold different slices of it, stages a copy each: each
        # reader counts)
        self._first_reader: dict[str, Node] = {}
        for n in self.nodes:
            for v in n.inputs:
                if isinstance(v, ParamRef):
                    self._first_reader.setdefault(v.name, n)
        self.memory = [[self._node_memory(n, s) for s in ss] for n, ss in zip(self.nodes, self.strats)]
        # edges (producer k, consumer j, input position i); inputs from graph inputs are replicated
        self.edges = [(self.index[i], j, pos) for j, n in enumerate(self.nodes)
                      for pos, i in enumerate(n.inputs) if isinstance(i, Node) and i in self.index]
        self.outputs = [self.index[o] for o in graph.outputs if o in self.index]
        self.graph_outputs = list(graph.outputs)
        self._names = node_names(graph)   # as the IR printer numbers them

    def name(self, n: Node) -> str:
        return self._names[n]

    # ------------------------------------------------------------ costs
    def _bytes(self, v: Node, env: dict, placement: Placement = R) -> float:
        shape = [eval_dim(d, env) for d in v.type.shape]
        return numel(local_shape(shape, placement, self.tp)) * v.type.dtype.itemsize

    def _node_times(self, n: Node, s: OpStrategy) -> list[float]:
        """Seconds of one step of each phase on one rank."""
        if n.op in LAYOUT and n.op is not Op.CONCAT:
            return [0.0] * len(self.phases)      # views: no kernel of their own
        out = []
        for (phase, _, _), env in zip(self.phases, self.env):
            ins = []
            for v, p in zip(n.inputs, s.inputs):
                if isinstance(v, Node):
                    shape = local_shape([eval_dim(d, env) for d in v.type.shape], p, self.tp)
                    ins.append((shape, v.type.torch_dtype))
                elif isinstance(v, ParamRef):
                    t = self.module.params[v.name].type
                    dt = self._param_dtype(n, t.dtype)
                    ins.append((local_shape(t.shape, p, self.tp), dt))     # a DType: quantized bytes counted
            out_shape = local_shape([eval_dim(d, env) for d in n.type.shape], s.output, self.tp)
            decode = phase == "decode"
            if n.op in ATTENTION_OPS and decode:
                est = self._decode_attention(ins, out_shape)
            else:
                est = node_cost(n.op, n.attrs, ins, (out_shape, n.type.torch_dtype))
            rows = numel(ins[0][0][:-1]) if ins else 1
            weight = self.w.weight_dtype if n.op is Op.LINEAR else None
            out.append(self.profile.kernel_time(cost_family(n.op, rows, decode, weight), est.flops, est.bytes,
                                                self.w.weight_dtype))
        return out

    def _param_dtype(self, n: Node, dtype: DType) -> DType:
        """Linear and embedding weights are stored as the workload's weight dtype."""
        return self.w.weight_dtype if n.op in (Op.LINEAR, Op.EMBEDDING) else dtype

    def _decode_attention(self, ins, out_shape) -> Estimate:
        """One query per sequence over the workload's mean context: bound by K/V reads."""
        (q, qdt), (k, _) = ins[0], ins[1]
        _, h, t, d = q
        io = Estimate(bytes=2.0 * numel(q) * qdt.itemsize)       # q in, the output out
        return attention_work(h, k[1], d, t * self.w.context, self.w.kv_dtype) + io

    def _node_memory(self, n: Node, s: OpStrategy) -> float:
        mem = 0.0
        for v, p in zip(n.inputs, s.inputs):
            if isinstance(v, ParamRef) and (not self.one_rank or self._first_reader[v.name] is n):
                t = self.module.params[v.name].type
                mem += numel(local_shape(t.shape, p, self.tp)) * self._param_dtype(n, t.dtype).element_bytes
        if n.op in ATTENTION_OPS:   # this layer's KV cache for batch x max_seq_len
            k = n.inputs[1]
            hkv = k.type.shape[1] // (self.tp if s.inputs[1].kind is PlacementKind.S else 1)
            mem += 2 * hkv * kv_row_bytes(k.type.shape[3], self.w.kv_dtype) * self.w.max_seq_len * self.w.batch
        return mem

    def reshard_time(self, producer: Node, src: Placement, dst: Placement) -> Optional[float]:
        kind = reshard_kind(src, dst)
        if kind is None:
            return None
        if not kind:
            return 0.0
        return sum(weight * self.profile.collective_time(kind, self._bytes(producer, env), self.tp)
                   for (_, _, weight), env in zip(self.phases, self.env))

    def input_time(self, j: int, s: OpStrategy) -> Optional[float]:
        """Resharding of graph inputs (replicated) into what strategy s of node j needs."""
        n = self.nodes[j]
        total = 0.0
        for v, p in zip(n.inputs, s.inputs):
            if isinstance(v, Node) and v not in self.index and p is not None:
                t = self.reshard_time(v, R, p)
                if t is None:
                    return None
                total += t
        if j in self.outputs:   # what leaves the graph is replicated (the sampler needs all logits)
            t = self.reshard_time(n, s.output, R)
            if t is None:
                return None
            total += t
        return total


def _solve(pb: _Problem, memory_limit: float, comm_scale: float = 1.0) -> list[int]:
    """Strategy index per node minimising predicted time (MILP, HiGHS)."""
    base, nvar = [], 0
    for ss in pb.strats:
        base.append(nvar)
        nvar += len(ss)
    c, ub = np.zeros(nvar), np.ones(nvar)
    for j, ss in enumerate(pb.strats):
        for si, s in enumerate(ss):
            t = pb.input_time(j, s)
            c[base[j] + si] = pb.cost[j][si] + (t * comm_scale if t is not None else 0.0)
            if t is None:
                ub[base[j] + si] = 0.0
    ebase = []
    for k, j, pos in pb.edges:
        ebase.append(nvar)
        nvar += len(pb.strats[k]) * len(pb.strats[j])
    c = np.concatenate([c, np.zeros(nvar - len(c))])
    ub = np.concatenate([ub, np.ones(nvar - len(ub))])
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for j, ss in enumerate(pb.strats):       # one strategy per node
        for si in range(len(ss)):
            rows.append(r), cols.append(base[j] + si), vals.append(1.0)
        lo.append(1.0), hi.append(1.0)
        r += 1
    for e, (k, j, pos) in enumerate(pb.edges):
        sk, sj = pb.strats[k], pb.strats[j]
        for a, s in enumerate(sk):
            for b, t in enumerate(sj):
                v = ebase[e] + a * len(sj) + b
                need = t.inputs[pos]
                cost = pb.reshard_time(pb.nodes[k], s.output, need) if need is not None else 0.0
                if cost is None:
                    ub[v] = 0.0
                else:
                    c[v] = cost * comm_scale
        # the edge's pair choice agrees with both ends: sum_b y[a, b] = x_k[a], sum_a y[a, b] = x_j[b]
        ys = [[ebase[e] + a * len(sj) + b for b in range(len(sj))] for a in range(len(sk))]
        marginals = [(ys[a], base[k] + a) for a in range(len(sk))] + \
                    [([row[b] for row in ys], base[j] + b) for b in range(len(sj))]
        for pair_vars, x in marginals:
            rows += [r] * (len(pair_vars) + 1)
            cols += pair_vars + [x]
            vals += [1.0] * len(pair_vars) + [-1.0]
            lo.append(0.0), hi.append(0.0)
            r += 1
    for j, ss in enumerate(pb.strats):       # memory per rank
        for si in range(len(ss)):
            if pb.memory[j][si]:
                rows.append(r), cols.append(base[j] + si), vals.append(pb.memory[j][si] / 2**20)
    lo.append(-np.inf), hi.append(memory_limit / 2**20)
    r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, nvar)).tocsr()
    integrality = np.zeros(nvar)
    integrality[:ebase[0] if ebase else nvar] = 1
    res = milp(c * 1e3, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), ub), options={"time_limit": 120})
    if res.x is None:
        raise InvalidRequestError(
            f"no tp={pb.tp} plan fits {memory_limit / 2**30:.1f} GiB per rank on {pb.profile.name} "
            f"(replicated weights + KV need {sum(m[0] for m in pb.memory) / 2**30:.1f} GiB, fully sharded at least "
            f"{sum(min(m) for m in pb.memory) / 2**30:.1f} GiB); raise --tp or --memory-per-device, or lower "
            "--max-seq-len or the workload's batch")
    return [int(np.argmax(res.x[base[j]:base[j] + len(ss)])) for j, ss in enumerate(pb.strats)]


def _evaluate(pb: _Problem, pick: list[int]) -> tuple[float, float, list[CollectiveEdge]]:
    """(compute seconds, communication seconds, collectives) of a choice per node."""
    compute = sum(pb.cost[j][s] for j, s in enumerate(pick))
    comm, colls = 0.0, []
    for j, s in enumerate(pick):
        n, st = pb.nodes[j], pb.strats[j][s]
        for v, p in zip(n.inputs, st.inputs):
            if isinstance(v, Node) and v not in pb.index and p is not None:
                kind = reshard_kind(R, p)
                if kind:
                    colls.append(_coll(pb, kind, v, n))
        if j in pb.outputs:
            kind = reshard_kind(st.output, R)
            if kind:
                colls.append(_coll(pb, kind, n, n))
    for k, j, pos in pb.edges:
        src = pb.strats[k][pick[k]].output
        need = pb.strats[j][pick[j]].inputs[pos]
        if need is None:
            continue
        kind = reshard_kind(src, need)
        if kind:
            colls.append(_coll(pb, kind, pb.nodes[k], pb.nodes[j]))
    comm = sum(c.seconds for c in colls)
    return compute, comm, colls


def _coll(pb: _Problem, kind: CollectiveKind, producer: Node, consumer: Node) -> CollectiveEdge:
    by = tuple(pb._bytes(producer, env) for env in pb.env)
    secs = sum(w * pb.profile.collective_time(kind, b, pb.tp) for (_, _, w), b in zip(pb.phases, by))
    return CollectiveEdge(kind, pb.name(producer), pb.name(consumer), by, secs)


def _alternatives(pb: _Problem, pick: list[int], j: int) -> tuple:
    """Each other strategy of node j with the rest held fixed: extra seconds, or None and why."""
    users = [(jj, pos) for k, jj, pos in pb.edges if k == j]
    ins = [(k, pos) for k, jj, pos in pb.edges if jj == j]

    def local(si) -> tuple[Optional[float], str]:
        s = pb.strats[j][si]
        t = pb.input_time(j, s)
        if t is None:
            return None, "inputs/outputs of the graph are replicated"
        total = pb.cost[j][si] + t
        for k, pos in ins:
            need = s.inputs[pos]
            if need is None:
                continue
            x = pb.reshard_time(pb.nodes[k], pb.strats[k][pick[k]].output, need)
            if x is None:
                return None, f"%{pb.name(pb.nodes[k])} is {pb.strats[k][pick[k]].output}, cannot become {need}"
            total += x
        for jj, pos in users:
            need = pb.strats[jj][pick[jj]].inputs[pos]
            if need is None:
                continue
            x = pb.reshard_time(pb.nodes[j], s.output, need)
            if x is None:
                return None, f"%{pb.name(pb.nodes[jj])} needs {need}, {s.output} cannot become it"
            total += x
        return total, ""
    mine, _ = local(pick[j])
    out = []
    for si, s in enumerate(pb.strats[j]):
        if si == pick[j]:
            continue
        t, why = local(si)
        out.append(Rejected(s.name, None if t is None else t - mine, why))
    out.sort(key=lambda a: (a.extra_s is None, a.extra_s if a.extra_s is not None else 0.0))
    return tuple(out)


def search(module: Module, tp: int = 1, pp: int = 1, profile: DeviceProfile = None,
           workload: Workload = Workload(), memory_limit: Optional[float] = None,
           graph: str = "forward", explain: bool = True) -> Strategy:
    """The placement of every node for tensor parallelism ``tp`` and the split into ``pp``
    pipeline stages that minimise the workload's predicted time within ``memory_limit`` bytes
    per rank (default: the profile's device memory)."""
    if profile is None:
        raise InvalidRequestError("the search needs a device profile")
    if tp < 1 or pp < 1:
        raise InvalidRequestError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    g = module.graphs.get(graph)
    if g is None:
        raise InvalidRequestError(f"the module has no graph {graph!r} to plan (graphs: {sorted(module.graphs)})")
    limit = float(memory_limit if memory_limit is not None else profile.memory_bytes)
    pb = _Problem(module, g, tp, profile, workload, pp)
    act = _activation_bytes(pb)
    # with pp stages each rank holds about 1/pp of the layers: the split checks each stage exactly
    pick = _solve(pb, (limit - act) * pp)
    compute, comm, colls = _evaluate(pb, pick)
    choices = []
    for j, n in enumerate(pb.nodes):
        s = pb.strats[j][pick[j]]
        choices.append(Choice(pb.name(n), n.op.value, str(n.origin), s.name, tuple(s.inputs), s.output,
                              pb.cost[j][pick[j]], pb.memory[j][pick[j]],
                              _alternatives(pb, pick, j) if explain and len(pb.strats[j]) > 1 else (),
                              n.origin.layer))
    is_attn = [n.op in ATTENTION_OPS for n in pb.nodes]
    weights = sum(pb.memory[j][pick[j]] for j in range(len(pb.nodes)) if not is_attn[j])
    kv = sum(pb.memory[j][pick[j]] for j in range(len(pb.nodes)) if is_attn[j])
    steps = [sum(pb.step_cost[j][pick[j]][k] for j in range(len(pb.nodes))) for k in range(len(pb.phases))]
    for c in colls:
        for k in range(len(pb.phases)):
            steps[k] += pb.profile.collective_time(c.kind, c.bytes[k], tp)
    interval = list(steps)
    if pp > 1:
        stages = _split_stages(pb, pick, pp, limit - act)
        per_stage = _stage_step_times(pb, pick, colls, stages)
        # one step's latency runs through every stage; with pp batches in flight (in-flight
        # batching keeps the pipeline full) a stage hands a batch on every `interval`
        steps = [sum(st[k] for st in per_stage) for k in range(len(pb.phases))]
        interval = [max(st[k] for st in per_stage) for k in range(len(pb.phases))]
        # the fullest rank: its weights, and its layers' KV for the pp batches in flight
        weights, kv = max(((w_, kv_ * pp) for w_, kv_ in _stage_memory(pb, pick, stages)), key=sum)
    else:
        layers = [n.origin.layer for n in pb.nodes if n.origin.layer is not None]
        stages = (Stage(0, len(_segments(pb)) - 1, compute, weights + kv, min(layers, default=-1),
                        max(layers, default=-1)),)
    predicted = Prediction(prefill_s=steps[0], decode_s=steps[1], decode_interval_s=interval[1],
                           decode_tok_s=workload.batch / interval[1] if interval[1] else float("inf"),
                           compute_s=compute, comm_s=comm, total_s=compute + comm, weight_bytes=weights,
                           kv_bytes=kv, activation_bytes=act, memory_limit=limit, memory_bytes=weights + kv + act,
                           collectives=len(colls))
    refs = []
    if explain and tp > 1:
        for name, p in (("all replicated", [0] * len(pb.nodes)),
                        ("fastest ignoring communication", _solve(pb, (limit - act) * pp, comm_scale=1e-6))):
            comp_r, comm_r, colls_r = _evaluate(pb, p)
            refs.append(Reference(name, comp_r, comm_r, len(colls_r)))
        refs.append(Reference("chosen", compute, comm, len(colls)))
    return Strategy(tp, pp, profile.name, workload, tuple(choices), tuple(colls), tuple(stages), predicted,
                    tuple(refs))


def _activation_bytes(pb: _Problem) -> float:
    """Live activations at the prefill step: about the two largest values at once. The graph's
    outputs (logits) do not count: prefill computes them only for each sequence's last token."""
    env = pb.env[0]
    outs = set(pb.graph_outputs)
    sizes = sorted((pb._bytes(n, env) for n in pb.nodes if n not in outs), reverse=True)
    return float(sum(sizes[:2]))


def _segments(pb: _Problem) -> list[list[int]]:
    """Node indices per segment: what precedes the first layer, each layer, what follows."""
    layers = [n.origin.layer for n in pb.nodes]
    known = [x for x in layers if x is not None]
    if not known:
        return [list(range(len(pb.nodes)))]
    first, last = min(known), max(known)
    segs: dict[int, list[int]] = {}
    for j, x in enumerate(layers):
        if x is None:
            # before any layer node appears: the head; after the last layer's nodes: the tail
            seen = [y for y in layers[:j] if y is not None]
            x = first - 1 if not seen else (last + 1 if max(seen) == last and all(
                y is None or y == last for y in layers[j:]) else max(seen))
        segs.setdefault(x, []).append(j)
    return [segs[k] for k in sorted(segs)]


def check_stage_count(pp: int, layers: int) -> None:
    """Every pipeline stage holds at least one transformer layer (a stage of only the embedding
    or the lm_head would pass activations on and add a hop): pp above the layer count is refused."""
    if pp > layers:
        raise InvalidRequestError(f"--pp {pp} needs a transformer layer on every pipeline stage but the model has "
                                  f"{layers}: use --pp {layers} or fewer")


def _split_stages(pb: _Problem, pick: list[int], pp: int, limit: float) -> tuple:
    """Contiguous segments into pp stages minimising the slowest stage (with its send to the
    next), each within the memory limit: DP over (segments used, stages used)."""
    segs = _segments(pb)
    has_layer = [any(pb.nodes[j].origin.layer is not None for j in s) for s in segs]
    check_stage_count(pp, sum(has_layer))
    # stages must each hold a transformer layer: pre_l counts layer segments before each index
    pre_l = np.concatenate([[0], np.cumsum(has_layer)])
    secs = [sum(pb.cost[j][pick[j]] for j in s) for s in segs]
    mem = [sum(pb.memory[j][pick[j]] for j in s) for s in segs]
    boundary = []
    for s in segs:   # bytes leaving a segment: its last node's output (the residual stream)
        n = pb.nodes[s[-1]]
        boundary.append(sum(w * pb.profile.collective_time(CollectiveKind.SEND_RECV, pb._bytes(n, env), 2)
                            for (_, _, w), env in zip(pb.phases, pb.env)))
    m = len(segs)
    pre_t, pre_m = np.concatenate([[0], np.cumsum(secs)]), np.concatenate([[0], np.cumsum(mem)])
    INF = float("inf")
    best = [[INF] * (pp + 1) for _ in range(m + 1)]
    back = [[-1] * (pp + 1) for _ in range(m + 1)]
    best[0][0] = 0.0
    for i in range(1, m + 1):
        for k in range(1, pp + 1):
            for a in range(k - 1, i):
                if best[a][k - 1] == INF or pre_m[i] - pre_m[a] > limit or pre_l[i] == pre_l[a]:
                    continue
                stage = pre_t[i] - pre_t[a] + (boundary[i - 1] if i < m else 0.0)
                v = max(best[a][k - 1], stage)
                if v < best[i][k]:
                    best[i][k], back[i][k] = v, a
    if best[m][pp] == INF:
        raise InvalidRequestError(f"no split into {pp} stages fits {limit / 2**30:.1f} GiB per rank; raise --pp, "
                                  "--tp or --memory-per-device")
    out, i = [], m
    for k in range(pp, 0, -1):
        a = back[i][k]
        layers = [x for j in range(a, i) for x in {pb.nodes[n].origin.layer for n in segs[j]} if x is not None]
        out.append(Stage(a, i - 1, float(pre_t[i] - pre_t[a]), float(pre_m[i] - pre_m[a]),
                         min(layers, default=-1), max(layers, default=-1)))
        i = a
    return tuple(reversed(out))


def _stage_nodes(pb: _Problem, stages: tuple) -> list[list[int]]:
    """Node indices of each stage (its segments' nodes)."""
    segs = _segments(pb)
    return [[j for seg in segs[st.first_segment:st.last_segment + 1] for j in seg] for st in stages]


def _stage_memory(pb: _Problem, pick: list[int], stages: tuple) -> list[tuple[float, float]]:
    """(weight bytes, KV bytes for one batch) per stage."""
    out = []
    for nodes in _stage_nodes(pb, stages):
        kv = sum(pb.memory[j][pick[j]] for j in nodes if pb.nodes[j].op in ATTENTION_OPS)
        out.append((sum(pb.memory[j][pick[j]] for j in nodes) - kv, kv))
    return out


def _stage_step_times(pb: _Problem, pick: list[int], colls: list[CollectiveEdge], stages: tuple) -> list[list[float]]:
    """Seconds of one step of each phase in each stage: its nodes, the collectives they
    consume, and the send of its last value to the next stage."""
    members = _stage_nodes(pb, stages)
    stage_of = {pb.name(pb.nodes[j]): k for k, nodes in enumerate(members) for j in nodes}
    out = [[sum(pb.step_cost[j][pick[j]][k] for j in nodes) for k in range(len(pb.phases))] for nodes in members]
    for c in colls:
        for k, nbytes in enumerate(c.bytes):
            out[stage_of[c.consumer]][k] += pb.profile.collective_time(c.kind, nbytes, pb.tp)
    for s, nodes in enumerate(members[:-1]):
        last = pb.nodes[nodes[-1]]
        for k, env in enumerate(pb.env):
            out[s][k] += pb.profile.collective_time(CollectiveKind.SEND_RECV, pb._bytes(last, env), 2)
    return out


def decode_step_costs(module: Module, profile: DeviceProfile, workload: Workload, tokens: int = 1,
                      graph: str = "forward") -> tuple[dict[int, float], float]:
    """Predicted seconds of one decode step over ``tokens`` tokens on one rank (the cost model's
    kernel families, weights in the workload's storage): per transformer layer, and the rest
    (embedding, final norm, lm_head). What the self-draft's choice of layers is priced with."""
    pb = _Problem(module, module.graphs[graph], 1, profile, replace(workload, batch=tokens))
    k = next(i for i, (phase, _, _) in enumerate(pb.phases) if phase == "decode")
    per: dict[int, float] = {}
    rest = 0.0
    for j, n in enumerate(pb.nodes):
        t = min(c[k] for c in pb.step_cost[j])
        if n.origin.layer is None:
            rest += t
        else:
            per[n.origin.layer] = per.get(n.origin.layer, 0.0) + t
    return per, rest
