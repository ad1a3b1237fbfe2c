"""Raise  sdpa(q, repeat_kv(k), repeat_kv(v))  to  attention(q, k, v): grouped-query
attention without materialising the repeated K/V. repeat_kv is the expand/reshape
pattern  reshape(expand(unsqueeze(k, 2), [B,Hkv,R,S,D]), [B,Hkv*R,S,D]), or K/V broadcast
to the query heads before the heads axis moves forward and rope is applied (Falcon).
Plain SDPA (no repetition) is raised too; every attention keeps causal and scale (and
ALiBi's slopes, a 4th input)."""
from __future__ import annotations

from typing import Optional

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


def _unbroadcast(x, m: Match) -> Optional[list[Node]]:
    """K/V broadcast to every query head before the heads move forward (Falcon's grouped QKV):
    ``[rope(] transpose(reshape(expand(y, [B,S,G,R,D]), [B,S,G*R,D]), 1, 2) [, cos, sin)]`` with
    y [B,S,G,1,D]. New nodes computing the same over y's G heads (rope is the same for every
    head, so it moves behind the broadcast), the last one the un-repeated [B,G,S,D]; else None."""
    rope = x if m.is_op(x, Op.ROPE) else None
    t = x.inputs[0] if rope is not None else x
    if not m.is_op(t, Op.TRANSPOSE) or {t.attrs["dim0"], t.attrs["dim1"]} != {1, 2}:
        return None
    r = t.inputs[0]
    e = r.inputs[0] if m.is_op(r, Op.RESHAPE) else None
    y = e.inputs[0] if m.is_op(e, Op.EXPAND) else None
    if not isinstance(y, Node) or y.type.rank != 5:
        return None
    b, s, g, one, d = y.type.shape
    rep = e.type.shape[3]
    if one != 1 or not isinstance(g, int) or not isinstance(rep, int) or tuple(e.type.shape) != (b, s, g, rep, d) \
            or tuple(r.type.shape) != (b, s, g * rep, d):
        return None
    flat = Node(Op.RESHAPE, (y,), {"shape": [b, s, g, d]}, y.type.with_shape((b, s, g, d)), r.origin)
    heads = Node(Op.TRANSPOSE, (flat,), {"dim0": 1, "dim1": 2}, y.type.with_shape((b, g, s, d)), t.origin)
    if rope is None:
        return [flat, heads]
    return [flat, heads, Node(Op.ROPE, (heads,) + tuple(rope.inputs[1:]), dict(rope.attrs), heads.type, rope.origin)]


def _attention(node: Node, m: Match):
    (q, k, v), extra = node.inputs[:3], tuple(node.inputs[3:])    # extra: ALiBi's slopes
    k0, v0 = _unrepeat(k, m), _unrepeat(v, m)
    if k0.type.shape[1] != v0.type.shape[1]:
        k0, v0 = k, v
    attrs = {"window": None, **node.attrs}     # causal, scale, and a window and softcap where the layer has them
    kb, vb = _unbroadcast(k, m), _unbroadcast(v, m)
    if kb is not None and vb is not None and kb[-1].type.shape[1] == vb[-1].type.shape[1]:
        return kb + vb + [Node(Op.ATTENTION, (q, kb[-1], vb[-1]) + extra, attrs, node.type, node.origin)]
    return [Node(Op.ATTENTION, (q, k0, v0) + extra, attrs, node.type, node.origin)]


@per_graph
def raise_attention(graph, module, ctx):
    """Raise SDPA over repeated K/V to grouped-query attention."""
    apply_rules(graph, module, {Op.SDPA: [_attention]})
