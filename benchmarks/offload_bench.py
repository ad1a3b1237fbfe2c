"""Offloaded weights (FlexGen's workload) on this machine: throughput under memory budgets.

    python benchmarks/offload_bench.py ART.ffc [--budgets 1.0 0.5 0.25] [--prompt 512] [--output 32] [--waves 4]

For each budget (a fraction of the artifact's weights, in the kernels' layout) the policy search
chooses what stays in RAM, the batch and the tokens per engine step; a fresh process per run
loads the artifact under it and generates ``--output`` tokens for each of ``--waves`` batches of
``--prompt``-token prompts, all submitted at once (FlexGen's block of batches: the engine's
in-flight batching runs a prompt's prefill in the steps that decode the others, so the
compute-bound prefill hides the reads that decode steps wait for; EOS ignored). It reports
tokens generated per second over the whole run (prefill included, as FlexGen counts), the
policy's prediction for that many prompts beside it, the bytes read from disk and the peak RSS
(VmHWM) next to the RSS the process had before loading (interpreter, torch, tokenizer
libraries: the runtime's own memory, which no budget covers). With and without overlap
(``--no-overlap``: each streamed unit read when needed). Where the policy puts the KV cache of
its last layers on disk, the layers and the KV bytes read and written (within "read MB", which
counts every read). The first row is the artifact loaded with no budget at the batch the 100%
policy chose. Every run reads the disk for real: the store and the KV file are opened O_DIRECT
(page cache bypassed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(art: str, budget: str, overlap: bool, prompt: int, output: int, batch: int, waves: int) -> dict:
    import torch
    import transformers  # noqa: F401 - loaded before the baseline RSS, as a load would
    import ffc
    from ffc.runtime.llm import LLM  # noqa: F401
    base = _status("VmRSS")
    from ffc.offload_policy import schedule
    # under a budget the policy sets the batch and the tokens per step; all in RAM: the largest step
    kwargs = ({"max_tokens_per_batch": max(prompt, 256)} if budget == "none" else
              {"memory_budget": int(budget), "overlap": overlap, "workload": f"prompt={prompt},output={output}"})
    if batch:
        kwargs["max_requests_per_batch"] = batch
    llm = ffc.load(art, **kwargs)
    stream = getattr(llm.compiled, "offload", None)
    b = batch or (stream.policy.batch if stream else 1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (prompt,), generator=g).tolist() for _ in range(b * waves)]
    llm.generate([prompts[0][:8]], max_new_tokens=2, ignore_eos=True)     # first-step set-up out of the timing
    before = stream.stats() if stream else {"bytes": 0}
    t0 = time.perf_counter()
    out = llm.generate(prompts, max_new_tokens=output, ignore_eos=True, temperature=0)
    dt = time.perf_counter() - t0
    after = stream.stats() if stream else {"bytes": 0, "direct": False}
    summary = stream.policy.summary if stream else {}
    predicted = None
    if summary:     # the policy's step times over this many prompts (it is priced for a block of batches)
        heavy, light = schedule(b, prompt, output, summary["step_tokens"], len(prompts))
        predicted = len(prompts) * output / (heavy * summary["heavy_s"] + light * summary["light_s"])
    return {"batch": b, "tokens_per_s": sum(len(t) for t in out.token_ids) / dt, "seconds": dt,
            "predicted": predicted, "step_tokens": summary.get("step_tokens"), "read_mb": (after["bytes"] - before["bytes"]) / 1e6,
            "direct": after.get("direct"), "peak_rss": _status("VmHWM"), "base_rss": base,
            "resident_mb": summary.get("weights_ram", 0) / 2**20, "slots_mb": summary.get("slots", 0) / 2**20,
            "kv_mb": summary.get("kv", 0) / 2**20, "chosen": summary.get("chosen", ""),
            "kv_disk": stream.policy.kv_disk if stream else 0,
            "kv_read_mb": (after.get("kv_read", 0) - before.get("kv_read", 0)) / 1e6,
            "kv_written_mb": (after.get("kv_written", 0) - before.get("kv_written", 0)) / 1e6}


def run(art: str, budget: str, overlap: bool, prompt: int, output: int, waves: int, batch: int = 0) -> dict:
    cmd = [sys.executable, __file__, art, "--child", budget, "--prompt", str(prompt), "--output", str(output),
           "--batch", str(batch), "--waves", str(waves)] + ([] if overlap else ["--no-overlap"])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def weights_bytes(art: str) -> int:
    import ffc  # noqa: F401
    from ffc.artifact import Artifact
    from ffc.runtime.llm import read_verified_module
    from ffc.runtime.offload import open_store
    a = Artifact.open(art, check_hashes=False)
    _, units = open_store(a, a.plan, read_verified_module(a))
    return sum(u.bytes for u in units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--waves", type=int, default=4, help="batches of prompts per run, submitted at once")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.artifact, a.child, not a.no_overlap, a.prompt, a.output, a.batch, a.waves)))
        return
    w = weights_bytes(a.artifact)
    mib = 2**20
    print(f"{a.artifact}: weights {w / mib:.1f} MiB in the kernels' layout; prompt {a.prompt}, output {a.output}, "
          f"{a.waves} batch(es) per run, "
          f"threads {os.environ.get('FFC_NUM_THREADS', 'torch default')}")
    rows = []
    for frac in a.budgets:
        for overlap in (True, False):
            if frac >= 1.0 and not overlap:
                continue
            r = run(a.artifact, str(int(frac * w)), overlap, a.prompt, a.output, a.waves)
            rows.append((f"{frac:.0%} {'overlap' if overlap else 'no overlap'}", r))
            if frac >= 1.0:
                ref = run(a.artifact, "none", True, a.prompt, a.output, a.waves, r["batch"])
                rows.insert(0, ("no budget (all in RAM)", ref))
    print(f"{'run':<24} {'batch':>5} {'step':>5} {'tok/s':>8} {'predicted':>9} {'pred/meas':>9} {'read MB':>9} "
          f"{'RAM MiB: resident+slots+KV':>27} {'peak RSS':>9} {'base RSS':>9}  KV on disk: layers, MB read/written")
    for name, r in rows:
        pred = r["predicted"]
        print(f"{name:<24} {r['batch']:>5} {r.get('step_tokens') or 512:>5} {r['tokens_per_s']:>8.2f} {pred or 0:>9.2f} "
              f"{(pred / r['tokens_per_s']) if pred else 0:>9.2f} {r['read_mb']:>9.0f} "
              f"{r['resident_mb']:>11.1f}+{r['slots_mb']:.1f}+{r['kv_mb']:.1f}{'':>4} {r['peak_rss'] / mib:>9.0f} "
              f"{r['base_rss'] / mib:>9.0f}  " + (f"{r['kv_disk']}, {r['kv_read_mb']:.0f}/{r['kv_written_mb']:.0f}"
                                                 if r.get("kv_disk") else "-"))
    ram = rows[0][1]["tokens_per_s"]
    by = dict(rows)
    for frac in a.budgets:
        o, n = by.get(f"{frac:.0%} overlap"), by.get(f"{frac:.0%} no overlap")
        if o and n:
            print(f"{frac:.0%}: {o['tokens_per_s'] / ram:.2f} of all-in-RAM throughput; overlap "
                  f"{o['tokens_per_s'] / n['tokens_per_s']:.2f}x no overlap")


if __name__ == "__main__":
    main()
