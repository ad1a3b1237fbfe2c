"""Parallel strategies as data: what the search decides and the passes apply.

The strategy search (compiler/search.py) turns a forward graph, a device profile and a
``Workload`` into a frozen ``Strategy``: a placement per node (``Choice``), the collectives
those placements imply (``CollectiveEdge``), the pipeline stages (``Stage``, by layer index)
and its predictions. ``apply_tensor_parallel`` and ``split_pipeline_stages`` read it from the
pass context; ``describe`` is what ``ffc inspect --strategy`` prints. Nothing here computes a
cost: these types only hold decisions, so they can be printed, stored, tested and applied.
"""
from __future__ import annotations

from collections import Counter
import json
from dataclasses import asdict, dataclass
from typing import Optional

from ffc.errors import InvalidRequestError

from .ops import LAYOUT
from .sharding import CollectiveKind
from .types import KV_DTYPES, WEIGHT_DTYPES, DType, Placement, parse_dtype


@dataclass(frozen=True)
class Workload:
    """What a plan is optimised for: per batch, one prefill then ``output_tokens`` decode steps."""
    prompt_tokens: int = 512
    output_tokens: int = 128
    batch: int = 8
    max_seq_len: int = 2048      # the KV cache holds batch x max_seq_len positions
    weight_dtype: DType = DType.F32   # storage of weights (bytes read, memory)
    kv_dtype: DType = DType.F32       # storage of the KV cache

    def __post_init__(self):
        for name in ("prompt_tokens", "output_tokens", "batch", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"workload {name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "weight_dtype", parse_dtype(self.weight_dtype))
        object.__setattr__(self, "kv_dtype", parse_dtype(self.kv_dtype))
        if self.weight_dtype not in WEIGHT_DTYPES and not self.weight_dtype.quantized:
            raise InvalidRequestError(f"workload weight dtype {self.weight_dtype} is not a weight storage type")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidRequestError(f"workload KV-cache dtype {self.kv_dtype} is not a KV-cache storage type")

    @property
    def context(self) -> int:    # mean context length during decode
        return self.prompt_tokens + self.output_tokens // 2

    def phases(self) -> list[tuple[str, dict, float]]:
        """(phase, dims, weight): the prefill of the batch's prompts, and its decode steps."""
        return [("prefill", {"T": self.prompt_tokens * self.batch}, 1.0),
                ("decode", {"T": self.batch}, float(self.output_tokens))]

    @staticmethod
    def parse(text: Optional[str], **defaults) -> "Workload":
        """``prompt=512,output=128,batch=8`` (any subset)."""
        keys = {"prompt": "prompt_tokens", "output": "output_tokens", "batch": "batch"}
        kw = dict(defaults)
        for part in filter(None, (text or "").split(",")):
            k, _, v = part.partition("=")
            if k.strip() not in keys or not v.strip().isdigit() or int(v) < 1:
                raise InvalidRequestError(f"--workload {text!r}: use e.g. prompt=512,output=128,batch=8")
            kw[keys[k.strip()]] = int(v)
        return Workload(**kw)


@dataclass(frozen=True)
class Rejected:
    """Another strategy of a node, with the rest of the plan held fixed."""
    strategy: str
    extra_s: Optional[float]     # seconds over the workload more than the chosen one; None: illegal
    why: str = ""


@dataclass(frozen=True)
class Choice:
    """How one node runs: its op's strategy, the placement of each input and of its output."""
    node: str                    # the node's name as the IR printer numbers it
    op: str
    origin: str
    strategy: str
    inputs: tuple                # Placement per input (None for literals)
    output: Placement
    compute_s: float             # predicted seconds over the workload on one rank
    memory: float                # bytes per rank (weights, and KV cache for attention)
    alternatives: tuple = ()     # Rejected, cheapest first
    layer: Optional[int] = None  # the transformer layer of the node (its origin's)


@dataclass(frozen=True)
class CollectiveEdge:
    """A collective the placements imply between a producer and a consumer."""
    kind: CollectiveKind
    producer: str
    consumer: str
    bytes: tuple                 # per workload phase, the full tensor
    seconds: float               # over the workload


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a run of the graph's segments (head, layers, tail) and its layers."""
    first_segment: int
    last_segment: int
    seconds: float               # predicted over the workload
    bytes: float                 # weights and KV cache it holds
    first_layer: int             # -1 when the stage holds no transformer layer
    last_layer: int

    @property
    def has_layers(self) -> bool:
        return self.first_layer >= 0


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for a strategy, per rank."""
    prefill_s: float
    decode_s: float
    decode_interval_s: float     # between finished decode steps (pp batches in flight)
    decode_tok_s: float
    compute_s: float
    comm_s: float
    total_s: float
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    memory_limit: float
    memory_bytes: float
    collectives: int

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_limit


@dataclass(frozen=True)
class Reference:
    """The same graph under another plan, for the explanation."""
    plan: str
    compute_s: float
    comm_s: float
    collectives: int


@dataclass(frozen=True)
class Strategy:
    tp: int
    pp: int
    profile: str
    workload: Workload
    choices: tuple               # Choice per node, graph order
    collectives: tuple           # CollectiveEdge per resharding edge
    stages: tuple                # Stage per pipeline stage (one when pp == 1)
    predicted: Optional[Prediction] = None    # None: given by hand, not searched
    references: tuple = ()       # Reference per other plan

    @staticmethod
    def manual(tp: int, placements: dict, stages: tuple = ()) -> "Strategy":
        """A strategy given by hand (a test, a user's file): node name -> (input placements,
        output placement) and, for pipelines, the stages' layers; no predictions."""
        choices = tuple(Choice(node, "", "", "manual", tuple(ins), out, 0.0, 0.0)
                        for node, (ins, out) in placements.items())
        return Strategy(tp, max(1, len(stages)), "manual", Workload(), choices, (), tuple(stages))

    def choice(self, node: str) -> Choice:
        return next(c for c in self.choices if c.node == node)

    def placements(self) -> dict[str, tuple[tuple, Placement]]:
        """node name -> (input placements, output placement): what apply_tensor_parallel needs."""
        return {c.node: (c.inputs, c.output) for c in self.choices}

    def to_json(self) -> dict:
        """Every field as JSON (placements, kinds and dtypes as their text): parallel/strategy.json,
        which ``ffc inspect --strategy --plot`` draws."""
        return json.loads(json.dumps(asdict(self), default=str))

    def collective_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(c.kind.value for c in self.collectives).items()))

    def describe(self, top: int = 2) -> str:
        w, p = self.workload, self.predicted
        if p is None:
            return f"strategy: tp={self.tp} pp={self.pp}, given by hand ({len(self.choices)} placements)"
        lines = [f"strategy: tp={self.tp} pp={self.pp} on {self.profile}; workload: prefill {w.prompt_tokens} tokens "
                 f"x batch {w.batch}, then {w.output_tokens} decode steps (KV for {w.max_seq_len} positions, "
                 f"weights {w.weight_dtype})",
                 f"predicted per rank: prefill {p.prefill_s * 1e3:.2f} ms, decode step {p.decode_s * 1e3:.3f} ms "
                 f"({p.decode_tok_s:.0f} tok/s{' with pp batches in flight' if self.pp > 1 else ''}), "
                 f"communication {p.comm_s * 1e3:.2f} ms of the workload's {p.total_s * 1e3:.1f} ms; memory "
                 f"{p.memory_bytes / 2**30:.2f} GiB (weights {p.weight_bytes / 2**30:.2f}, KV {p.kv_bytes / 2**30:.2f}, "
                 f"activations {p.activation_bytes / 2**30:.2f}) of {p.memory_limit / 2**30:.1f} GiB",
                 f"collectives per workload: {len(self.collectives)} edges "
                 + ", ".join(f"{k} x{n}" for k, n in self.collective_counts().items())]
        if self.references:
            lines.append("why: the same graph under other plans, on this profile:")
            for r in self.references:
                lines.append(f"  {r.plan:30} compute {r.compute_s * 1e3:9.2f} ms + communication "
                             f"{r.comm_s * 1e3:9.2f} ms = {(r.compute_s + r.comm_s) * 1e3:9.2f} ms "
                             f"({r.collectives} collectives)")
        if self.pp > 1:
            for k, s in enumerate(self.stages):
                lines.append(f"stage {k}: segments {s.first_segment}..{s.last_segment} (layers {s.first_layer}.."
                             f"{s.last_layer}), {s.seconds * 1e3:.2f} ms, {s.bytes / 2**30:.2f} GiB")
        lines.append("")
        lines.append(f"{'node':8} {'op':16} {'strategy':12} {'inputs -> output':28} {'compute':>10} {'memory':>10}  "
                     f"rejected (extra time)")
        layout = {o.value for o in LAYOUT}
        for c in self.choices:
            if c.op in layout and not c.alternatives:
                continue
            alts = "; ".join(f"{r.strategy} {'illegal: ' + r.why if r.extra_s is None else f'+{r.extra_s * 1e3:.3f} ms'}"
                             for r in c.alternatives[:top])
            ins = ", ".join("-" if x is None else str(x) for x in c.inputs)
            lines.append(f"%{c.node:7} {c.op:16} {c.strategy:12} {ins + ' -> ' + str(c.output):28} "
                         f"{c.compute_s * 1e3:8.3f}ms {c.memory / 2**20:8.1f}Mi  {alts}  # {c.origin}")
        return "\n".join(lines)
