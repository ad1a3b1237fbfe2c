"""Raise  x*cos + cat(-x[..., d/2:], x[..., :d/2])*sin  (rotate-half rotary embedding)
to  rope(x, cos, sin). cos/sin stay ordinary values computed once from the positions."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph


def _is_half(s, x, first: bool) -> bool:
    if not (isinstance(s, Node) and s.op is Op.SLICE and s.inputs[0] is x):
        return False
    d = x.type.shape[-1]
    a = s.attrs
    if not isinstance(d, int) or a["dim"] != x.type.rank - 1 or a["step"] != 1:
        return False
    return (a["start"], a["end"]) == ((0, d // 2) if first else (d // 2, None))


def _rotated(r, m: Match):
    """r == cat(neg(x[..., d/2:]), x[..., :d/2])  ->  x or None."""
    if not m.is_op(r, Op.CONCAT) or len(r.inputs) != 2 or r.attrs["dim"] != r.type.rank - 1:
        return None
    neg, lo = r.inputs
    if not m.is_op(neg, Op.NEG) or not isinstance(lo, Node):
        return None
    x = lo.inputs[0] if lo.op is Op.SLICE else None
    if x is None or not _is_half(lo, x, True) or not _is_half(neg.inputs[0], x, False):
        return None
    return x


def _rope(node: Node, m: Match):
    for a, b in (node.inputs, node.inputs[::-1]):
        if not (m.is_op(a, Op.MUL) and m.is_op(b, Op.MUL)):
            continue
        for r, sin in (b.inputs, b.inputs[::-1]):
            x = _rotated(r, m)
            if x is None:
                continue
            cos = next((c for c, y in (a.inputs, a.inputs[::-1]) if y is x), None)
            if cos is not None and isinstance(cos, Node) and isinstance(sin, Node):
                return [Node(Op.ROPE, (x, cos, sin), {}, node.type, node.origin)]
    return None


@per_graph
def raise_rope(graph, module, ctx):
    """Raise the rotate-half rotary embedding pattern to rope."""
    apply_rules(graph, module, {Op.ADD: [_rope]})
