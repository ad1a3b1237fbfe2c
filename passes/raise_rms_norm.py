"""Raise  w * (x * rsqrt(mean(x^2, last, keepdim) + eps))  to  rms_norm(x, w) {eps}
(Llama, Mistral, Qwen2 RMSNorm). Matches either operand order of both muls.

A norm of a transposed view that keeps the last dimension last (Gemma 3 normalizes q and k
after moving the heads forward) is computed before the transpose instead: it is row-wise over
the last dimension, so it commutes, and its input is then contiguous rows for the kernel."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph


def _normalized(y, m: Match):
    """y == x * rsqrt(mean(x^2) + eps)  ->  (x, eps) or None."""
    if not m.is_op(y, Op.MUL):
        return None
    pair = m.operands(y, lambda a: m.is_op(a, Op.RSQRT))
    if pair is None:
        return None
    rsqrt, x = pair
    add = rsqrt.inputs[0]
    if not m.is_op(add, Op.ADD) or not m.scalar(add.inputs[1]):
        return None
    mean = add.inputs[0]
    if not m.is_op(mean, Op.MEAN) or mean.attrs["dims"] != (x.type.rank - 1,) or not mean.attrs["keepdim"]:
        return None
    sq = mean.inputs[0]
    if not m.is_op(sq, Op.POW) or sq.inputs[0] is not x or sq.inputs[1] != 2:
        return None
    return x, float(add.inputs[1])


def _rms_norm(node: Node, m: Match):
    pair = m.operands(node, lambda a: (t := m.param_type(a)) is not None and t.rank == 1)
    if pair is None:
        return None
    w, y = pair
    found = _normalized(y, m)
    if found is None or not isinstance(found[0], Node):
        return None
    x, eps = found
    return [Node(Op.RMS_NORM, (x, w), {"eps": eps}, node.type, node.origin)]


def _norm_before_layout(node: Node, m: Match):
    t = node.inputs[0]
    if not m.is_op(t, Op.TRANSPOSE, Op.PERMUTE) or not isinstance(t.inputs[0], Node):
        return None
    last = t.type.rank - 1
    if t.op is Op.TRANSPOSE and last in (t.attrs["dim0"], t.attrs["dim1"]):
        return None
    if t.op is Op.PERMUTE and list(t.attrs["dims"])[-1] != last:
        return None
    x = t.inputs[0]
    norm = Node(node.op, (x,) + tuple(node.inputs[1:]), dict(node.attrs), node.type.with_shape(x.type.shape),
                node.origin)
    return [norm, Node(t.op, (norm,), dict(t.attrs), node.type, t.origin)]


@per_graph
def raise_rms_norm(graph, module, ctx):
    """Raise the RMSNorm pattern to rms_norm; norms of transposed views move before the transpose."""
    apply_rules(graph, module, {Op.MUL: [_rms_norm]})
    apply_rules(graph, module, {Op.RMS_NORM: [_norm_before_layout], Op.LAYER_NORM: [_norm_before_layout]})
