"""Remove ops that return their input unchanged: same-dtype casts, identity reshapes,
expands and transposes, full slices, x*1 and x+0, and a concat's empty operands (a partial
rotary whose rotated part is the whole head concatenates an empty pass-through slice)."""
from __future__ import annotations

from ffc.ir import Node, Op

from .rewrite import Match, apply_rules, per_graph


def _same_type(node: Node, m: Match):
    x = node.inputs[0]
    ty = x.type if isinstance(x, Node) else m.param_type(x)
    return [x] if ty == node.type else None


def _transpose(node: Node, m: Match):
    return [node.inputs[0]] if node.attrs["dim0"] == node.attrs["dim1"] else None


def _identity_scalar(value):
    def rule(node: Node, m: Match):
        x, s = node.inputs
        if isinstance(x, Node) and m.scalar(s) and s == value and x.type == node.type:
            return [x]
        if node.op in (Op.ADD, Op.MUL) and isinstance(s, Node) and m.scalar(x) and x == value \
                and s.type == node.type:
            return [s]
        return None
    return rule


def _concat_empty(node: Node, m: Match):
    """concat(x, empty) is x: operands with no extent along the concat dim add nothing."""
    d = node.attrs["dim"]
    keep = [x for x in node.inputs if not (isinstance(x, Node) and x.type.shape[d] == 0)]
    return [keep[0]] if len(keep) == 1 and len(node.inputs) > 1 and keep[0].type == node.type else None


RULES = {
    Op.CONCAT: [_concat_empty],
    Op.CAST: [_same_type],
    Op.RESHAPE: [_same_type],
    Op.EXPAND: [_same_type],
    Op.SLICE: [_same_type],
    Op.TRANSPOSE: [_transpose],
    Op.MUL: [_identity_scalar(1.0)],
    Op.DIV: [_identity_scalar(1.0)],
    Op.ADD: [_identity_scalar(0.0)],
    Op.SUB: [_identity_scalar(0.0)],
}


@per_graph
def remove_noops(graph, module, ctx):
    """Remove ops that return their input unchanged (casts to the same dtype, ...)."""
    apply_rules(graph, module, RULES)
