"""Quantized ffc against llama.cpp on the same GGUF files, side by side in one run.

For each GGUF file (the default model's shipped Q4_1 file, and Q4_0 / Q8_0 files that
llama.cpp's own quantizer writes from an F32 copy of it) the script compiles ffc with
``--quant gguf`` (the file's blocks as they are) and measures, alternating the two engines
in this process with the same thread count:

  decode batch 1   a 64-token prompt, then 128 greedy tokens (EOS ignored), the whole call
                   timed minus the prompt's prefill: tok/s of the 128 tokens
  prefill 512      one 512-token prompt: tok/s

and reports medians and the ratio ffc / llama.cpp. Then accuracy, on the same token windows
for both engines (llama.cpp's perplexity method: windows of --ctx tokens from an empty cache,
the second half of each scored): perplexity of ffc and of llama.cpp per file, ffc's KL
divergence and top-1 agreement against the fp32 artifact for every format, and the int8 KV
cache against the fp32 one. Also decode batch 8 and 32 per format, weight bytes per decode
step and the resident memory after load.

    python benchmarks/quant_bench.py [--threads 2] [--runs 5] [--ppl-windows 40] [--work DIR]

llama.cpp comes from llama-cpp-python, built from its sdist
(CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python); without it only ffc's figures
are printed. The text scored is Python's own documentation (pydoc_data.topics), so the run
needs nothing but what is installed.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ffc
from ffc import sources
from ffc.bench import _FFC, decode_weight_bytes
from ffc.evaluate import evaluate, text_tokens, windows

try:
    import llama_cpp
except ImportError:        # not a test dependency
    llama_cpp = None


def corpus() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def gguf_float_copy(src: Path, dst: Path) -> Path:
    """``src`` with every tensor dequantized to F32 (gguf's GGUFWriter): the input of llama.cpp's
    quantizer, as a user would convert a model."""
    import gguf
    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(src))
    f = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(str(dst) + ".tmp", bytes(f.parts[f.data[0]]).decode())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        value = 0 if name == "general.file_type" else field.contents()      # 0: all F32
        writer.add_key_value(name, value, vtype, field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(dst) + ".tmp").rename(dst)
    return dst


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> Path:
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src}")
    return dst


class LlamaCpp:
    """llama.cpp through llama-cpp-python: greedy decoding by argmax of the logits (EOS ignored)."""

    def __init__(self, path: Path, threads: int, ctx: int = 1024, logits_all: bool = False):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=logits_all, verbose=False)

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def decode(self, first: int, steps: int) -> None:
        tok = first
        for _ in range(steps):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def window_logits(self, w: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(w)
        return torch.from_numpy(np.array(self.llm.scores[:len(w)], dtype=np.float64))


def ffc_engine(llm, room: int):
    eng = _FFC(llm, room=room)

    class E:
        def prefill(self, ids):
            self.seqs, self.cache = eng.prefill([ids])
            return self.seqs[0]["tokens"][-1]

        def decode(self, first, steps):
            eng.decode(self.seqs, self.cache, steps)
    return E()


_RSS_PROBE = """
import sys, torch
import ffc
from ffc.bench import _rss_mb
r0 = _rss_mb()[0]
llm = ffc.load(sys.argv[1], kv_cache_memory="64MiB")
llm.generate(["Hello"], max_new_tokens=4)
print(_rss_mb()[0] - r0)
"""


def rss_after_load(art: Path) -> float:
    """MiB a fresh process grows by loading the artifact and generating a few tokens (weights
    packed for the kernels, kernel library, a 64 MiB KV pool), past Python + torch + ffc."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(art)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(engines: dict, runs: int, vocab: int) -> dict:
    """Median decode (64-token prompt + 128 tokens) and prefill-512 tok/s of each engine, alternating."""
    g = torch.Generator().manual_seed(0)
    p64 = torch.randint(100, min(vocab, 30000), (64,), generator=g).tolist()
    p512 = torch.randint(100, min(vocab, 30000), (512,), generator=g).tolist()
    out = {name: {"decode": [], "prefill": []} for name in engines}
    for e in engines.values():          # warm-up
        e.decode(e.prefill(p64), 8)
        e.prefill(p512)
    for _ in range(runs):
        for name, e in engines.items():
            first = e.prefill(p64)
            out[name]["decode"].append(128 / timed(lambda: e.decode(first, 128)))
            out[name]["prefill"].append(512 / timed(lambda: e.prefill(p512)))
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}


