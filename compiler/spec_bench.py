"""Speculative decoding against plain decoding, side by side in one process (``ffc bench
--speculative``, benchmarks/spec_bench.py).

Three workloads, as people use a chat model: free chat (nothing to copy), rewriting a given
passage, and editing a given piece of code (much of the answer is in the prompt). Each draft
and plain decoding run the same prompts in turn, round after round, each draft's run between
two plain runs and its speed-up taken against their mean (this machine's speed drifts by several
per cent over seconds: against the one plain run of its round, a draft that never verified read
0.91-1.02x); tokens/s are medians over rounds, greedy, the model's own stopping. The first
round of each is a warm-up (a draft model's loading, the control's first measurements). At
batch 1 it also gives prompt lookup's ceiling on each workload (``lookup_ceiling``): what the
answers themselves allow, whatever the draft does, at the run's verify costs and were verify
steps free (no faster verify kernel can lift a workload past the second).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

from ffc.runtime.drafts import NgramDraft

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "\"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the 1889 World's Fair.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light energy into chemical "
    "energy. Using sunlight, they combine carbon dioxide from the air with water to make glucose, and release "
    "oxygen as a by-product. The process takes place mainly in the chloroplasts of leaf cells.",
    "The Great Wall of China is a series of fortifications built across the historical northern borders of ancient "
    "Chinese states to protect against nomadic groups from the Eurasian Steppe. Several walls were built from as "
    "early as the 7th century BC; the best-known sections were built by the Ming dynasty.",
    "A rainbow is an optical phenomenon caused by refraction, internal reflection and dispersion of light in water "
    "droplets, resulting in a continuous spectrum of light appearing in the sky. Rainbows caused by sunlight always "
    "appear in the section of sky directly opposite the Sun.",
]
REWRITES = ["Repeat the following passage exactly, word for word:", "Copy this text without changing it:",
            "Rewrite this passage, keeping every sentence:", "Proofread this passage and return it in full:"]
CODE = [
    "def compute_total(items):\n    total = 0\n    for item in items:\n        if item.price > 0:\n"
    "            total += item.price * item.quantity\n    return total\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "def read_lines(path):\n    with open(path) as f:\n        lines = f.readlines()\n"
    "    return [line.strip() for line in lines if line.strip()]\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
]
EDITS = ["Add error handling to it and show the full code.", "Rename `{v}` to `{w}` and show the full code.",
         "Add a docstring to it and show the full code."]
CHAT = ["Give me three tips for staying healthy.", "What is the difference between a virus and a bacterium?",
        "Write a short poem about the sea.", "How do I make a good cup of tea?",
        "Explain what a black hole is.", "What should I pack for a weekend hiking trip?",
        "Why is the sky blue?", "Suggest a name for a bakery and explain it."]


SERIAL = 4     # requests run one at a time for batch 1


def workloads(batch: int) -> dict[str, list]:
    """Chat messages per workload, ``batch`` of each."""
    rewrite = [f"{REWRITES[k % len(REWRITES)]}\n\n{PASSAGES[k % len(PASSAGES)]}" for k in range(batch)]
    names = [("total", "amount"), ("items", "entries"), ("lines", "rows"), ("a", "prev")]
    edit = [f"Here is my code:\n\n{CODE[k % len(CODE)]}\n" +
            EDITS[k % len(EDITS)].format(v=names[k % 4][0], w=names[k % 4][1]) for k in range(batch)]
    chat = [CHAT[k % len(CHAT)] for k in range(batch)]
    return {name: [[{"role": "user", "content": m}] for m in msgs]
            for name, msgs in (("chat", chat), ("rewrite", rewrite), ("edit", edit))}


def run_spec_bench(llm, drafts: Sequence[str], *, batches: Sequence[int] = (1, 8), rounds: int = 3,
                   new_tokens: int = 128, names: Optional[Sequence[str]] = None,
                   log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Per workload, batch and mode (plain, then each draft): median tokens/s, the speed-up over
    plain (the median over rounds of each run's ratio to the plain runs around it), draft tokens
    accepted per verify step, acceptance
    rate, and whether the tokens equal plain decoding's."""
    stats = llm.engine.stats
    rows = []
    for batch in batches:
        # batch 1: several requests of the workload one after another (one prompt would measure
        # one answer's luck); batch B: B requests together
        for work, msgs in workloads(max(batch, SERIAL)).items():
            if names and work not in names:
                continue
            modes = [None, *drafts]
            times = {m: [] for m in modes}
            ratios = {m: [] for m in drafts}
            spec = {m: [0, 0, 0] for m in modes}       # verify steps, proposed, accepted (timed rounds)
            tokens, same, ref = {}, {m: True for m in modes}, []

            def run(m, timed: bool) -> float:
                before = (stats.verify_steps, stats.spec_proposed, stats.spec_accepted)
                t = time.perf_counter()
                groups = [msgs[k:k + batch] for k in range(0, len(msgs), batch)]
                ids = [x for g in groups for x in llm.generate(g, new_tokens, chat=True, speculative=m).token_ids]
                dt = time.perf_counter() - t
                if not ref:
                    ref.append(ids)                  # the first (plain) run's: what every run's must equal
                same[m] = same[m] and ids == ref[0]
                n = sum(len(x) for x in ids)
                if timed:
                    times[m].append(n / dt)
                    tokens[m] = n
                    for k, (a, b) in enumerate(zip((stats.verify_steps, stats.spec_proposed, stats.spec_accepted),
                                                   before)):
                        spec[m][k] += a - b
                return n / dt

            for r in range(rounds + 1):
                # each draft runs between two plain runs and is measured against their mean (a drift
                # of the machine's speed over the three cancels); the drafts in another order each
                # round; the first round is a warm-up (its first plain run gives the tokens to equal)
                last = run(None, r > 0)
                for m in drafts[r % len(drafts):] + drafts[:r % len(drafts)] if drafts else ():
                    tps = run(m, r > 0)
                    after = run(None, r > 0)
                    if r > 0:
                        ratios[m].append(tps / ((last + after) / 2))
                    last = after
            for m in modes:
                tps = statistics.median(times[m])
                ratio = statistics.median(ratios[m]) if m is not None else 1.0
                steps, proposed, accepted = spec[m]
                row = {"workload": work, "batch": batch, "draft": m or "plain", "tokens": tokens[m],
                       "tok_s": round(tps, 1), "speedup": round(ratio, 3),
                       "accepted_per_step": round(accepted / steps, 2) if steps else None,
                       "acceptance": round(accepted / proposed, 3) if proposed else None,
                       "equal_to_plain": same[m]}
                if m is None and batch == 1:        # at this run's verify costs, and were they free
                    rel = llm.engine.speculation.control.relative
                    prompts = [llm.prompt_ids(x, chat=True) for x in msgs]
                    row["lookup_ceiling"] = round(lookup_ceiling(prompts, ref[0], lambda n: rel(n, 1)), 2)
                    row["lookup_ceiling_free"] = round(lookup_ceiling(prompts, ref[0], lambda n: 1.0), 2)
                rows.append(row)
                log(format_row(row))
    return rows


