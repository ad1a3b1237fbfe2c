"""Pass manager: runs the pipeline, verifies and dumps the IR after every pass, and
turns any failure into an error that names the pass, the passes before it, the node
and a command that reproduces it.

A pipeline step is a pass (``Module -> Module``) or a ``Decision``: a step that decides
rather than rewrites (the parallel strategy search). A decision returns the context the
later passes see; the module goes on unchanged, and its dump is the decision as text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from ffc.errors import FfcError, PassError
from ffc.ir import Module, print_module, verify_module
from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Strategy
from ffc.ir.types import DType
from ffc.ir.verify import VerifyError


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read; passes read no globals and no environment."""
    max_seq_len: int = 2048
    model: str = ""  # for repro commands only
    dtype: DType = DType.F32  # storage type of linear/embedding weights: f32, bf16 or f16
    quant: QuantPolicy = QuantPolicy()   # quantized storage per tensor class (--quant, --quant-skip)
    # the block format of each source weight in a GGUF model file (HF name -> format); {} otherwise
    source_formats: Mapping[str, DType] = field(default_factory=dict)
    kv_block_size: int = 16  # positions per paged-KV-cache block
    kv_dtype: DType = DType.F32   # storage of the KV cache (i8: D values and an f32 scale per row)
    tp: int = 1              # tensor-parallel ranks asked for
    pp: int = 1              # pipeline stages asked for
    # the strategy search, given by the compiler: (module, context) -> Strategy
    planner: Optional[Callable[[Module, "PassContext"], Strategy]] = None
    # called with the module where the search plans (any tp): what else the compiler prices on
    # the cost model there (the self-draft's step times)
    on_search_point: Optional[Callable[[Module], None]] = None
    strategy: Optional[Strategy] = None   # what the search decided (set by search_parallel_strategy)


Pass = Callable[[Module, PassContext], Module]


@dataclass(frozen=True)
class Decision:
    """A pipeline step that decides: ``decide(module, ctx)`` returns the context for the passes
    after it; ``describe(ctx)`` is the step's dump (NN-name.txt)."""
    name: str
    decide: Callable[[Module, PassContext], PassContext]
    describe: Callable[[PassContext], str]

    @property
    def __name__(self) -> str:       # named in pipelines and records like a pass
        return self.name


Step = Union[Pass, Decision]


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    nodes: int
    changed: bool


@dataclass
class PipelineResult:
    module: Module
    records: list[PassRecord] = field(default_factory=list)
    ctx: Optional[PassContext] = None    # the context after the last step (with its decisions)


def pass_name(p: Step) -> str:
    return getattr(p, "pass_name", p.__name__)


def dump_name(index: int, name: str, suffix: str = ".ir") -> str:
    return f"{index:02d}-{name}{suffix}"


def run_pipeline(module: Module, pipeline: list[Step], ctx: PassContext,
                 dump: Optional[Callable[[str, Optional[Module], str], None]] = None, first: int = 1) -> PipelineResult:
    """Apply ``pipeline`` in order. ``dump(file_name, module, text)`` sees the input (as
    ``00-input.ir``) and the module after each pass, with its printed text; after a decision,
    ``dump(NN-name.txt, None, description)``. ``first``: the number of the first step (to
    continue a pipeline run in parts)."""
    try:
        verify_module(module)
    except VerifyError as e:
        raise PassError(f"the input IR does not verify: {e}") from None
    # with dumps, the module is printed once per pass: that text is the dump and the next pass's
    # "before" (a printed 30-layer model is ~30 ms; three prints a pass added ~1.5 s per compile)
    text = print_module(module) if dump else None
    if dump and first == 1:
        dump(dump_name(0, "input"), module, text)
    result = PipelineResult(module, ctx=ctx)
    done: list[str] = []
    last_ir = dump_name(0, "input")     # the dump a repro starts from
    for k, p in enumerate(pipeline, first):
        name = pass_name(p)
        if isinstance(p, Decision):
            t0 = time.perf_counter()
            ctx = p.decide(result.module, ctx)
            result.ctx = ctx
            result.records.append(PassRecord(k, name, time.perf_counter() - t0, result.module.node_count(), False))
            done.append(name)
            if dump:
                dump(dump_name(k, name, ".txt"), None, p.describe(ctx) + "\n")
            continue
        before = text
        t0 = time.perf_counter()
        try:
            out = p(result.module, ctx)
            verify_module(out)
        except FfcError:
            raise
        except (VerifyError, ValueError, KeyError, AssertionError, IndexError) as e:
            prev = last_ir
            raise PassError(
                f"pass {k} '{name}' failed (after {', '.join(done) or 'no passes'}): {e}\n"
                f"Repro: ffc compile {ctx.model or 'MODEL'} --from-ir <dump of {prev}> -o /tmp/repro.ffc"
            ) from None
        seconds = time.perf_counter() - t0
        text = print_module(out) if dump else None
        changed = before is None or text != before
        result.module = out
        result.records.append(PassRecord(k, name, seconds, out.node_count(), changed))
        last_ir = dump_name(k, name)
        done.append(name)
        if dump:
            dump(dump_name(k, name), out, text)
    return result
