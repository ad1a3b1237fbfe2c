"""Decide the parallel strategy: a pipeline step that decides, not a rewrite.

Matches: the forward graph after the raise passes, when the context asks for more than one
rank (``ctx.tp * ctx.pp > 1``). Guarantees: the module is unchanged; the context the later
passes see carries the frozen ``Strategy`` that ``ctx.planner`` (the compiler's search over
the compile options' device profile, memory limit and workload) returns, which
apply_tensor_parallel and split_pipeline_stages apply; the step's dump is its description.
"""
from __future__ import annotations

from dataclasses import replace

from ffc.ir import Module

from .manager import Decision, PassContext


def _decide(module: Module, ctx: PassContext) -> PassContext:
    if ctx.on_search_point is not None:
        ctx.on_search_point(module)
    if ctx.tp * ctx.pp == 1:
        return ctx
    if ctx.planner is None:
        raise ValueError(f"tp={ctx.tp} pp={ctx.pp} needs a strategy search (the pass context has no planner)")
    return replace(ctx, strategy=ctx.planner(module, ctx))


def _describe(ctx: PassContext) -> str:
    return ctx.strategy.describe() if ctx.strategy is not None else "one rank: no parallel strategy to search"


search_parallel_strategy = Decision("search_parallel_strategy", _decide, _describe)
