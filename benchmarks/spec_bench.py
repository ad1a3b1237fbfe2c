"""Speculative decoding against plain decoding on one artifact, side by side in one run: free
chat, rewriting a passage, editing code; batch 1 and 8; prompt lookup, the self-draft and any
draft artifacts. Prints tok/s (medians over rounds), the speed-up over plain, draft tokens
accepted per verify step, the acceptance rate, and whether greedy tokens equal plain's.

    ffc compile smollm2-135m -o smol.ffc --max-seq-len 1024 --self-draft
    python benchmarks/spec_bench.py smol.ffc --drafts ngram self --batch 1 8 --rounds 3
"""
import argparse
import json
import sys

import torch

import ffc
from ffc.spec_bench import format_spec_bench, run_spec_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--drafts", nargs="+", default=["ngram", "self"], help="ngram, self, or draft artifact paths")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workloads", nargs="+", default=None, choices=["chat", "rewrite", "edit"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = ffc.load(a.artifact)
    rows = run_spec_bench(llm, a.drafts, batches=a.batch, rounds=a.rounds, new_tokens=a.new_tokens,
                          names=a.workloads, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_spec_bench(rows, torch.get_num_threads()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
