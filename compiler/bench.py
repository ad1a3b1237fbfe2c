"""``ffc bench``: ffc's compiled kernels against a baseline, side by side in one process.

The baseline is transformers eager (the same model), or another artifact (``--compare
other.ffc``: e.g. fp32 against a quantized one). Same prompts, same thread count; runs
alternate between the two engines and the median of each is reported with the ratio. For
each artifact also the roofline: the weight bytes a decode step reads over this machine's
measured read bandwidth. And each GEMM shape against torch.mm. Prompt and output lengths
are capped by the artifacts' max_seq_len.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
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
from .progress import Reporter


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
    base: list[float] = field(default_factory=list)     # the baseline's (transformers or another artifact)

    def median(self, xs):
        return statistics.median(xs) if xs else float("nan")

    @property
    def ratio(self) -> float:
        a, b = self.median(self.ffc), self.median(self.base)
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
            room = min(len(x) + self.room, self.runner.blocks_per_seq * self.runner.block_size)
            blocks = self.pool.allocate(self.pool.blocks_for(room))
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


def decode_weight_bytes(llm) -> int:
    """Bytes of the weights one decode step reads: every linear's (packed) weights, once."""
    plan = llm.compiled.plan
    seen, total = set(), 0
    for st in plan.graphs["decode"].steps:
        if st.kernel is None or plan.kernels[st.kernel].family is not Family.LINEAR:
            continue
        for a in st.args:
            if a.kind in (ArgKind.PARAM, ArgKind.PACKED) and a.name not in seen:
                seen.add(a.name)
                w = llm.compiled.arg_tensor(a)
                total += w.numel() * w.element_size()
    return total


def _weights_label(manifest: dict) -> str:
    """What an artifact stores its weights as: its --quant mode, else its --dtype."""
    quant = (manifest["options"].get("quant") or {}).get("mode", "none")
    return quant if quant != "none" else manifest["options"].get("dtype", "f32")


def _open(artifact: str, room: int):
    llm = ffc.load(artifact)
    if llm.compiled is None:
        raise FfcError(f"{artifact} has no generated kernels; compile it without --no-codegen")
    return llm, _FFC(llm, room=room)


