"""Raise a mixture-of-experts router, softmax then top-k (then renormalized to sum 1), to
moe_route(logits) {top_k, normalize}: the dense routing weights of the experts op (ir/moe.py)
as one row-wise op with a kernel, instead of the reductions it was traced as."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph


def _last(n: Node, dims) -> bool:
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] % n.type.rank == n.type.rank - 1


def _f32(x):
    """``x`` seen through casts that keep it f32."""
    while isinstance(x, Node) and x.op is Op.CAST and x.type.dtype == x.inputs[0].type.dtype:
        x = x.inputs[0]
    return x


def _router(w) -> tuple | None:
    """(logits, k, normalize) when ``w`` is top_k(softmax(logits)), maybe divided by its sum."""
    w, normalize = _f32(w), False
    if Match.is_op(w, Op.DIV):
        t, s = _f32(w.inputs[0]), _f32(w.inputs[1])
        if not (Match.is_op(s, Op.SUM) and _f32(s.inputs[0]) is t and _last(s, s.attrs["dims"])
                and s.attrs["keepdim"]):
            return None
        w, normalize = t, True
    if not Match.is_op(w, Op.TOP_K):
        return None
    p = _f32(w.inputs[0])
    if not Match.is_op(p, Op.SOFTMAX) or not _last(p, p.attrs["dim"]):
        return None
    return p.inputs[0], w.attrs["k"], normalize


def _route(node: Node, m: Match):
    found = _router(node.inputs[1])
    if found is None:
        return None
    logits, k, normalize = found
    if k != node.attrs["top_k"] or logits.type.shape != node.inputs[1].type.shape:
        return None
    route = Node(Op.MOE_ROUTE, (logits,), {"top_k": k, "normalize": normalize}, node.inputs[1].type,
                 node.inputs[1].origin)
    return [route, Node(Op.MOE_EXPERTS, (node.inputs[0], route) + node.inputs[2:], dict(node.attrs), node.type,
                        node.origin)]


@per_graph
def raise_moe_route(graph, module, ctx):
    """Raise the routers of mixture-of-experts layers to moe_route."""
    apply_rules(graph, module, {Op.MOE_EXPERTS: [_route]})
