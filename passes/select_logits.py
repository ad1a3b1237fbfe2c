"""Prefill computes logits only where they are sampled: a ``logits_index`` [N] input
selects the tokens (each sequence's last) before the lm_head linear, so prefill does
not pay T x vocab work."""
from __future__ import annotations

from ffc.ir import Module, Node, Op, TensorType
from ffc.ir.sharding import R
from ffc.ir.types import DType


def select_logits(module: Module, ctx) -> Module:
    """Select prefill tokens by %logits_index before the lm_head (no-op if present)."""
    g0 = module.graphs.get("prefill")
    if g0 is None or any(n.name == "logits_index" for n in g0.inputs):
        return module
    out = module.clone()
    g = out.graphs["prefill"]
    logits = g.outputs[0]
    index = Node(Op.INPUT, type=TensorType(DType.I64, ("N",), R if int(out.meta.get("tp", 1)) > 1 else None),
                 name="logits_index")
    g.inputs.append(index)
    target = logits if logits.op is not Op.LINEAR else logits.inputs[0]
    if not isinstance(target, Node) or target.type.rank != 3:
        raise ValueError(f"expected [1, T, C] before the lm_head, found {target}")
    shape = (target.type.shape[0], "N", target.type.shape[2])
    take = Node(Op.TAKE, (target, index), {"dim": 1}, target.type.with_shape(shape), target.origin)
    if target is logits:
        g.nodes.append(take)
        g.outputs[0] = take
        return out
    g.insert_before(logits, [take])
    logits.inputs = (take,) + logits.inputs[1:]
    logits.type = logits.type.with_shape((shape[0], "N", logits.type.shape[2]))
    return out
