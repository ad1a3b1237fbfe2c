"""Planning tensor/pipeline parallelism for a model before building anything (``--dry-run``).

The graph the search needs is the model's forward pass after the raise passes; it depends
only on the config, so it is traced from a model whose weights are never materialised
(built on the meta device, then given uninitialised storage that tracing never reads):
planning a 70B model costs seconds and no weight memory.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Strategy, Workload
from ffc.passes import PassContext, pipeline_until_search, run_pipeline

from . import gguf_blocks, sources, trace_cache
from .cluster import DeviceProfile
from .errors import FfcError, InvalidRequestError
from .offload_policy import FLEXGEN, dry_run_policy
from .search import search


def planning_module(model: str, max_seq_len: Optional[int] = None, allow_pickle: bool = False):
    """(forward graph after the raise passes, max_seq_len, the model's source) for ``model``,
    from its config only."""
    from transformers import AutoModelForCausalLM
    source = sources.resolve(model, allow_pickle=allow_pickle)
    config = sources.load_config(source)
    sources.check_architecture(config)
    msl = sources.resolve_max_seq_len(config, max_seq_len)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf = hf.to_empty(device="cpu")
    hf.tie_weights()        # to_empty gives each module its own storage: tied weights (a shared lm_head) as loaded
    module = trace_cache.trace(hf, msl)
    return run_pipeline(module, pipeline_until_search(), PassContext(max_seq_len=msl, model=model)).module, msl, source


def plan_candidates(module, profile: DeviceProfile, workload: Workload, tp, pp, devices: Optional[int],
                    memory_limit: Optional[float]) -> list[tuple[int, int, Optional[Strategy], str]]:
    """A strategy (or why none fits) per candidate (tp, pp): the given degrees, or with "auto"
    every split of ``devices``."""
    out = []
    for t, p in candidate_degrees(tp, pp, devices):
        try:
            out.append((t, p, search(module, t, p, profile.per_rank(t * p), workload, memory_limit), ""))
        except FfcError as e:
            out.append((t, p, None, str(e).split(";")[0]))
    return out


def candidate_degrees(tp, pp, devices: Optional[int]) -> list[tuple[int, int]]:
    """The (tp, pp) pairs to plan: the given degrees, or with "auto" every split of ``devices``
    (checked before anything is traced: a wrong option is refused at once)."""
    if tp != "auto" and pp != "auto":
        return [(int(tp), int(pp))]
    if not devices:
        raise InvalidRequestError("--tp auto / --pp auto need --devices K")
    cands = [(t, p) for t, p in candidates(devices) if (tp == "auto" or t == tp) and (pp == "auto" or p == pp)]
    if not cands:
        raise InvalidRequestError(f"no split of {devices} devices has tp={tp} pp={pp}")
    return cands


def best(results) -> Optional[tuple]:
    """Among the candidates that fit, the highest predicted decode throughput; within 1% of it (a
    tie, as the cost model goes), the fewest devices."""
    fits = [r for r in results if r[2] is not None and r[2].predicted.fits]
    if not fits:
        return None
    top = max(r[2].predicted.decode_tok_s for r in fits)
    close = [r for r in fits if r[2].predicted.decode_tok_s >= 0.99 * top]
    return min(close, key=lambda r: (r[0] * r[1], -r[2].predicted.decode_tok_s))


def dry_run(model: str, *, tp="1", pp="1", devices: Optional[int] = None, profile: DeviceProfile,
            memory_limit: Optional[float] = None, workload: Optional[Workload] = None,
            max_seq_len: Optional[int] = None, dtype: str = "fp32", allow_pickle: bool = False,
            quant: QuantPolicy = QuantPolicy(), kv_dtype: str = "fp32", memory_budget: Optional[int] = None,
            max_batch: int = 128, prefill_tokens: int = 2048, kv_block_size: int = 16,
            log: Callable[[str], None] = lambda s: None) -> str:
    """The report ``ffc compile ... --dry-run`` prints (weights priced in the format ``quant``
    gives the linears, the KV cache in ``kv_dtype``); with ``memory_budget``, the offload policy
    a one-rank artifact would load with (for ``workload``, else FlexGen's: prompt 512, output 32)."""
    candidate_degrees(tp, pp, devices)
    module, msl, source = planning_module(model, max_seq_len, allow_pickle)
    log(f"planning {model} on {profile.name}")
    w = workload or Workload()
    weight = gguf_blocks.linear_format(quant, source.gguf) or dtype
    w = Workload(w.prompt_tokens, w.output_tokens, w.batch, msl, weight, kv_dtype)
    results = plan_candidates(module, profile, w, tp, pp, devices, memory_limit)
    limit = memory_limit if memory_limit is not None else profile.memory_bytes
    lines = [f"{model}: {sum(1 for _ in module.graphs['forward'].nodes)} ops; profile {profile.name} "
             f"({limit / 2**30:.1f} GiB per device); workload prefill {w.prompt_tokens} x batch {w.batch}, "
             f"{w.output_tokens} decode steps, KV for {w.max_seq_len} positions, weights {w.weight_dtype}",
             dry_run_table(results)]
    chosen = best(results)
    if chosen is None:
        lines.append("no candidate fits: raise --devices or --memory-per-device, or lower --max-seq-len / batch")
    else:
        lines.append(f"best: tp={chosen[0]} pp={chosen[1]}")
        lines.append("")
        lines.append(chosen[2].describe())
    if memory_budget is not None:
        pw = workload or FLEXGEN
        pw = Workload(pw.prompt_tokens, pw.output_tokens, 1, msl, weight, kv_dtype)
        # KV bytes per position: the one-rank candidate's KV (its batch at max_seq_len), searched
        # here only when the table has none
        one = next((r[2] for r in results if r[:2] == (1, 1) and r[2] is not None), None)
        kv = (one.predicted.kv_bytes / w.batch if one is not None else
              search(module, 1, 1, profile.per_rank(1), pw, None).predicted.kv_bytes)
        lines += ["", dry_run_policy(module, memory_budget, pw, profile, round(kv / msl),
                                     max_batch=max_batch, prefill_tokens=prefill_tokens,
                                     kv_block=kv_block_size)]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def candidates(devices: int) -> list[tuple[int, int]]:
    """(tp, pp) pairs using all of ``devices`` or a divisor of it."""
    return [(t, p) for t in range(1, devices + 1) for p in range(1, devices + 1) if devices % (t * p) == 0]


def dry_run_table(results: list) -> str:
    lines = [f"{'tp':>3} {'pp':>3} {'weights/rank':>13} {'KV/rank':>10} {'activ.':>9} {'total':>10} {'fits':>5} "
             f"{'prefill':>10} {'decode step':>12} {'decode tok/s':>13} {'collectives':>12}",
             "(latencies of one step; tok/s with pp batches in flight when pp > 1; KV for the workload's "
             "batch at max_seq_len)"]
    for tp, pp, st, err in results:
        if st is None:
            lines.append(f"{tp:>3} {pp:>3}  {err}")
            continue
        p = st.predicted
        lines.append(f"{tp:>3} {pp:>3} {fmt_bytes(p.weight_bytes):>13} {fmt_bytes(p.kv_bytes):>10} "
                     f"{fmt_bytes(p.activation_bytes):>9} {fmt_bytes(p.memory_bytes):>10} "
                     f"{'yes' if p.fits else 'NO':>5} "
                     f"{p.prefill_s * 1e3:8.2f}ms {p.decode_s * 1e3:10.3f}ms {p.decode_tok_s:13.0f} "
                     f"{p.collectives:>12}")
    return "\n".join(lines)

