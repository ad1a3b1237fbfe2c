"""Raise  sdpa(q, repeat_kv(k), repeat_kv(v))  to  attention(q, k, v): grouped-query
attention without materialising the repeated K/V. repeat_kv is the expand/reshape
pattern  reshape(expand(unsqueeze(k, 2), [B,Hkv,R,S,D]), [B,Hkv*R,S,D]).
Plain SDPA (no repetition) is raised too; every attention keeps causal and scale."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph


def _unrepeat(x, m: Match):
    """The un-repeated K/V behind a repeat_kv pattern, or x itself."""
    if not m.is_op(x, Op.RESHAPE):
        return x
    e = x.inputs[0]
    if not m.is_op(e, Op.EXPAND) or not m.is_op(e.inputs[0], Op.UNSQUEEZE):
        return x
    u = e.inputs[0]
    kv = u.inputs[0]
    if u.attrs["dim"] != 2 or not isinstance(kv, Node) or kv.type.rank != 4:
        return x
    b, hkv, s, d = kv.type.shape
    rep = e.type.shape[2]
    if tuple(e.type.shape) != (b, hkv, rep, s, d) or not isinstance(rep, int) or not isinstance(hkv, int):
        return x
    if tuple(x.type.shape) != (b, hkv * rep, s, d):
        return x
    return kv


def _attention(node: Node, m: Match):
    q, k, v = node.inputs
    k0, v0 = _unrepeat(k, m), _unrepeat(v, m)
    if k0.type.shape[1] != v0.type.shape[1]:
        k0, v0 = k, v
    attrs = {"causal": node.attrs["causal"], "scale": node.attrs["scale"], "window": None}
    return [Node(Op.ATTENTION, (q, k0, v0), attrs, node.type, node.origin)]


@per_graph
def raise_attention(graph, module, ctx):
    """Raise SDPA over repeated K/V to grouped-query attention."""
    apply_rules(graph, module, {Op.SDPA: [_attention]})