def llama_perplexity(lc: LlamaCpp, ws: list[list[int]], ctx: int) -> float:
    first, nll, n = ctx // 2, 0.0, 0
    for w in ws:
        lp = torch.log_softmax(lc.window_logits(w)[first:ctx - 1], -1)
        nll -= float(lp.gather(1, torch.tensor(w[first + 1:])[:, None]).sum())
        n += ctx - first - 1
    return float(np.exp(nll / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window")
    ap.add_argument("--ppl-windows", type=int, default=40, help="windows scored (40 x 512 = 20,480 tokens)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "ffc" / "quant_bench"),
                    help="where the GGUF copies and the artifacts go (reused by later runs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shipped = sources.alias_file("smollm2-135m")
    files = {"Q4_1 (shipped)": shipped}
    if llama_cpp is None:
        print("llama-cpp-python is not installed: ffc's figures only (build it with "
              "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)", file=sys.stderr)
    else:
        f32 = gguf_float_copy(shipped, work / "smollm2-f32.gguf")
        files["Q4_0 (llama.cpp)"] = llama_quantize(f32, work / "smollm2-q4_0.gguf", 2, a.threads)
        files["Q8_0 (llama.cpp)"] = llama_quantize(f32, work / "smollm2-q8_0.gguf", 7, a.threads)

    def artifact(name: str, model: str, **kw) -> Path:
        out = work / f"{name}.ffc"
        if not (out / "manifest.json").exists():
            print(f"[bench] compiling {out.name}", file=sys.stderr)
            ffc.compile(model, str(out), max_seq_len=1024, **kw)
        return out
    arts = {label: artifact(Path(path).stem.replace(".", "_"), str(path), quant="gguf") for label, path in files.items()}
    arts["fp32"] = artifact("smollm2-fp32", "smollm2-135m")
    kv8 = artifact("smollm2-q4_1-kv8", str(shipped), quant="gguf", kv_dtype="int8")

    text = corpus()
    print(f"ffc {ffc.__version__}, {a.threads} threads; llama.cpp "
          f"{'llama-cpp-python ' + llama_cpp.__version__ if llama_cpp else 'not installed'}\n")
    print(f"{'file':20s} {'engine':10s} {'decode b1':>10} {'prefill 512':>12} {'b8':>8} {'b32':>8} "
          f"{'MB/step':>8} {'RSS MiB':>8}")
    print("(tok/s, medians; MB/step: weight bytes a decode step reads; RSS: a fresh process after load + 4 tokens)")
    base = ffc.load(arts["fp32"], kv_cache_memory="512MiB")
    acc = {}
    for label, art in arts.items():
        rss = rss_after_load(art)
        llm = ffc.load(art, kv_cache_memory="512MiB")
        e = ffc_engine(llm, 200)
        engines = {"ffc": e}
        if llama_cpp is not None and label in files:
            engines["llama.cpp"] = LlamaCpp(Path(files[label]), a.threads)
        vocab = llm.runner.vocab_size
        sp = speed(engines, a.runs, vocab)
        # larger decode batches (ffc only; llama-cpp-python decodes one sequence)
        fe = _FFC(llm, room=140)
        g = torch.Generator().manual_seed(1)
        for b in (8, 32):
            ids = torch.randint(100, 30000, (b, 16), generator=g).tolist()
            ts = []
            for _ in range(max(1, a.runs // 2)):
                seqs, cache = fe.prefill(ids)
                ts.append(b * 127 / timed(lambda: fe.decode(seqs, cache, 127)))
            sp["ffc"][f"b{b}"] = statistics.median(ts)
        mb = decode_weight_bytes(llm) / 1e6
        for eng, r in sp.items():
            extra = f"{r['b8']:8.0f} {r['b32']:8.0f} {mb:8.1f} {rss:8.0f}" if eng == "ffc" else ""
            print(f"{label:20s} {eng:10s} {r['decode']:10.1f} {r['prefill']:12.0f} {extra}")
        if "llama.cpp" in sp:
            print(f"{'':20s} {'ratio':10s} {sp['ffc']['decode'] / sp['llama.cpp']['decode']:10.2f} "
                  f"{sp['ffc']['prefill'] / sp['llama.cpp']['prefill']:12.2f}")
        res = evaluate(llm, text, ctx=a.ctx, base=None if art == arts["fp32"] else base, max_windows=a.ppl_windows)
        acc[label] = res
        ppl_line = f"{'':20s} perplexity ffc {res.perplexity:.4f} +/- {res.perplexity_error:.4f}"
        if llama_cpp is not None and label in files:
            del engines
            gc.collect()
            lc = LlamaCpp(Path(files[label]), a.threads, ctx=a.ctx, logits_all=True)
            tokens = text_tokens(llm, text)
            ws = windows(tokens, a.ctx, None, a.ppl_windows)
            lp = llama_perplexity(lc, ws, a.ctx)
            ppl_line += f", llama.cpp {lp:.4f} (ffc/llama.cpp {res.perplexity / lp:.4f})"
            del lc
        if res.kl:
            ppl_line += (f"; vs fp32: KL {statistics.mean(res.kl):.5f}, top-1 {100 * res.top1 / len(res.kl):.2f}%")
        print(ppl_line)
        llm.close()
        del llm, e, fe
        gc.collect()
    llm = ffc.load(kv8, kv_cache_memory="512MiB")
    res = evaluate(llm, text, ctx=a.ctx, base=base, max_windows=a.ppl_windows)
    q = acc["Q4_1 (shipped)"]
    print(f"\nint8 KV cache (Q4_1 weights): perplexity {res.perplexity:.4f} vs {q.perplexity:.4f} with fp32 KV "
          f"({100 * (res.perplexity / q.perplexity - 1):+.2f}%); KL vs fp32 {statistics.mean(res.kl):.5f}")
    print(f"({acc['fp32'].scored} tokens scored in {acc['fp32'].windows} windows of {a.ctx}; the fp32 artifact's "
          f"perplexity {acc['fp32'].perplexity:.4f})")


if __name__ == "__main__":
    main()
