"""ATen -> ffc IR for mixtures of experts: a router's ``aten.topk`` and the experts op the
frontend exports HF experts modules as (``ffc::moe_experts``, ir/moe.py).

The top-k's values are held dense ([.., E], zeros off the top k: ir/moe.py's routing
weights) and its indices as that tensor's nonzero pattern, so only what keeps the zeros
zero and the sums equal may read them: scaling (mul, div, cast), a sum over the experts,
and the experts op. Anything else is refused by name (``aten_ir.Converter`` asks here)."""
from __future__ import annotations

import torch

from ffc.ir import Node, Op, TensorType
from ffc.ir import moe  # noqa: F401 - defines torch.ops.ffc.moe_experts, which the table maps

aten = torch.ops.aten


class TopKIndices:
    """The indices of a top_k: its dense values' nonzero pattern, for the experts op."""

    def __init__(self, values: Node, k: int):
        self.values, self.k = values, k


def dense_topk_type(c, fx_node, op: Op, inputs, attrs, type: TensorType, wide: Node) -> tuple[TensorType, bool]:
    """The type of an op reading ``wide``, top-k values held dense, and whether its result is
    dense top-k values too; refused unless it keeps their zeros zero and their sums (scaled by
    a tensor that is not dense, summed over the experts, or the experts op itself)."""
    if op in (Op.MUL, Op.DIV, Op.CAST) and inputs[0] is wide and not any(
            isinstance(v, Node) and v in c.dense_topk for v in inputs[1:]):
        return type.with_shape(tuple(type.shape[:-1]) + (wide.type.shape[-1],)), True
    if (op is Op.SUM and list(attrs.get("dims", ())) == [wide.type.rank - 1]) or op is Op.MOE_EXPERTS:
        return type, False
    c.unsupported(fx_node, "over top-k values (ffc reads a top-k only as a mixture of experts' routing)")


def _topk(c, n, x, k, dim=-1, largest=True, sorted=True):
    if dim % c.rank(x) != c.rank(x) - 1 or not largest:
        c.unsupported(n, "other than the largest along the last dimension")
    values = c.emit(n, Op.TOP_K, [c.arg(x)], {"k": int(k)}, type=c.type_of(x))
    c.dense_topk.add(values)
    return values, TopKIndices(values, int(k))


def _moe_experts(c, n, x, index, weights, gate_up, down, act):
    """An HF experts module (frontend.py routes its forward here): the routing weights it is
    given, dense, with the top-k they came from."""
    idx = c.arg(index)
    if not isinstance(idx, TopKIndices):
        c.unsupported(n, "whose expert indices do not come from a top-k of the router")
    return c.emit(n, Op.MOE_EXPERTS, [c.arg(x), c.arg(weights), c.arg(gate_up), c.arg(down)],
                  {"act": act, "top_k": idx.k})


MOE_ATEN = {aten.topk.default: _topk, torch.ops.ffc.moe_experts.default: _moe_experts}
# what may read top-k indices (besides operator.getitem, which picks them out)
INDEX_READERS = {_moe_experts}
