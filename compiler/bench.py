"""``ffc bench``: ffc's compiled kernels against transformers eager, side by side in one process.

Same model, same prompts, same thread count; runs alternate between the two engines and the
median of each is reported with the ratio. Also the roofline (weight bytes a decode step must
read over this machine's measured read bandwidth) and each GEMM shape against torch.mm.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import ffc
from ffc.plan import expr as ex
from ffc.plan.kernels import Family
from ffc.plan.schema import ArgKind
from ffc.runtime.model_runner import Chunk, single_sequence_inputs

from . import sources
from .artifact import read_manifest
from .errors import FfcError


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


@dataclass
class Row:
    name: str
    unit: str
    ffc: list[float] = field(default_factory=list)
    hf: list[float] = field(default_factory=list)

    def median(self, xs):
        return statistics.median(xs) if xs else float("nan")

    @property
    def ratio(self) -> float:
        a, b = self.median(self.ffc), self.median(self.hf)
        if self.unit.endswith("/s"):
            return a / b
        return b / a  # times: smaller is better, ratio > 1 means ffc is faster


class _HF:
    """transformers eager with its own KV cache, greedy."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, ids: list[list[int]]):
        x = torch.tensor(ids)
        out = self.model(input_ids=x, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    @torch.inference_mode()
    def decode(self, nxt, pkv, steps: int):
        for _ in range(steps):
            out = self.model(input_ids=nxt[:, None], past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        return nxt


class _FFC:
    """ffc's model runner on the engine's KV pool, greedy (no scheduler: the same work as _HF)."""

    def __init__(self, llm, room: int):
        self.runner = llm.runner
        self.pool = llm.engine.pool
        self.room = room            # positions to reserve beyond the prompt
        self._held: list[list[int]] = []

    def prefill(self, ids: list[list[int]]):
        for blocks in self._held:
            self.pool.free(blocks)
        seqs = []
        for x in ids:
            blocks = self.pool.allocate(self.pool.blocks_for(len(x) + self.room))
            if blocks is None:
                raise RuntimeError("the KV pool is too small for this benchmark; raise kv_cache_memory")
            seqs.append({"tokens": list(x), "blocks": blocks})
        self._held = [s["blocks"] for s in seqs]
        logits = self.runner.forward([Chunk(s["tokens"], 0, s["blocks"]) for s in seqs], self.pool.tensor)
        for s, t in zip(seqs, logits.argmax(-1).tolist()):
            s["tokens"].append(t)
        return seqs, self.pool.tensor

    def decode(self, seqs, cache, steps: int):
        for _ in range(steps):
            chunks = [Chunk(s["tokens"][-1:], len(s["tokens"]) - 1, s["blocks"]) for s in seqs]
            for s, t in zip(seqs, self.runner.forward(chunks, cache).argmax(-1).tolist()):
                s["tokens"].append(t)


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(artifact: str, *, compare: str = "transformers", runs: int = 5, new_tokens: int = 128,
              batches=(1, 8, 32), prefill_lens=(128, 512), threads: int | None = None,
              log=lambda s: None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    manifest = read_manifest(artifact, check_hashes=False)
    r0 = _rss_mb()[0]
    llm = ffc.load(artifact)
    if llm.compiled is None:
        raise FfcError(f"{artifact} has no generated kernels; compile it without --no-codegen")
    eng = _FFC(llm, room=new_tokens + 8)
    vocab = int(manifest["model"]["config"].get("vocab_size", 1000))
    g = torch.Generator().manual_seed(0)

    def prompt(n, b):
        return torch.randint(100, min(vocab, 30000), (b, n), generator=g).tolist()
    # resident memory of each engine after loading and one short generation (weights paged in)
    eng.decode(*eng.prefill(prompt(16, 1)), 2)
    r1 = _rss_mb()[0]
    hf = None
    if compare == "transformers":
        src = sources.resolve(manifest["model"]["source"])
        model = sources.load_model(src, False).eval()
        hf = _HF(model)
        hf.decode(*hf.prefill(prompt(16, 1)), 2)
    r2 = _rss_mb()[0]

    # warm-up of both engines (page-in, BLAS/thread start-up, the memory the GGUF load freed)
    for _ in range(2):
        eng.decode(*eng.prefill(prompt(max(prefill_lens), 1)), 4)
        if hf:
            hf.decode(*hf.prefill(prompt(max(prefill_lens), 1)), 4)
    rows: list[Row] = []
    for n in prefill_lens:
        row = Row(f"prefill {n} tokens", "tok/s")
        ids = prompt(n, 1)
        eng.prefill(ids)
        if hf:
            hf.prefill(ids)
        for _ in range(runs):
            row.ffc.append(n / _timed(lambda: eng.prefill(ids)))
            if hf:
                row.hf.append(n / _timed(lambda: hf.prefill(ids)))
        rows.append(row)
        log(f"{row.name}: ffc {row.median(row.ffc):.0f} tok/s, hf {row.median(row.hf):.0f}")
    ttft = Row("time to first token (128-token prompt)", "ms")
    ids = prompt(128, 1)
    for _ in range(runs):
        ttft.ffc.append(1e3 * _timed(lambda: eng.prefill(ids)))
        if hf:
            ttft.hf.append(1e3 * _timed(lambda: hf.prefill(ids)))
    rows.append(ttft)
    steps = new_tokens - 1
    for b in batches:
        row = Row(f"decode batch {b} ({new_tokens} new tokens)", "tok/s")
        ids = prompt(16, b)
        for k in range(runs):
            seqs, cache = eng.prefill(ids)
            row.ffc.append(b * steps / _timed(lambda: eng.decode(seqs, cache, steps)))
            if hf:
                nxt, pkv = hf.prefill(ids)
                row.hf.append(b * steps / _timed(lambda: hf.decode(nxt, pkv, steps)))
        rows.append(row)
        log(f"{row.name}: ffc {row.median(row.ffc):.1f} tok/s, hf {row.median(row.hf):.1f}")
    # roofline: bytes of weights a decode step reads, over measured read bandwidth
    plan = llm.compiled.plan
    wbytes = 0
    seen = set()
    for st in plan.graphs["decode"].steps:
        if st.kernel is None or plan.kernels[st.kernel].family is not Family.LINEAR:
            continue
        for a in st.args:
            if a.kind in (ArgKind.PARAM, ArgKind.PACKED) and a.name not in seen:
                seen.add(a.name)
                w = llm.compiled.arg_tensor(a)
                wbytes += w.numel() * w.element_size()
    bw = llm.compiled.lib.read_bandwidth(1 << 30, 7, llm.compiled.exe.threads)
    roof = bw / wbytes
    dec1 = next((statistics.median(r.ffc) for r in rows if r.name.startswith("decode batch 1 ")), float("nan"))
    gemm = gemm_vs_torch(llm, runs=runs)
    return {"rows": rows, "threads": threads, "weights_bytes_per_step": wbytes, "bandwidth": bw,
            "roofline_tok_s": roof, "roofline_fraction": dec1 / roof, "rss_ffc_mb": r1 - r0,
            "rss_hf_mb": r2 - r1, "peak_rss_mb": _rss_mb()[1], "gemm": gemm,
            "dtype": manifest["options"].get("dtype", "f32"), "isa": manifest["kernels"].get("isa")}


def gemm_vs_torch(llm, m: int = 512, runs: int = 5) -> list[dict]:
    """Each linear kernel of the prefill graph at M=m rows against torch.mm on the same shape."""
    plan = llm.compiled.plan
    gp = plan.graphs["prefill"]
    T = min(m, gp.max_tokens)
    inputs = single_sequence_inputs(llm.runner.graphs["prefill"], torch.randint(0, 1000, (1, T)))
    profs = [llm.compiled.profile("prefill", inputs) for _ in range(runs)]
    out, seen = [], set()
    for k, st in enumerate(gp.steps):
        kernel = plan.kernels.get(st.kernel)
        if kernel is None or kernel.family is not Family.LINEAR or kernel.spec.M != ex.var("T") or st.kernel in seen:
            continue
        seen.add(st.kernel)
        spec = kernel.spec
        t_ffc = statistics.median(p[k] for p in profs)
        K = spec.K
        rows_w = spec.N * (2 if spec.glu else 1)
        x, w = torch.randn(T, K), torch.randn(rows_w, K)
        torch.mm(x, w.t())
        ts = []
        for _ in range(runs):
            ts.append(_timed(lambda: torch.mm(x, w.t())))
        t_torch = statistics.median(ts)
        out.append({"kernel": st.kernel, "shape": f"{T}x{K} @ {K}x{rows_w}", "ffc_ms": t_ffc * 1e3,
                    "torch_ms": t_torch * 1e3, "gflops": 2 * T * K * rows_w / t_ffc / 1e9,
                    "vs_torch": t_torch / t_ffc})
    return out


def format_bench(res: dict) -> str:
    lines = [f"ffc vs transformers eager, {res['threads']} threads, weights {res['dtype']}, ISA {res['isa']} "
             "(median of runs; ratio > 1: ffc faster)",
             f"{'measure':44s} {'ffc':>10} {'transformers':>13} {'ratio':>7}"]
    for r in res["rows"]:
        lines.append(f"{r.name + ' [' + r.unit + ']':44s} {r.median(r.ffc):10.1f} {r.median(r.hf):13.1f} "
                     f"{r.ratio:7.2f}")
    lines.append(f"{'resident memory, load + a short run [MiB]':44s} {res['rss_ffc_mb']:10.0f} "
                 f"{res['rss_hf_mb']:13.0f}")
    lines.append(f"peak RSS of this process (both engines; transformers dequantizes the GGUF on load): "
                 f"{res['peak_rss_mb']:.0f} MiB")
    lines.append(f"roofline: {res['weights_bytes_per_step'] / 1e6:.0f} MB of weights per decode step / "
                 f"{res['bandwidth'] / 1e9:.1f} GB/s measured read bandwidth = {res['roofline_tok_s']:.1f} tok/s; "
                 f"decode batch 1 reaches {100 * res['roofline_fraction']:.0f}%")
    if res["gemm"]:
        lines.append("GEMMs at prefill (M rows) against torch.mm on the same shapes:")
        for gm in res["gemm"]:
            lines.append(f"  {gm['kernel']:12s} {gm['shape']:22s} ffc {gm['ffc_ms']:7.2f} ms "
                         f"({gm['gflops']:5.0f} GFLOP/s)  torch.mm {gm['torch_ms']:7.2f} ms  "
                         f"ffc/torch speed {gm['vs_torch']:.2f}")
    return "\n".join(lines)
