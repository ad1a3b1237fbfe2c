"""Greedy decode speed of a tensor-parallel artifact against a one-process artifact of the same
model, in one process, runs alternating (this machine is shared and noisy: compare ratios).

    python benchmarks/tp_speed.py smol.ffc smol-tp2.ffc --batch 1 32 --new-tokens 64 --runs 5
"""
import argparse
import statistics
import time

import ffc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("one", help="artifact compiled without --tp")
    ap.add_argument("parallel", help="the same model compiled with --tp/--pp")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default="The history of the Roman Empire")
    a = ap.parse_args()
    one, par = ffc.load(a.one), ffc.load(a.parallel)
    try:
        ranks = len(par.ranks.procs) if par.ranks is not None else 1
        ids = one.encode(a.prompt)
        print(f"greedy, {a.new_tokens} new tokens, medians of {a.runs} alternating runs; {a.parallel}: {ranks} ranks")
        for batch in a.batch:
            speeds = {one: [], par: []}
            for _ in range(a.runs):
                for llm in (one, par):
                    t = time.perf_counter()
                    llm.generate([ids] * batch, max_new_tokens=a.new_tokens, ignore_eos=True)
                    speeds[llm].append(batch * a.new_tokens / (time.perf_counter() - t))
            s1, sp = statistics.median(speeds[one]), statistics.median(speeds[par])
            print(f"batch {batch:3d}: one process {s1:8.1f} tok/s, parallel {sp:8.1f} tok/s, ratio {sp / s1:.2f}")
    finally:
        par.close()


if __name__ == "__main__":
    main()
