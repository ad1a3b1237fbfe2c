"""Pass manager: runs the pipeline, verifies and dumps the IR after every pass, and
turns any failure into an error that names the pass, the passes before it, the node
and a command that reproduces it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ffc.errors import PassError
from ffc.ir import Module, verify_module
from ffc.ir.verify import VerifyError


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read; passes read no globals and no environment."""
    max_seq_len: int = 2048
    model: str = ""  # for repro commands only
    dtype: str = "fp32"  # storage type of weights: fp32, bf16 or fp16
    kv_block_size: int = 16  # positions per paged-KV-cache block
    tp: int = 1              # tensor-parallel ranks
    tp_plan: tuple = ()      # ((node name, input placements, output placement), ...) from the search
    pp_stages: tuple = ()    # ((first layer, last layer), ...) per pipeline stage, from the search


Pass = Callable[[Module, PassContext], Module]


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


def pass_name(p: Pass) -> str:
    return getattr(p, "pass_name", p.__name__)


def dump_name(index: int, name: str) -> str:
    return f"{index:02d}-{name}.ir"


def run_pipeline(module: Module, pipeline: list[Pass], ctx: PassContext,
                 dump: Optional[Callable[[str, Module], None]] = None, first: int = 1) -> PipelineResult:
    """Apply ``pipeline`` in order. ``dump(file_name, module)`` sees the input (as
    ``00-input.ir``) and the module after each pass. ``first``: the number of the first pass
    (to continue a pipeline run in parts)."""
    from ffc.ir import print_module
    try:
        verify_module(module)
    except VerifyError as e:
        raise PassError(f"the input IR does not verify: {e}") from None
    if dump and first == 1:
        dump(dump_name(0, "input"), module)
    result = PipelineResult(module)
    done: list[str] = []
    for k, p in enumerate(pipeline, first):
        name = pass_name(p)
        before = print_module(result.module) if dump else None
        t0 = time.perf_counter()
        try:
            out = p(result.module, ctx)
            verify_module(out)
        except (VerifyError, ValueError, KeyError, AssertionError, IndexError) as e:
            prev = dump_name(k - 1, done[-1] if done else "input")
            raise PassError(
                f"pass {k} '{name}' failed (after {', '.join(done) or 'no passes'}): {e}\n"
                f"Repro: ffc compile {ctx.model or 'MODEL'} --from-ir <dump of {prev}> -o /tmp/repro.ffc"
            ) from None
        seconds = time.perf_counter() - t0
        changed = before is None or print_module(out) != before
        result.module = out
        result.records.append(PassRecord(k, name, seconds, out.node_count(), changed))
        done.append(name)
        if dump:
            dump(dump_name(k, name), out)
    return result
