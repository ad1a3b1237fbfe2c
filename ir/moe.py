"""Mixture of experts in the IR: routing and grouped experts as ops, with their reference
implementations (the registry in ops.py names them) and the torch custom op the frontend
exports an HF experts module as.

Routing weights are dense, ``[..., E]`` with zeros for the experts a token does not use (the
"combine weights" of GShard), not top-k values and indices: one tensor, so an expert-parallel
rank takes its experts' columns as a plain slice, and a kernel skips the zero entries.

  top_k(x) {k}                               the k largest of each row in place, zeros elsewhere
                                             (aten.topk as the frontend finds it in a router)
  moe_route(logits) {top_k, normalize}       softmax over the experts, its top k kept,
                                             renormalized to sum 1 when ``normalize``
  moe_experts(x, w, gate_up, down) {act}     sum over experts e of w[.., e] *
                                             down[e] @ (act(gate_e x) * up_e x), where
                                             gate_up[e] = [gate_e; up_e] ([E, 2I, H]), down [E, H, I]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the activations ffc names (glu's and the experts'), by name
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
        "sigmoid": torch.sigmoid}


def top_k(x: torch.Tensor, *, k: int) -> torch.Tensor:
    vals, idx = x.topk(k, dim=-1)
    return torch.zeros_like(x).scatter(-1, idx, vals)


def moe_route(logits: torch.Tensor, *, top_k: int, normalize: bool) -> torch.Tensor:
    """Dense routing weights, as HF's routers compute them (softmax in f32, then top k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    vals, idx = probs.topk(top_k, dim=-1)
    if normalize:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals).to(logits.dtype)


def moe_experts(x: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *,
                act: str, top_k: int = 0) -> torch.Tensor:
    """Each expert runs on the tokens that give it a nonzero weight (HF's eager loop); ``top_k``
    (how many a token has at most) is for the cost and the kernels."""
    shape = x.shape
    x, w = x.reshape(-1, shape[-1]), w.reshape(-1, w.shape[-1])
    out = torch.zeros_like(x)
    inner = gate_up.shape[1] // 2
    for e in range(w.shape[-1]):
        rows = (w[:, e] != 0).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        h = F.linear(x[rows], gate_up[e].to(x.dtype))
        h = ACTS[act](h[:, :inner]) * h[:, inner:]
        out.index_add_(0, rows, F.linear(h, down[e].to(x.dtype)) * w[rows, e, None])
    return out.reshape(shape)


def experts_read(tokens: float, experts: int, k: int) -> float:
    """Experts whose weights a step over ``tokens`` tokens reads, each choosing ``k`` of
    ``experts``: all of them once the batch is large, each token's own few when it is small
    (the expected number of distinct experts hit by uniform routing)."""
    if experts <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - min(k, experts) / experts) ** max(tokens, 0.0))


# The op an HF experts module is exported as (frontend.py routes MoE blocks here): what its
# routing chose (top-k indices and weights), applied by ffc's reference.
@torch.library.custom_op("ffc::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, act: str) -> torch.Tensor:
    dense = torch.zeros(x.shape[0], gate_up.shape[0], dtype=x.dtype, device=x.device)
    dense = dense.scatter(-1, top_k_index, top_k_weights.to(x.dtype))
    return moe_experts(x, dense, gate_up, down, act=act)


@moe_experts_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up, down, act):
    return torch.empty_like(x)
