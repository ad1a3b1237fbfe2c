"""Fusion: which ops share a kernel, chosen by legality plus profit (bytes kept out of memory).

Each fusion kind is one ``Rule``: ``match`` finds a candidate anchored at a node (the nodes
it would take in) and its profit, the bytes per token it keeps out of memory (from the
values' types); ``illegal`` says why it cannot be formed now (None when it can); ``form``
forms it. Candidates of every rule are taken greedily in profit order while still legal,
as in Inductor's scheduler. Every candidate becomes a ``FusionDecision`` (formed or not,
and why): the phase returns them as data and ``ffc inspect --plan`` prints them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ffc.ir import Graph, Node, Op
from ffc.plan.kernels import Family
from ffc.plan.schema import FusionDecision, FusionKind

from .groups import GluParts, Grouping, bytes_per_token
from .pointwise import ACTIVATIONS

NORMS = (Op.RMS_NORM, Op.LAYER_NORM)


@dataclass(frozen=True)
class Match:
    anchor: Node
    nodes: tuple            # what the fusion takes in, as the decision names them
    saved: float            # bytes per token kept out of memory


@dataclass(frozen=True)
class Rule:
    kind: FusionKind
    match: Callable[[Grouping, Node], Optional[Match]]
    illegal: Callable[[Grouping, Match], Optional[tuple]]    # (reason, nodes named) or None
    form: Callable[[Grouping, Match], tuple]                  # forms it: (the decision's reason, nodes named)


def _tail(gr: Grouping, n: Node) -> Node:
    """What the linear's group writes now (the linear itself, or its last epilogue)."""
    g = gr.owner.get(n)
    return g.outputs["out"] if g is not None else n


# ---------------------------------------------------------------- linear + activation
def _act_match(gr, n):
    u = gr.only_user(n) if n.op is Op.LINEAR else None
    return Match(n, (n, u), 2 * bytes_per_token(n)) if u is not None and u.op in ACTIVATIONS else None


def _act_illegal(gr, m):
    n, u = m.nodes
    return None if _tail(gr, n) is n and gr.free(u) else ("the linear already has an epilogue", (n, u))


def _act_form(gr, m):
    n, u = m.nodes
    g = gr.group(n, Family.LINEAR)
    gr.add(g, u)
    g.outputs["out"] = u
    g.reasons.append(f"{u.op.value} fused as epilogue: saves {m.saved:.0f} B/token")
    return "activation applied in the GEMM epilogue", m.nodes


# ---------------------------------------------------------------- linear + GLU
def glu_pattern(gr: Grouping, lin: Node):
    """(glu, gate slice, up slice) when the linear's output halves feed one GLU."""
    us = gr.users.get(lin, [])
    if len(us) != 2 or lin in gr.graph.outputs or any(u.op is not Op.SLICE for u in us):
        return None
    glus = [gr.only_user(u) for u in us]
    if glus[0] is None or glus[0] is not glus[1] or glus[0].op is not Op.GLU:
        return None
    glu = glus[0]
    a, b = glu.inputs[0], glu.inputs[1]
    last = lin.type.rank - 1
    for s in (a, b):
        if s.attrs.get("dim") % lin.type.rank != last or (s.attrs.get("step") or 1) != 1:
            return None
    wa, wb = (s.type.shape[-1] for s in (a, b))
    if wa != wb or not isinstance(wa, int):
        return None
    return glu, a, b


def _glu_match(gr, n):
    p = glu_pattern(gr, n) if n.op is Op.LINEAR else None
    return Match(n, (n, p[1], p[2], p[0]), 2 * bytes_per_token(n)) if p is not None else None


def _glu_illegal(gr, m):
    n, a, b, glu = m.nodes
    return None if _tail(gr, n) is n and gr.free(glu, a, b) else ("the linear already has an epilogue", (n, glu))


def _glu_form(gr, m):
    n, a, b, glu = m.nodes
    g = gr.group(n, Family.LINEAR)
    gr.add(g, a, b, glu)
    g.outputs["out"] = glu
    g.glu = GluParts(glu.attrs["act"], a.attrs.get("start") or 0, b.attrs.get("start") or 0)
    g.reasons.append(f"split + {glu.attrs['act']}-GLU fused as epilogue: saves {m.saved:.0f} B/token")
    return "gate and up rows computed together; only act(gate)*up is written", m.nodes


# ---------------------------------------------------------------- linear + residual add
def _res_match(gr, n):
    if n.op is not Op.LINEAR:
        return None
    u = gr.only_user(n)
    tail = u if u is not None and u.op in ACTIVATIONS else n
    r = gr.only_user(tail)
    return Match(n, (n,), 2 * bytes_per_token(tail)) if r is not None and r.op is Op.ADD else None


def _res_add(gr, n):
    tail = _tail(gr, n)
    return tail, gr.only_user(tail)


def _res_illegal(gr, m):
    n = m.anchor
    tail, add = _res_add(gr, n)
    if add is None or add.op is not Op.ADD or not gr.free(add):
        return "the add is already fused elsewhere", (n,)
    other = add.inputs[1] if add.inputs[0] is tail else add.inputs[0]
    if not isinstance(other, Node) or other.type.shape != tail.type.shape or other.type.dtype != "f32":
        return "the residual is not a same-shape f32 tensor", (n, add)
    return None


def _res_form(gr, m):
    n = m.anchor
    tail, add = _res_add(gr, n)
    g = gr.group(n, Family.LINEAR)
    gr.add(g, add)
    g.outputs["out"] = add
    g.residual = add.inputs[1] if add.inputs[0] is tail else add.inputs[0]
    g.reasons.append(f"residual add %{add.name} fused as epilogue: saves {m.saved:.0f} B/token")
    return "residual added in the GEMM epilogue", (n, add)


