"""Decode speed of two artifacts of one model (e.g. fp32 and bf16 weights), alternating runs
in one process; prints tokens/s medians and the ratio.

    python benchmarks/dtype_speed.py smol.ffc smol-bf16.ffc --batch 1 --runs 7 --threads 2
"""
import argparse
import statistics
import time

import torch

import ffc
from ffc.bench import _FFC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    llms = [ffc.load(p) for p in (a.base, a.other)]
    engines = [_FFC(llm, room=a.new_tokens + 8) for llm in llms]
    ids = torch.randint(100, 30000, (a.batch, 16), generator=torch.Generator().manual_seed(0)).tolist()
    rates = [[], []]
    steps = a.new_tokens - 1
    for _ in range(a.runs):
        for k, eng in enumerate(engines):
            seqs, cache = eng.prefill(ids)
            t0 = time.perf_counter()
            eng.decode(seqs, cache, steps)
            rates[k].append(a.batch * steps / (time.perf_counter() - t0))
    m = [statistics.median(r) for r in rates]
    for path, llm, r in zip((a.base, a.other), llms, m):
        print(f"{path}: weights {llm.manifest['options']['dtype']}, decode batch {a.batch}: {r:.1f} tok/s")
    print(f"ratio {a.other} / {a.base}: {m[1] / m[0]:.2f} (median of {a.runs} runs each, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