def run_bench(artifact: str, *, compare: str = "transformers", runs: int = 5, new_tokens: int = 128,
              batches=(1, 8, 32), prefill_lens=(128, 512), threads: int | None = None,
              log=lambda s: None) -> dict:
    """``compare``: "transformers", "none", or another artifact's path."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    manifest = read_manifest(artifact, check_hashes=False)
    other = None
    if compare not in ("transformers", "none"):
        if not Path(compare).is_dir():
            raise FfcError(f"--compare {compare!r} is neither transformers, none, nor an artifact directory")
        other = read_manifest(compare, check_hashes=False)
    r0 = _rss_mb()[0]
    llm, eng = _open(artifact, new_tokens + 8)
    limit = llm.max_seq_len
    vocab = int(manifest["model"]["config"].get("vocab_size", 1000))
    g = torch.Generator().manual_seed(0)

    def prompt(n, b):
        return torch.randint(100, min(vocab, 30000), (b, n), generator=g).tolist()
    # resident memory of each engine after loading and one short generation (weights paged in)
    eng.decode(*eng.prefill(prompt(16, 1)), 2)
    r1 = _rss_mb()[0]
    base, base_llm = None, None
    if compare == "transformers":
        src = sources.resolve(manifest["model"]["source"])
        base = _HF(sources.load_model(src, False).eval())
    elif other is not None:
        base_llm, base = _open(compare, new_tokens + 8)
        limit = min(limit, base_llm.max_seq_len)
    if base is not None:
        base.decode(*base.prefill(prompt(16, 1)), 2)
    r2 = _rss_mb()[0]
    new_tokens = max(2, min(new_tokens, limit - 17))          # decode prompts are 16 tokens
    prefill_lens = sorted({min(n, limit - 8) for n in prefill_lens})     # room for 4 warm-up decode steps

    # warm-up of both engines (page-in, BLAS/thread start-up, the memory the GGUF load freed)
    for _ in range(2):
        for e in filter(None, (eng, base)):
            e.decode(*e.prefill(prompt(max(prefill_lens), 1)), 4)
    rows: list[Row] = []
    report = Reporter.of(log)
    for n in prefill_lens:
        row = Row(f"prefill {n} tokens", "tok/s")
        ids = prompt(n, 1)
        with report.phase(row.name, total=runs):
            for e in filter(None, (eng, base)):
                e.prefill(ids)
            for _ in range(runs):
                row.ffc.append(n / _timed(lambda: eng.prefill(ids)))
                if base:
                    row.base.append(n / _timed(lambda: base.prefill(ids)))
                report.advance()
            report.note(f"ffc {row.median(row.ffc):.0f} tok/s, baseline {row.median(row.base):.0f}")
        rows.append(row)
    n = min(128, limit - 1)
    ttft = Row(f"time to first token ({n}-token prompt)", "ms")
    ids = prompt(n, 1)
    for _ in range(runs):
        ttft.ffc.append(1e3 * _timed(lambda: eng.prefill(ids)))
        if base:
            ttft.base.append(1e3 * _timed(lambda: base.prefill(ids)))
    rows.append(ttft)
    steps = new_tokens - 1
    for b in batches:
        row = Row(f"decode batch {b} ({new_tokens} new tokens)", "tok/s")
        ids = prompt(16, b)
        with report.phase(row.name, total=runs):
            for k in range(runs):
                seqs, cache = eng.prefill(ids)
                row.ffc.append(b * steps / _timed(lambda: eng.decode(seqs, cache, steps)))
                if base:
                    bs, bc = base.prefill(ids)
                    row.base.append(b * steps / _timed(lambda: base.decode(bs, bc, steps)))
                report.advance()
            report.note(f"ffc {row.median(row.ffc):.1f} tok/s, baseline {row.median(row.base):.1f}")
        rows.append(row)
    # roofline: bytes of weights a decode step reads, over measured read bandwidth
    bw = llm.compiled.lib.read_bandwidth(1 << 30, 7, llm.compiled.exe.threads)

    def roofline(x, row_of) -> dict:
        wbytes = decode_weight_bytes(x)
        dec1 = next((statistics.median(row_of(r)) for r in rows if r.name.startswith("decode batch 1 ")),
                    float("nan"))
        return {"weights_bytes_per_step": wbytes, "roofline_tok_s": bw / wbytes, "roofline_fraction": dec1 * wbytes / bw}
    res = {"rows": rows, "threads": threads, "bandwidth": bw, **roofline(llm, lambda r: r.ffc),
           "rss_ffc_mb": r1 - r0, "rss_base_mb": r2 - r1, "peak_rss_mb": _rss_mb()[1],
           "gemm": gemm_vs_torch(llm, runs=runs), "weights": _weights_label(manifest),
           "isa": manifest["kernels"].get("isa"),
           "baseline": {"transformers": "transformers", "none": "none"}.get(compare, "")}
    if other is not None:
        res["baseline"] = f"{compare} ({_weights_label(other)})"
        res["base_roofline"] = roofline(base_llm, lambda r: r.base)
    return res


def gemm_vs_torch(llm, m: int = 512, runs: int = 5) -> list[dict]:
    """Each linear kernel of the prefill graph at M=m rows against torch.mm on the same shape."""
    plan = llm.compiled.plan
    gp = plan.graphs["prefill"]
    T = min(m, gp.max_tokens, llm.max_seq_len)
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
    base = res["baseline"]
    lines = [f"ffc ({res['weights']}) vs {base}, {res['threads']} threads, ISA {res['isa']} "
             "(median of runs; ratio > 1: ffc faster)",
             f"{'measure':44s} {'ffc':>10} {'baseline':>13} {'ratio':>7}"]
    for r in res["rows"]:
        lines.append(f"{r.name + ' [' + r.unit + ']':44s} {r.median(r.ffc):10.1f} {r.median(r.base):13.1f} "
                     f"{r.ratio:7.2f}")
    lines.append(f"{'resident memory, load + a short run [MiB]':44s} {res['rss_ffc_mb']:10.0f} "
                 f"{res['rss_base_mb']:13.0f}")
    lines.append(f"peak RSS of this process (both engines; transformers dequantizes a GGUF on load): "
                 f"{res['peak_rss_mb']:.0f} MiB")
    for who, roof in (("ffc", res), ("baseline", res.get("base_roofline"))):
        if roof:
            lines.append(f"roofline ({who}): {roof['weights_bytes_per_step'] / 1e6:.1f} MB of weights per decode step / "
                         f"{res['bandwidth'] / 1e9:.1f} GB/s measured read bandwidth = {roof['roofline_tok_s']:.1f} "
                         f"tok/s; decode batch 1 reaches {100 * roof['roofline_fraction']:.0f}%")
    if res["gemm"]:
        lines.append("GEMMs at prefill (M rows) against torch.mm (fp32) on the same shapes:")
        for gm in res["gemm"]:
            lines.append(f"  {gm['kernel']:12s} {gm['shape']:22s} ffc {gm['ffc_ms']:7.2f} ms "
                         f"({gm['gflops']:5.0f} GFLOP/s)  torch.mm {gm['torch_ms']:7.2f} ms  "
                         f"ffc/torch speed {gm['vs_torch']:.2f}")
    return "\n".join(lines)
