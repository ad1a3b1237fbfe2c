"""Raise  act(a) * b  (SwiGLU / GeGLU gated MLPs) to  glu(a, b) {act}."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph

_ACT = {Op.SILU: "silu", Op.RELU: "relu", Op.SIGMOID: "sigmoid"}


def _act_name(x) -> str | None:
    if not isinstance(x, Node):
        return None
    if x.op is Op.GELU:
        return "gelu_tanh" if x.attrs.get("approximate") == "tanh" else "gelu"
    return _ACT.get(x.op)


def _glu(node: Node, m: Match):
    pair = m.operands(node, lambda a: _act_name(a) is not None)
    if pair is None:
        return None
    act, b = pair
    a = act.inputs[0]
    if not isinstance(b, Node) or not isinstance(a, Node) or a.type != b.type or a.type != node.type:
        return None
    return [Node(Op.GLU, (a, b), {"act": _act_name(act)}, node.type, node.origin)]


@per_graph
def raise_glu(graph, module, ctx):
    """Raise a gated activation product to glu."""
    apply_rules(graph, module, {Op.MUL: [_glu]})
