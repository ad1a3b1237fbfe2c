"""Kernel families: which ops anchor a kernel, what each family's spec holds, how it is priced.

A spec is everything a family's template prints, as typed values: sizes and strides are
``Expr`` (rendered to C by codegen, evaluated by the cost model), element types ``DType``,
flags ``bool``, and ``arg`` the position of each named kernel argument in the step's list.
One spec type per family; ``SPECS`` maps a family to it. ``cost_family`` is the one place
that says how a kernel of a family is priced (the profile fits each cost family apart).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from ffc.ir.ops import COLLECTIVE, POINT_TO_POINT, Op
from ffc.ir.types import QUANT, DType

from .expr import Expr

GEMV_MAX_M = 8       # up to this many rows a linear is bound by reading its weights (a GEMV)


class Family(Enum):
    LINEAR = "linear"
    NORM = "norm"
    ATTENTION = "attention"
    GATHER = "gather"
    POINTWISE = "pointwise"
    MOE = "moe"                   # mixture of experts: routing, and the grouped experts
    COLLECTIVE = "collective"     # not a kernel: the runtime runs it between executor segments


class CostFamily(str, Enum):
    """What a device profile fits a cost for (``ffc calibrate --artifact``), keyed by value."""
    LINEAR_GEMV = "linear_gemv"
    LINEAR_GEMM = "linear_gemm"
    # quantized weights (integer dot products): 4-bit values (q4_0, q4_1, q4_k, i4g64), 8-bit ones
    LINEAR_GEMV_Q4 = "linear_gemv_q4"
    LINEAR_GEMM_Q4 = "linear_gemm_q4"
    LINEAR_GEMV_Q8 = "linear_gemv_q8"
    LINEAR_GEMM_Q8 = "linear_gemm_q8"
    ATTENTION = "attention"
    ATTENTION_DECODE = "attention_decode"   # one query per sequence: bound by K/V reads
    NORM = "norm"
    GATHER = "gather"
    POINTWISE = "pointwise"
    MOE = "moe"
    COLLECTIVE = "collective"

    def __str__(self) -> str:
        return self.value


# The op that anchors each kernel (fusion adds epilogues and prologues around it).
KERNEL_OF_OP: dict[Op, Family] = {
    Op.LINEAR: Family.LINEAR, Op.RMS_NORM: Family.NORM, Op.LAYER_NORM: Family.NORM,
    Op.CACHED_ATTENTION: Family.ATTENTION, Op.EMBEDDING: Family.GATHER, Op.TAKE: Family.GATHER,
    Op.MOE_ROUTE: Family.MOE, Op.MOE_EXPERTS: Family.MOE,
    **{op: Family.COLLECTIVE for op in COLLECTIVE | POINT_TO_POINT | {Op.LOCAL_SHARD}},
}
# Ops of the graph before the KV cache is inserted (where the strategy search prices nodes),
# by the family that will run them.
ATTENTION_OPS = frozenset({Op.ATTENTION, Op.SDPA, Op.CACHED_ATTENTION})
_BEFORE_LOWERING = {Op.MATMUL: Family.LINEAR, Op.ATTENTION: Family.ATTENTION, Op.SDPA: Family.ATTENTION}


def family_of(op: Op) -> Family:
    """The kernel family that runs ``op`` (elementwise ops and views: pointwise)."""
    return KERNEL_OF_OP.get(op) or _BEFORE_LOWERING.get(op) or Family.POINTWISE


def cost_family(kind: "Op | Family", rows: int = 1, decode: bool = False,
                weight: Optional[DType] = None) -> CostFamily:
    """How a kernel is priced: linears as GEMV (weight reads) up to GEMV_MAX_M rows, else GEMM
    (FMAs), apart for weights in quantized formats (by the bits of their values); attention
    apart in decode (one query per sequence) and prefill."""
    family = kind if isinstance(kind, Family) else family_of(kind)
    if family is Family.LINEAR:
        gemv = rows <= GEMV_MAX_M
        if weight is not None and weight.quantized:
            if QUANT[weight].bits == 4:
                return CostFamily.LINEAR_GEMV_Q4 if gemv else CostFamily.LINEAR_GEMM_Q4
            return CostFamily.LINEAR_GEMV_Q8 if gemv else CostFamily.LINEAR_GEMM_Q8
        return CostFamily.LINEAR_GEMV if gemv else CostFamily.LINEAR_GEMM
    if family is Family.ATTENTION:
        return CostFamily.ATTENTION_DECODE if decode else CostFamily.ATTENTION
    return CostFamily(family.value)


Slots = tuple[tuple[str, Optional[int]], ...]    # ((argument name, its position in the step's args or None), ...)


@dataclass(frozen=True)
class LinearSpec:
    """out[m, n] = epilogue(sum_k x[m, k] * W[n, k]); the epilogue adds the bias, applies
    ``glu`` (act(gate) * up, over v = gate) or ``act`` (over v), then adds the residual."""
    wtype: DType
    K: int
    N: int
    M: Expr                  # rows
    x_ld: Expr
    out_ld: Expr
    res_ld: Expr
    bias: bool
    residual: bool
    glu: Optional[Expr]
    act: Optional[Expr]
    gate_off: int            # weight rows of the gate (glu) or of the whole output
    up_off: int
    nr: int                  # panel rows of packed weights (0: unpacked rows)
    panels: int
    up_panel: int            # the first panel of the up half (glu)
    gemv_max_m: int
    arg: Slots
    wformat: str = ""        # a quantized format (ir/quant.py): panels of its blocks; "" for float


@dataclass(frozen=True)
class NormSpec:
    """RMSNorm / LayerNorm of each row; prologue h = a + b (writing the sum when asked), or
    only the rows ``idx`` selects (gather)."""
    kind: Op
    eps: float
    residual: bool
    write_sum: bool
    gather: bool
    weight: bool
    bias: bool
    K: int
    M: Expr
    out_ld: Expr
    a_ld: Expr
    arg: Slots
    b_ld: Optional[Expr] = None
    sum_ld: Optional[Expr] = None


@dataclass(frozen=True)
class AttentionSpec:
    """Paged-KV-cache attention of one step: writes this step's K/V (rotated when ``rope``)
    into the cache, then attends over each token's sequence. Strides per head (hs) and per
    token (ts) of q, k, v; rope tables per token."""
    H: int
    Hkv: int
    D: int
    BS: int                  # positions per cache block
    MB: int                  # blocks per sequence (block-table columns)
    ctype: DType             # the cache's storage type
    row: int                 # elements per cached row: D, or D + 4 for int8 (its f32 scale follows)
    scale: float
    window: Optional[int]
    rope: bool
    q_hs: Expr
    q_ts: Expr
    k_hs: Expr
    k_ts: Expr
    v_hs: Expr
    v_ts: Expr
    arg: Slots
    cos_ts: Optional[Expr] = None
    sin_ts: Optional[Expr] = None
    tree: bool = False       # a verify step: each token's tree_base and tree_mask (ffc.ir.attention._cached_attention)
    softcap: Optional[float] = None   # scores squashed to tanh(s / cap) * cap before the softmax (Gemma 2)
    alibi: Optional[float] = None   # scores + bf16(slopes[h] * key position) * alibi (ffc.ir.attention)


@dataclass(frozen=True)
class GatherSpec:
    """Rows of a table by index (embedding lookup, row selection); ``nr`` > 0: the table is a
    linear's packed panels (a tied lm_head)."""
    wtype: DType
    rows: Expr               # rows of the table (indices past it read row 0)
    K: int
    M: Expr                  # rows gathered
    tab_ld: Expr
    out_ld: Expr
    nr: int
    arg: Slots
    wformat: str = ""        # a quantized table: rows dequantized from its panels