# ---------------------------------------------------------------- norm + residual add (prologue)
def _norm_res_match(gr, n):
    x = n.inputs[0] if n.op in NORMS else None
    if not isinstance(x, Node) or x.op is not Op.ADD:
        return None
    return Match(n, (x, n), bytes_per_token(x) * (1 if len(gr.users[x]) > 1 else 2))


def _norm_res_illegal(gr, m):
    add, n = m.nodes
    if not gr.free(add):
        owner = gr.owner[add]
        return (f"%{add.name} is already fused into {owner.family.value} %{owner.anchor.name}, which saves more",
                (add, n))
    if add.inputs[0].type.shape != add.type.shape or not isinstance(add.inputs[1], Node) or \
            add.inputs[1].type.shape != add.type.shape:
        return "the add broadcasts", (add, n)
    return None


def _norm_res_form(gr, m):
    add, n = m.nodes
    g = gr.group(n, Family.NORM)
    gr.add(g, add)
    if len(gr.users[add]) > 1 or add in gr.graph.outputs:
        g.outputs["sum"] = add
    g.residual = add
    g.reasons.append(f"residual add %{add.name} fused as prologue: saves {m.saved:.0f} B/token")
    why = "add done in the norm prologue" + (" (the sum is also written for later use)" if "sum" in g.outputs else "")
    return why, m.nodes


# ---------------------------------------------------------------- norm + row gather
def _gather_match(gr, n):
    u = gr.only_user(n) if n.op in NORMS else None
    return Match(n, (n, u), bytes_per_token(n)) if u is not None and u.op is Op.TAKE else None


def _gather_illegal(gr, m):
    n, take = m.nodes
    ok = gr.free(take) and take.attrs["dim"] % take.type.rank == take.type.rank - 2
    return None if ok else ("take is not a row selection", (n, take))


def _gather_form(gr, m):
    n, take = m.nodes
    g = gr.group(n, Family.NORM)
    gr.add(g, take)
    g.outputs["out"] = take
    g.gather = take.inputs[1]
    g.reasons.append(f"row selection %{take.name} fused: only selected rows are normalized")
    return "the norm runs on the selected rows only", m.nodes


# ---------------------------------------------------------------- attention + rope
def _rope_match(gr, n):
    if n.op is not Op.CACHED_ATTENTION or not isinstance(n.inputs[0], Node) or n.inputs[0].op is not Op.ROPE:
        return None
    q, k = n.inputs[0], n.inputs[1]
    return Match(n, (q, k, n), 2 * (bytes_per_token(q) + bytes_per_token(k)))


def _rope_illegal(gr, m):
    q, k, n = m.nodes
    ok = (isinstance(k, Node) and k.op is Op.ROPE and gr.only_user(q) is n and gr.only_user(k) is n
          and gr.free(q, k) and q.inputs[1] is k.inputs[1] and q.inputs[2] is k.inputs[2]
          and isinstance(q.type.shape[-1], int) and q.type.shape[-1] % 2 == 0)
    return None if ok else ("q and k are not both rotated by the same tables, or are used elsewhere", (q, n))


def _rope_form(gr, m):
    q, k, n = m.nodes
    g = gr.group(n, Family.ATTENTION)
    gr.add(g, q, k)
    g.rope = True
    g.reasons.append("rope on q and k, and the KV-cache write, fused into attention")
    return "q/k rotated in registers; k written to the cache already rotated", m.nodes


RULES = (
    Rule(FusionKind.LINEAR_ACTIVATION, _act_match, _act_illegal, _act_form),
    Rule(FusionKind.LINEAR_GLU, _glu_match, _glu_illegal, _glu_form),
    Rule(FusionKind.LINEAR_RESIDUAL, _res_match, _res_illegal, _res_form),
    Rule(FusionKind.NORM_RESIDUAL, _norm_res_match, _norm_res_illegal, _norm_res_form),
    Rule(FusionKind.NORM_GATHER, _gather_match, _gather_illegal, _gather_form),
    Rule(FusionKind.ATTENTION_ROPE, _rope_match, _rope_illegal, _rope_form),
)


def _decision(kind: FusionKind, nodes, saved: float, accepted: bool, reason: str) -> FusionDecision:
    return FusionDecision(kind, tuple(f"%{n.name}" for n in nodes), saved, accepted, reason)


def fuse(graph: Graph, rules=RULES) -> tuple[Grouping, list[FusionDecision]]:
    """The kernels fusion forms in ``graph`` (a Grouping) and a decision per candidate."""
    gr = Grouping(graph)
    candidates = []
    for k, n in enumerate(graph.nodes):
        for r, rule in enumerate(rules):
            m = rule.match(gr, n)
            if m is not None:
                candidates.append((-m.saved, k, r, rule, m))
    candidates.sort(key=lambda c: c[:3])
    decisions = []
    for _, _, _, rule, m in candidates:
        owner = gr.owner.get(m.anchor)
        if owner is not None and owner.anchor is not m.anchor:
            decisions.append(_decision(rule.kind, (m.anchor,), m.saved, False,
                                       f"%{m.anchor.name} already belongs to another kernel"))
            continue
        bad = rule.illegal(gr, m)
        if bad is not None:
            decisions.append(_decision(rule.kind, bad[1], m.saved, False, bad[0]))
            continue
        reason, named = rule.form(gr, m)
        decisions.append(_decision(rule.kind, named, m.saved, True, reason))
    return gr, decisions
