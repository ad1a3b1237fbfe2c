"""Batch-1 greedy decode speed: ffc (interpreter path) and transformers eager, same
prompt, same threads, in one process. Prints medians over --runs and the ratio.

    python benchmarks/generate_speed.py smol.ffc --new-tokens 64 --runs 5
"""
import argparse
import statistics
import time

import torch

import ffc
from ffc import sources


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompt", default="The history of the Roman Empire")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    llm = ffc.load(a.artifact)
    hf = sources.load_model(sources.resolve(llm.manifest["model"]["source"]))
    ids = llm.encode(a.prompt)
    n = a.new_tokens
    ffc_t, hf_t = [], []
    for _ in range(a.runs):
        t = time.perf_counter()
        out = llm.generate([ids], max_new_tokens=n, ignore_eos=True)
        ffc_t.append(len(out.token_ids[0]) / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        hf_t.append(n / (time.perf_counter() - t))
    f, h = statistics.median(ffc_t), statistics.median(hf_t)
    print(f"threads={torch.get_num_threads()} prompt_tokens={len(ids)} new_tokens={n} runs={a.runs}")
    print(f"{'engine':14s} {'tokens/s (median)':>18s}")
    print(f"{'ffc':14s} {f:18.1f}")
    print(f"{'transformers':14s} {h:18.1f}")
    print(f"ratio ffc/transformers: {f / h:.2f}")


if __name__ == "__main__":
    main()
