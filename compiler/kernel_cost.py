"""The work of a compiled plan's kernels (FLOPs, bytes outside the kernel) and their measured
times: what ``ffc calibrate --artifact`` fits the per-family cost coefficients on, and what
benchmarks/cost_model.py checks the predictions against (on other shapes).
"""
from __future__ import annotations

import statistics
from typing import Optional

import numpy as np
import torch
from scipy.optimize import nnls

from ffc.ir.attention import KV_SCALE_BYTES, kv_quantize
from ffc.ir.ops import Op, attention_work, node_cost
from ffc.ir.text import node_names
from ffc.ir.types import DType, eval_dim
from ffc.plan.kernels import CostFamily, Family, cost_family
from ffc.plan.schema import ArgKind
from ffc.runtime.model_runner import Chunk


def noise_cache(cache_type, blocks: int) -> torch.Tensor:
    """A KV pool of ``blocks`` blocks holding small noise, in the cache's storage type."""
    shape = cache_type.concrete({"S": blocks})
    if cache_type.dtype is DType.I8:     # rows of D values and their scale
        return kv_quantize(torch.randn(*shape[:-1], shape[-1] - KV_SCALE_BYTES) * 0.1)
    return (torch.randn(shape) * 0.1).to(cache_type.torch_dtype)


def step_inputs(llm, graph: str, batch: int, context: int) -> dict:
    """Inputs of one step: ``decode``: ``batch`` sequences at position ``context``; ``prefill``:
    ``batch`` sequences of ``context`` new tokens each, from position 0. Caches hold noise."""
    runner = llm.runner
    per = -(-(context + 1) // runner.block_size)
    cache = noise_cache(llm.cache_type, batch * per)
    tokens = torch.randint(100, 1000, (batch, context)).tolist()
    chunks = [Chunk(t[-1:], context, range(b * per, (b + 1) * per)) if graph == "decode" else
              Chunk(t, 0, range(b * per, (b + 1) * per)) for b, t in enumerate(tokens)]
    return (runner.decode_inputs if graph == "decode" else runner.prefill_inputs)(chunks, cache)


# kernel families that read only part of their weights (their ops' cost rules count what)
PARTIAL_READS = {CostFamily.GATHER, CostFamily.MOE}


def kernel_work(llm, graph: str, inputs: dict) -> list[tuple[str, str, float, float]]:
    """(family, label, FLOPs, bytes) per kernel launch (or collective) of ``graph`` for these inputs. Bytes are
    what a kernel reads and writes outside itself: its weights, arena buffers, and for
    attention the KV cache up to each token's position; gathers read only the rows they take,
    mixtures of experts the experts their tokens choose (PARTIAL_READS: their ops' cost rules)."""
    plan = llm.compiled.plan
    gp = plan.graphs[graph]
    g = llm.runner.graphs[graph]
    by_name = {f"%{v}": n for n, v in node_names(g).items()}
    T = inputs["input_ids"].shape[1]
    env = {"T": T, "B": T, "N": inputs["block_tables"].shape[0], "S": inputs["kv_cache"].shape[2]}
    ctx = float((inputs["position_ids"][0] + 1).sum())     # keys read, summed over tokens
    out = []

    def buffer_bytes(a) -> float:
        b = gp.buffers[a.name]
        return torch.Size([int(x.evaluate(env)) for x in b.shape]).numel() * b.dtype.itemsize

    for st in gp.steps:
        if st.kernel is None:   # a collective between kernel segments: its op and the bytes it moves
            out.append((CostFamily.COLLECTIVE, st.collective.op.value, 0.0, buffer_bytes(st.args[-1])))
            continue
        kernel = plan.kernels[st.kernel]
        rows = int(kernel.spec.M.evaluate(env)) if kernel.family is Family.LINEAR else 1
        wformat = getattr(kernel.spec, "wformat", "")
        family = cost_family(kernel.family, rows, decode=graph.startswith("decode"),
                             weight=DType(wformat) if wformat else None)
        flops, nbytes, seen = 0.0, 0.0, set()
        for name in st.nodes:
            n = by_name.get(name)
            if n is None:
                continue
            if n.op is Op.CACHED_ATTENTION:
                q, k, cache = n.inputs[0], n.inputs[1], n.inputs[6]
                est = attention_work(q.type.shape[1], k.type.shape[1], q.type.shape[3], ctx, cache.type.dtype)
                flops += est.flops
                nbytes += est.bytes
                continue
            ins = []
            for v in n.inputs:
                if getattr(v, "type", None) is not None:
                    ins.append(([eval_dim(x, env) for x in v.type.shape], v.type.torch_dtype))
                elif getattr(v, "name", None) in llm.module.params:
                    t = llm.module.params[v.name].type
                    ins.append((list(t.shape), t.torch_dtype))
            est = node_cost(n.op, n.attrs, ins, ([eval_dim(x, env) for x in n.type.shape], n.type.torch_dtype))
            flops += est.flops
            if family in PARTIAL_READS:
                nbytes += est.bytes
        if family not in PARTIAL_READS:
            for a in st.args:
                key = (a.kind, a.name)
                if key in seen or a.kind is ArgKind.CACHE:
                    continue
                seen.add(key)
                if a.kind in (ArgKind.PARAM, ArgKind.PACKED):
                    w = llm.compiled.arg_tensor(a)
                    nbytes += w.numel() * w.element_size()
                else:
                    nbytes += buffer_bytes(a)
        label = st.origin.split(".")[-1] or st.origin
        out.append((family, label, flops, nbytes))
    return out


def measure(llm, graph: str, inputs: dict, runs: int = 7) -> list[float]:
    """Median seconds of each kernel launch (timed between the executor's barriers)."""
    profs = [llm.compiled.profile(graph, inputs) for _ in range(runs)]
    return [statistics.median(p[k] for p in profs) for k in range(len(profs[0]))]


def fit_families(samples: list[tuple[str, float, float, float]]) -> dict:
    """Per family, non-negative (a, c, m) of t = a + c * FLOPs + m * bytes by least squares on
    relative error: a kernel's fixed cost, seconds per FLOP and per byte as this machine's
    generated kernels achieve them."""
    out = {}
    for fam in sorted({s[0] for s in samples} - {CostFamily.COLLECTIVE}):   # collectives: the link model
        rows = [(f, b, t) for f_, f, b, t in samples if f_ == fam and t > 0]
        A = np.array([[1.0, f, b] for f, b, _ in rows]) / np.array([[t] for _, _, t in rows])
        scale = np.maximum(A.max(axis=0), 1e-30)
        coef, _ = nnls(A / scale, np.ones(len(rows)))
        out[fam] = tuple(float(x) for x in coef / scale)
    return out


def calibration_samples(llm, runs: int = 5, shapes: Optional[list] = None) -> list:
    """(family, FLOPs, bytes, seconds) of every kernel at a few decode and prefill shapes."""
    shapes = shapes or [("decode", 1, 32), ("decode", 2, 128), ("decode", 4, 64), ("decode", 6, 32),
                        ("decode", 16, 32), ("decode", 2, 512), ("prefill", 1, 16), ("prefill", 1, 96),
                        ("prefill", 2, 48)]
    out = []
    for graph, batch, context in shapes:
        context = min(context, llm.max_seq_len - 1)       # within the artifact's KV cache
        inputs = step_inputs(llm, graph, batch, context)
        for (fam, _, f, b), t in zip(kernel_work(llm, graph, inputs), measure(llm, graph, inputs, runs)):
            out.append((fam, f, b, t))
    return out
