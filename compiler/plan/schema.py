"""The plan's schema: frozen types that lowering writes and the runtime reads (plan.json).

    Plan         target, the unique kernels (family + spec), one GraphPlan per graph, the
                 packed weight layouts, the arena size, the weights it reads
    GraphPlan    the graph's steps in order, its buffers (arena offsets by liveness), inputs,
                 outputs and the fusion decisions lowering took
    Step         one kernel launch (or a collective the runtime runs) and its arguments
    Arg          a buffer, a weight (as stored, or packed in panels) or the KV cache

``Plan.to_json`` / ``Plan.from_json`` go through ``codec``: a plan read from disk is checked
field by field against these types before anything uses it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from ffc.ir.types import DType

from . import codec
from .expr import Expr
from .kernels import SPECS, CollectiveSpec, Family

PLAN_VERSION = 4                      # 2: CPU linear weights packed in panels; 3: typed specs (expressions);
                                      # 4: quantized weights (block panels), KV-cache storage types
DIMS = ("T", "N", "S")                # the dynamic dims every kernel receives, in this order
_KERNEL_NAME = re.compile(r"^k\d{1,6}_[a-z]{1,16}$")


class Target(Enum):
    """What the generated kernels run on."""
    CPU = "cpu"
    CUDA = "cuda"


class ArgKind(Enum):
    BUF = "buf"          # a buffer in the arena (a graph input is copied into its own)
    PARAM = "param"      # a weight, as stored
    PACKED = "packed"    # a weight repacked when the plan is bound (Plan.packed says how)
    CACHE = "cache"      # the KV cache; offset = the layer


class FusionKind(Enum):
    LINEAR_ACTIVATION = "linear+activation"
    LINEAR_GLU = "linear+glu"
    LINEAR_RESIDUAL = "linear+residual"
    NORM_RESIDUAL = "norm+residual"
    NORM_GATHER = "norm+gather"
    ATTENTION_ROPE = "attention+rope"
    POINTWISE = "pointwise"


@dataclass(frozen=True)
class Arg:
    kind: ArgKind
    name: str
    offset: int = 0      # elements (CACHE: the layer)
    dtype: DType = DType.F32

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}" + (f"+{self.offset}" if self.offset else "")


@dataclass(frozen=True)
class Buffer:
    dtype: DType
    shape: tuple[Expr, ...]
    live: tuple[int, int]  # first and last step that touch it (inputs: from step 0)
    bytes: int             # at the graph's largest T and N
    offset: int            # in the arena, 64-byte aligned


@dataclass(frozen=True)
class GraphInput:
    dtype: DType
    shape: tuple[Expr, ...]
    buffer: Optional[str]  # None: not copied into the arena (the KV cache)


@dataclass(frozen=True)
class GraphOutput:
    buffer: str
    dtype: DType
    shape: tuple[Expr, ...]


@dataclass(frozen=True)
class Step:
    family: Family
    kernel: Optional[str]              # None: a collective (``collective``) the runtime runs
    args: tuple[Arg, ...]
    nodes: tuple[str, ...]             # the IR nodes it computes
    origin: str
    why: tuple[str, ...] = ()          # what was fused into it
    collective: Optional[CollectiveSpec] = None


@dataclass(frozen=True)
class FusionDecision:
    kind: FusionKind
    nodes: tuple[str, ...]
    saved_bytes_per_token: float
    accepted: bool
    reason: str


@dataclass(frozen=True)
class GraphPlan:
    max_tokens: int
    max_rows: int
    inputs: dict[str, GraphInput]
    outputs: tuple[GraphOutput, ...]
    buffers: dict[str, Buffer]
    arena_bytes: int
    steps: tuple[Step, ...]
    fusion: tuple[FusionDecision, ...] = ()


@dataclass(frozen=True)
class Kernel:
    family: Family
    spec: object         # the family's spec type (kernels.SPECS)

    def __post_init__(self):
        want = SPECS.get(self.family)
        if want is None or not isinstance(self.spec, want):
            raise ValueError(f"a {self.family.value} kernel needs a {getattr(want, '__name__', 'spec')}, "
                             f"got {type(self.spec).__name__}")

    @classmethod
    def _decode_field(cls, name: str, data: dict, path: str):
        if name != "spec":
            return NotImplemented
        family = codec.decode(Family, data.get("family"), path[:-len(".spec")] + ".family")
        if family not in SPECS:
            raise codec.PlanFormatError(f"{path}: {family.value} has no kernel spec")
        return codec.decode(SPECS[family], data["spec"], path)


@dataclass(frozen=True)
class Packed:
    """A weight's row ranges packed in panels of ``nr`` rows, once at bind: float weights as
    csrc/ffc_cpu.h reads them, quantized ones (the param's format) as csrc/ffc_quant.h does."""
    param: str
    nr: int
    rows: tuple[tuple[int, int], ...]   # (first row, count) per range


@dataclass(frozen=True)
class ParamInfo:
    dtype: DType
    shape: tuple[int, ...]


def limits(graphs: dict[str, GraphPlan]) -> dict[str, tuple[int, int]]:
    """Most tokens and rows one prefill / decode / verify call takes (over a pipeline's stage graphs)."""
    out = {}
    for kind in ("prefill", "decode", "verify"):
        gps = [gp for g, gp in graphs.items() if g == kind or g.startswith(kind + "_stage")]
        if gps:
            out[kind] = (min(gp.max_tokens for gp in gps), min(gp.max_rows for gp in gps))
    return out


@dataclass(frozen=True)
class Plan:
    version: int
    target: Target
    dims: tuple[str, ...]
    kernels: dict[str, Kernel]
    graphs: dict[str, GraphPlan]
    packed: dict[str, Packed]
    arena_bytes: int
    params: dict[str, ParamInfo]

    def __post_init__(self):
        for name in self.kernels:     # kernel names become C identifiers in the generated sources
            if not _KERNEL_NAME.match(name):
                raise ValueError(f"kernel name {name!r} is not k<number>_<family>")

    def limits(self) -> dict[str, tuple[int, int]]:
        return limits(self.graphs)

    def to_json(self) -> dict:
        return codec.encode(self)

    @staticmethod
    def from_json(data, what: str = "plan") -> "Plan":
        """A plan from parsed JSON; PlanFormatError (an ArtifactError) names the field that is
        wrong, and an older or newer plan says to recompile."""
        if not isinstance(data, dict):
            raise codec.PlanFormatError(f"{what} is not a JSON object; recompile the artifact")
        if data.get("version") != PLAN_VERSION:
            raise codec.PlanFormatError(f"the artifact's plan is version {data.get('version')}, this ffc runs version "
                                        f"{PLAN_VERSION}; recompile the artifact")
        return codec.decode_dataclass(Plan, data, what)