def lookup_ceiling(prompts: Sequence[list], answers: Sequence[list], relative: Callable[[int], float],
                   max_depth: int = 16) -> float:
    """Prompt lookup's ceiling at batch 1: the speed-up of an oracle that, at every step,
    proposes exactly the longest run of the answer still to come that follows some earlier
    occurrence of the text's last token (in the prompt or the answer so far), up to
    ``max_depth`` tokens, and verifies it only where that pays at ``relative(n)``, a verify
    step over n tokens against a decode step. Whichever occurrence prompt lookup picks and
    however it shapes its tree, no step of it accepts more on these answers."""
    plain = spec = 0.0
    for prompt, out in zip(prompts, answers):
        plain += len(out) - 1                  # the first token comes from the prefill, either way
        i = 1
        while i < len(out):
            text = prompt + out[:i]
            best = 0
            for _, p in NgramDraft().lookup(text):      # every earlier occurrence of the last token
                k = 0
                while k < max_depth and i + k < len(out) and p + 1 + k < len(text) and text[p + 1 + k] == out[i + k]:
                    k += 1
                best = max(best, k)
            if best and (1 + best) / relative(1 + best) > 1:
                spec, i = spec + relative(1 + best), i + 1 + best
            else:
                spec, i = spec + 1, i + 1
    return plain / spec if spec else 1.0


HEADER = f"{'workload':9s} {'batch':>5s} {'draft':16s} {'tokens':>6s} {'tok/s':>8s} {'speedup':>8s} " \
         f"{'acc/step':>8s} {'accept':>7s} {'same':>5s}"


def format_row(r: dict) -> str:
    d = r["draft"] if len(r["draft"]) <= 16 else "..." + r["draft"][-13:]
    acc = "-" if r["accepted_per_step"] is None else f"{r['accepted_per_step']:.2f}"
    rate = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
    return f"{r['workload']:9s} {r['batch']:5d} {d:16s} {r['tokens']:6d} {r['tok_s']:8.1f} {r['speedup']:7.2f}x " \
           f"{acc:>8s} {rate:>7s} {'yes' if r['equal_to_plain'] else 'NO':>5s}"


def format_spec_bench(rows: list[dict], threads: int) -> str:
    """The rows as a table."""
    return "\n".join([f"threads={threads}; tok/s: medians over rounds; speedup: median of each run's ratio to the plain runs before and after it; acc/step: draft tokens accepted per verify step; accept: "
                      "accepted / proposed (deepest path); same: greedy tokens equal plain decoding's",
                      HEADER, *(format_row(r) for r in rows),
                      *(f"prompt lookup's ceiling on {r['workload']} at batch 1 (an oracle's, at this run's verify costs): "
                        f"{r['lookup_ceiling']:.2f}x, {r['lookup_ceiling_free']:.2f}x were verify steps free"
                        for r in rows if "lookup_ceiling" in r)])