@dataclass(frozen=True)
class PointwiseOutput:
    var: str
    dtype: DType
    index: int               # position in the step's args
    expr: Expr               # over the output indices i0, i1, ...


@dataclass(frozen=True)
class PointwiseLoad:
    var: str                 # in<k>, as loads in the expressions name it
    dtype: DType
    index: int


@dataclass(frozen=True)
class PointwiseSpec:
    """A fused tree of elementwise ops, views, concat and rotations: one loop over the
    output's index space writing each output's expression."""
    shape: tuple[Expr, ...]
    numel: Expr
    ops: tuple[Op, ...]
    outputs: tuple[PointwiseOutput, ...]
    loads: tuple[PointwiseLoad, ...]

    def __post_init__(self):
        for v in [o.var for o in self.outputs] + [x.var for x in self.loads]:
            if not (v[:1] == "o" and v[1:].isdigit()) and not (v[:2] == "in" and v[2:].isdigit()):
                raise ValueError(f"pointwise variable {v!r} is not o<k> or in<k>")


@dataclass(frozen=True)
class MoeSpec:
    """Mixture of experts (ir/moe.py), rows of ``M`` tokens. ``route``: each row of router
    logits [E] -> dense routing weights (softmax, its top ``top_k`` kept, renormalized when
    ``normalize``). Else the grouped experts: out[m] = sum over the experts e with w[m, e] != 0
    of w[m, e] * down_e (act(gate_e x_m) * up_e x_m), gate_up [E, 2I, H] and down [E, H, I] as
    stored (wtype); each token's act(gate) * up rows go to ``work`` [M, top_k, I] (a kernel's
    buffer) between the two halves."""
    route: bool
    M: Expr
    E: int
    top_k: int
    in_ld: Expr              # router logits (route) / x rows
    w_ld: Expr               # routing weight rows (experts)
    out_ld: Expr
    arg: Slots
    normalize: bool = False
    H: int = 0
    I: int = 0
    act: Optional[Expr] = None   # over v (the gate)
    wtype: DType = DType.F32


@dataclass(frozen=True)
class CollectiveSpec:
    """A collective or a send/recv on arena memory, run by the runtime (torch.distributed or
    the local ranks' shared memory) between executor segments. The input is read through its
    strides (a view); the output is written contiguous."""
    op: Op
    out_shape: tuple[Expr, ...]
    in_shape: tuple[Expr, ...] = ()
    in_strides: tuple[Expr, ...] = ()
    dim: Optional[int] = None
    ranks: Optional[int] = None
    peer: Optional[int] = None


SPECS = {Family.LINEAR: LinearSpec, Family.NORM: NormSpec, Family.ATTENTION: AttentionSpec,
         Family.GATHER: GatherSpec, Family.POINTWISE: PointwiseSpec, Family.MOE: MoeSpec}
