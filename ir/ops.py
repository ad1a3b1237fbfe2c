"""Op kinds and their registry.

Every op kind is a member of ``Op``; ``REGISTRY[op]`` gives its reference
implementation (torch), its shape rule and its cost. No op name appears as a free
string outside this table, the text parser and the frontend's ATen table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import moe, quant
from .attention import KV_SCALE_BYTES, _attention, _cached_attention
from .types import DType


class Op(Enum):
    # graph structure
    INPUT = "input"
    # dense compute
    EMBEDDING = "embedding"
    LINEAR = "linear"
    MATMUL = "matmul"
    # raised LLM ops
    RMS_NORM = "rms_norm"
    LAYER_NORM = "layer_norm"
    ROPE = "rope"
    SDPA = "sdpa"
    ATTENTION = "attention"
    CACHED_ATTENTION = "cached_attention"
    GLU = "glu"
    # mixture of experts (ir/moe.py): dense routing weights, then the experts they choose
    TOP_K = "top_k"
    MOE_ROUTE = "moe_route"
    MOE_EXPERTS = "moe_experts"
    # elementwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    NEG = "neg"
    RSQRT = "rsqrt"
    SQRT = "sqrt"
    EXP = "exp"
    TANH = "tanh"
    COS = "cos"
    SIN = "sin"
    SILU = "silu"
    GELU = "gelu"
    RELU = "relu"
    SIGMOID = "sigmoid"
    CAST = "cast"
    # quantized weights (ir/quant.py): a recipe makes the blocks, a node reads them as f32
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    # reductions
    MEAN = "mean"
    SUM = "sum"
    SOFTMAX = "softmax"
    # layout
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    PERMUTE = "permute"
    UNSQUEEZE = "unsqueeze"
    EXPAND = "expand"
    CONCAT = "concat"
    SLICE = "slice"
    TAKE = "take"
    # tensor parallelism: collectives over the ranks of the group, and a rank's own slice
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    LOCAL_SHARD = "local_shard"
    # pipeline parallelism: a value handed to the next stage's rank / taken from the previous one's
    SEND = "send"
    RECV = "recv"


UNARY = {Op.NEG, Op.RSQRT, Op.SQRT, Op.EXP, Op.TANH, Op.COS, Op.SIN, Op.SILU, Op.GELU, Op.RELU,
         Op.SIGMOID, Op.CAST}
BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW}
ELEMENTWISE = UNARY | BINARY
COMMUTATIVE = {Op.ADD, Op.MUL}
LAYOUT = {Op.RESHAPE, Op.TRANSPOSE, Op.PERMUTE, Op.UNSQUEEZE, Op.EXPAND, Op.CONCAT, Op.SLICE}
# A weight stored in another format: a node reading it as f32, a recipe making that storage;
# the inputs of each op that are weight matrices (stored narrow by --dtype, read by its kernel).
WEIGHT_READS = {Op.CAST, Op.DEQUANTIZE}
WEIGHT_INPUTS = {Op.LINEAR: (1,), Op.EMBEDDING: (1,), Op.MOE_EXPERTS: (2, 3)}
STORAGE_RECIPES = {Op.CAST, Op.QUANTIZE}
# Ops the constant folder may evaluate at compile time on weights (cheap, exact).
FOLDABLE = ELEMENTWISE | LAYOUT
# Ops with an effect besides their result (they write the KV cache, or talk to another stage).
EFFECTFUL = {Op.CACHED_ATTENTION, Op.SEND, Op.RECV}
# Point to point between pipeline stages: ``peer`` is the other rank's offset from this one.
POINT_TO_POINT = {Op.SEND, Op.RECV}
# Collectives: every rank runs the same graph, so removing or merging one happens on all ranks
# alike; they stay pure for the passes.
COLLECTIVE = {Op.ALL_REDUCE, Op.ALL_GATHER, Op.REDUCE_SCATTER}
# Ops whose result depends on the rank: their reference takes ``comm=`` (ir.ops.Comm), and
# local_shard also ``rank=`` (a weight recipe's slice for one rank).
COMMUNICATING = COLLECTIVE | POINT_TO_POINT | {Op.LOCAL_SHARD}


@dataclass(frozen=True)
class Estimate:
    """Work of one op: floating-point operations, bytes moved, bytes communicated."""
    flops: float = 0.0
    bytes: float = 0.0
    comm: float = 0.0

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.flops + other.flops, self.bytes + other.bytes, self.comm + other.comm)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


# ---------------------------------------------------------------- reference impls

def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(x, w, *, eps):
    # Same order of operations as the HF Llama/Qwen2/Mistral RMSNorm, so fp32 results match.
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@dataclass(frozen=True)
class Comm:
    """Whom a graph's communicating ops talk to, handed to the interpreter (and to a compiled
    plan's collective steps) as an argument; no module keeps one. ``group``: the collectives'
    tensor-parallel ranks, any object with get_rank(), get_world_size(), all_reduce(t) and
    all_gather(parts, t) (a torch.distributed group, the runtime's shared-memory group, a
    test's threads); ``world``: send/recv between pipeline stages, with get_rank(),
    send(t, dst) and recv(t, src) by global rank (torch.distributed itself)."""
    group: Any = None
    world: Any = None


def _need_group(op: str, ranks: int, comm: Optional[Comm]):
    g = comm.group if comm is not None else None
    if g is None or g.get_world_size() != ranks:
        raise RuntimeError(f"{op} over {ranks} ranks needs a group of that size "
                           "(run the artifact with ffc.load, which starts the ranks)")
    return g


def _all_reduce(x, *, ranks, comm=None):
    y = x.contiguous().clone()
    if ranks > 1:
        _need_group("all_reduce", ranks, comm).all_reduce(y)
    return y


def _all_gather(x, *, dim, ranks, comm=None):
    if ranks == 1:
        return x.clone()
    g = _need_group("all_gather", ranks, comm)
    parts = [torch.empty_like(x.contiguous()) for _ in range(ranks)]
    g.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


def _local_shard(x, *, dim, ranks, rank=None, comm=None):
    """This rank's slice of ``x`` along ``dim`` (of ``ranks`` equal slices): rank ``rank``, else
    the group's rank, else 0."""
    if rank is None:
        rank = comm.group.get_rank() if comm is not None and comm.group is not None else 0
    return x.chunk(ranks, dim)[rank].clone()   # its own storage (a weights file cannot alias)


def _world(comm: Optional[Comm]):
    if comm is None or comm.world is None:
        raise RuntimeError("send/recv between pipeline stages need the artifact's ranks (run it with ffc.load)")
    return comm.world


def _send(x, *, peer, comm=None):
    """Hand ``x`` to the rank ``peer`` places after this one (the next stage); the result is x."""
    w = _world(comm)
    w.send(x.contiguous(), w.get_rank() + peer)
    return x


def _recv(*, peer, shape, dtype, comm=None):
    """What the rank ``peer`` places from this one (the previous stage) sends: a new tensor."""
    w = _world(comm)
    t = torch.empty(tuple(shape), dtype=DType(dtype).torch)
    w.recv(t, w.get_rank() + peer)
    return t


def _reduce_scatter(x, *, dim, ranks, comm=None):
    return _local_shard(_all_reduce(x, ranks=ranks, comm=comm), dim=dim, ranks=ranks, comm=comm)


def _scaled_shape(factor_of):
    def rule(in_shapes, *, dim, ranks, rank=None):
        out = list(in_shapes[0])
        out[dim] = factor_of(out[dim], ranks)
        return tuple(out)
    return rule


_ACTS = moe.ACTS    # what glu and the experts apply


def _slice(x, *, dim, start=0, end=None, step=1):
    return x.narrow(dim, start, (x.shape[dim] if end is None else min(end, x.shape[dim])) - start) \
        if step == 1 else x[(slice(None),) * dim + (slice(start, end, step),)]


# ---------------------------------------------------------------- cost rules

def _bytes_of(shapes_dtypes) -> float:
    """Bytes of (shape, dtype) pairs; a dtype is a torch dtype or a DType (a quantized format:
    its bytes per value, scales included)."""
    return float(sum(_numel(s) * (d.element_bytes if isinstance(d, DType) else d.itemsize) for s, d in shapes_dtypes))


def _cost_default(ins, out) -> Estimate:
    return Estimate(flops=0.0, bytes=_bytes_of(ins + [out]))


def _cost_elementwise(ins, out) -> Estimate:
    return Estimate(flops=float(_numel(out[0])), bytes=_bytes_of(ins + [out]))


def _cost_linear(ins, out) -> Estimate:
    (x, _), (w, _) = ins[0], ins[1]
    return Estimate(flops=2.0 * _numel(x[:-1]) * w[0] * w[1], bytes=_bytes_of(ins + [out]))


def _cost_matmul(ins, out) -> Estimate:
    (a, _) = ins[0]
    return Estimate(flops=2.0 * _numel(out[0]) * a[-1], bytes=_bytes_of(ins + [out]))


def _cost_dequantize(ins, out) -> Estimate:
    return Estimate()   # what a kernel that reads the weight through it reads: its blocks


def _cost_embedding(ins, out) -> Estimate:
    return Estimate(bytes=2.0 * _bytes_of([out]) + _bytes_of([ins[0]]))


def _cost_norm(ins, out) -> Estimate:
    return Estimate(flops=5.0 * _numel(out[0]), bytes=_bytes_of(ins + [out]))


def _cost_attention(ins, out) -> Estimate:
    (q, _), (k, _) = ins[0], ins[1]
    b, h, t, d = q
    return Estimate(flops=4.0 * b * h * t * k[2] * d, bytes=_bytes_of(ins[:3] + [out]))


def attention_work(heads: int, kv_heads: int, head_dim: int, keys: float, kv_dtype) -> Estimate:
    """Attention over a KV cache, for ``keys`` (query token, key position) pairs in all: each
    query head scores and sums every key it sees (4 FLOPs per element), and K and V of each
    KV head are read once for all the query heads that share it (GQA)."""
    return Estimate(flops=4.0 * heads * keys * head_dim,
                    bytes=2.0 * kv_heads * keys * kv_row_bytes(head_dim, kv_dtype))


def kv_row_bytes(head_dim: int, kv_dtype) -> int:
    """Bytes of one cached K (or V) row of a head: D values, and an int8 row's scale."""
    kv_dtype = DType(kv_dtype)
    return head_dim * kv_dtype.itemsize + (KV_SCALE_BYTES if kv_dtype is DType.I8 else 0)


def _cost_cached_attention(ins, out) -> Estimate:
    # Reads on average half of a sequence's cache up to the longest position: MB * BS / 2.
    (q, _) = ins[0]
    _, h, t, d = q
    (cache, cdt) = ins[6]
    m = ins[5][0][1] * cache[4]
    return attention_work(h, cache[3], d, t * m / 2, DType.of(cdt)) + Estimate(bytes=_bytes_of(ins[:3] + [out]))


# ---------------------------------------------------------------- shape rules
# A shape rule maps concrete input shapes (and attrs) to the output shape. Rules left as
# None are derived by running the reference implementation on meta tensors.

def _shape_same_as_first(in_shapes, **_):
    return in_shapes[0]


@dataclass(frozen=True)
class OpDef:
    ref: Callable
    cost: Callable[..., Estimate] = _cost_default
    shape: Optional[Callable] = None
    # Names of the attributes the op takes (keyword arguments of ``ref``).
    attrs: tuple[str, ...] = field(default=())
    cost_attrs: tuple[str, ...] = field(default=())    # the attributes ``cost`` takes too


def node_cost(op: "Op", attrs, ins, out) -> Estimate:
    """The cost rule of ``op`` over (shape, dtype) pairs, with the attributes it reads."""
    d = REGISTRY[op]
    return d.cost(ins, out, **{k: attrs[k] for k in d.cost_attrs})


def _elementwise(fn):
    return OpDef(ref=fn, cost=_cost_elementwise)


def _cost_moe(ins, out, *, top_k) -> Estimate:
    """Each token runs top_k experts (6 H I FLOPs); weights read: the experts chosen (moe.experts_read)."""
    (gu, gdt), tokens = ins[2], _numel(ins[0][0][:-1])
    return Estimate(flops=3.0 * tokens * top_k * gu[1] * gu[2], bytes=_bytes_of(ins[:2] + [out]) +
                    moe.experts_read(tokens, gu[0], top_k) * 1.5 * _bytes_of([(gu[1:], gdt)]))


REGISTRY: dict[Op, OpDef] = {
    Op.EMBEDDING: OpDef(ref=lambda ids, w: F.embedding(ids, w), cost=_cost_embedding),
    Op.LINEAR: OpDef(ref=lambda x, w, b=None: F.linear(x, w, b), cost=_cost_linear),
    Op.MATMUL: OpDef(ref=torch.matmul, cost=_cost_matmul),
    Op.RMS_NORM: OpDef(ref=_rms_norm, cost=_cost_norm, attrs=("eps",)),
    Op.LAYER_NORM: OpDef(ref=lambda x, w=None, b=None, *, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
                         cost=_cost_norm, attrs=("eps",)),
    Op.ROPE: OpDef(ref=lambda x, cos, sin: x * cos + _rotate_half(x) * sin, cost=_cost_norm,
                   shape=_shape_same_as_first),
    Op.SDPA: OpDef(ref=_attention, cost=_cost_attention, attrs=("causal", "scale", "window", "softcap", "alibi")),
    Op.ATTENTION: OpDef(ref=_attention, cost=_cost_attention, attrs=("causal", "scale", "window", "softcap", "alibi")),
    Op.CACHED_ATTENTION: OpDef(ref=_cached_attention, cost=_cost_cached_attention, shape=_shape_same_as_first,
                               attrs=("layer", "scale", "window", "softcap", "form", "alibi")),
    Op.GLU: OpDef(ref=lambda a, b, *, act: _ACTS[act](a) * b, cost=_cost_elementwise, attrs=("act",)),
    Op.TOP_K: OpDef(ref=moe.top_k, cost=_cost_norm, shape=_shape_same_as_first, attrs=("k",)),
    Op.MOE_ROUTE: OpDef(ref=moe.moe_route, cost=_cost_norm, shape=_shape_same_as_first, attrs=("top_k", "normalize")),
    Op.MOE_EXPERTS: OpDef(ref=moe.moe_experts, cost=_cost_moe, shape=_shape_same_as_first, attrs=("act", "top_k"),
                          cost_attrs=("top_k",)),
    Op.ALL_REDUCE: OpDef(ref=_all_reduce, shape=lambda s, *, ranks, rank=None: tuple(s[0]), attrs=("ranks",)),
    Op.ALL_GATHER: OpDef(ref=_all_gather, shape=_scaled_shape(lambda n, r: n * r), attrs=("dim", "ranks")),
    Op.REDUCE_SCATTER: OpDef(ref=_reduce_scatter, shape=_scaled_shape(lambda n, r: n // r), attrs=("dim", "ranks")),
    Op.LOCAL_SHARD: OpDef(ref=_local_shard, shape=_scaled_shape(lambda n, r: n // r), attrs=("dim", "ranks")),
    Op.SEND: OpDef(ref=_send, shape=lambda s, *, peer: tuple(s[0]), attrs=("peer",)),
    Op.RECV: OpDef(ref=_recv, shape=lambda s, *, peer, shape, dtype: tuple(shape), attrs=("peer", "shape", "dtype")),
    Op.ADD: _elementwise(torch.add),
    Op.SUB: _elementwise(torch.sub),
    Op.MUL: _elementwise(torch.mul),
    Op.DIV: _elementwise(torch.div),
    Op.POW: _elementwise(torch.pow),
    Op.NEG: _elementwise(torch.neg),
    Op.RSQRT: _elementwise(torch.rsqrt),
    Op.SQRT: _elementwise(torch.sqrt),
    Op.EXP: _elementwise(torch.exp),
    Op.TANH: _elementwise(torch.tanh),
    Op.COS: _elementwise(torch.cos),
    Op.SIN: _elementwise(torch.sin),
    Op.SILU: _elementwise(F.silu),
    Op.GELU: OpDef(ref=lambda x, *, approximate="none": F.gelu(x, approximate=approximate),
                   cost=_cost_elementwise, attrs=("approximate",)),
    Op.RELU: _elementwise(F.relu),
    Op.SIGMOID: _elementwise(torch.sigmoid),
    Op.CAST: OpDef(ref=lambda x, *, dtype: x.to(DType(dtype).torch), cost=_cost_elementwise, attrs=("dtype",)),
    # shapes are logical ([N, K] for a quantized [N, K] weight; its storage is the format's)
    Op.QUANTIZE: OpDef(ref=lambda x, *, format: quant.quantize(x, DType(format)), shape=_shape_same_as_first,
                       attrs=("format",)),
    Op.DEQUANTIZE: OpDef(ref=lambda x, *, format: quant.dequantize(x, DType(format)), cost=_cost_dequantize,
                         shape=_shape_same_as_first, attrs=("format",)),
    Op.MEAN: OpDef(ref=lambda x, *, dims, keepdim: x.mean(dim=list(dims), keepdim=keepdim),
                   cost=_cost_elementwise, attrs=("dims", "keepdim")),
    Op.SUM: OpDef(ref=lambda x, *, dims, keepdim: x.sum(dim=list(dims), keepdim=keepdim),
                  cost=_cost_elementwise, attrs=("dims", "keepdim")),
    Op.SOFTMAX: OpDef(ref=lambda x, *, dim: torch.softmax(x, dim), cost=_cost_norm, attrs=("dim",)),
    Op.RESHAPE: OpDef(ref=lambda x, *, shape: x.reshape(shape), attrs=("shape",)),
    Op.TRANSPOSE: OpDef(ref=lambda x, *, dim0, dim1: x.transpose(dim0, dim1), attrs=("dim0", "dim1")),
    Op.PERMUTE: OpDef(ref=lambda x, *, dims: x.permute(dims), attrs=("dims",)),
    Op.UNSQUEEZE: OpDef(ref=lambda x, *, dim: x.unsqueeze(dim), attrs=("dim",)),
    Op.EXPAND: OpDef(ref=lambda x, *, shape: x.expand(shape), attrs=("shape",)),
    Op.CONCAT: OpDef(ref=lambda *xs, dim: torch.cat(xs, dim), attrs=("dim",)),
    Op.SLICE: OpDef(ref=_slice, attrs=("dim", "start", "end", "step")),
    Op.TAKE: OpDef(ref=lambda x, idx, *, dim: x.index_select(dim, idx), attrs=("dim",)),
}

# Attributes whose values are shapes: symbolic dims in them are bound at run time.
SHAPE_ATTRS = {Op.RESHAPE: "shape", Op.EXPAND: "shape", Op.RECV: "shape"}


missing = [op for op in Op if op is not Op.INPUT and op not in REGISTRY]
assert not missing, f"ops without a registry entry: {missing}"
