"""Serving benchmark: `ffc serve` on localhost driven by a real HTTP client.

The same request mix (varied prompt and output lengths) is sent
  1. as Poisson arrivals at several rates, and all at once (saturated), with in-flight batching;
  2. as static batches: groups of --static-batch requests in arrival order, prompts padded to
     the group's longest, every request run to the group's longest output;
  3. one at a time.
All three go through the same server process, so they differ only in how requests reach it.
Prints throughput (useful output tokens/s), TTFT and TPOT p50/p99 per mode, and the ratios.

    python benchmarks/serve_bench.py smol.ffc --requests 64 --rates 1 2 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

TOPICS = [
    "the history of the printing press", "how vaccines train the immune system", "the rules of chess",
    "why the sky is blue", "the water cycle", "how a compiler turns source code into machine code",
    "the French revolution", "photosynthesis in plants", "how to bake sourdough bread",
    "the causes of the first world war", "black holes and event horizons", "the life of Marie Curie",
    "how the stock market works", "the migration of monarch butterflies", "plate tectonics",
    "the invention of the telephone", "how neural networks learn", "the Roman empire's road network",
]
STYLES = ["Write a short essay about {t}.", "Explain {t} to a ten-year-old.", "List five facts about {t}.",
          "Summarize what is known about {t}, then give your opinion.", "Tell a story that involves {t}."]


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0
    sent: float = 0.0
    first: float = 0.0
    end: float = 0.0
    ok: bool = False
    useful: int = 0           # tokens the request asked for (what counts as throughput)


@dataclass
class Result:
    name: str
    wall: float
    reqs: list = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return sum(r.useful for r in self.reqs) / self.wall

    def pct(self, xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")

    def ttft(self, q):
        return self.pct([r.first - r.arrival for r in self.reqs], q)

    def tpot(self, q):
        return self.pct([(r.end - r.first) / (r.max_tokens - 1) for r in self.reqs if r.max_tokens > 1], q)


def make_requests(tokenizer, n: int, seed: int) -> list[Req]:
    """Prompts of 20-400 tokens (a topic, a style, and 0-6 paragraphs of context) and output
    lengths drawn log-normally in 16..256 tokens, like chat traffic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        context = " ".join(f"Notes on {rng.choice(TOPICS)}: " + " ".join(rng.sample(TOPICS, 6))
                           for _ in range(rng.choice([0, 0, 1, 2, 3, 6])))
        text = (f"Context: {context}\n" if context else "") + rng.choice(STYLES).format(t=topic)
        ids = tokenizer(text)["input_ids"][:400]
        new = int(min(256, max(16, rng.lognormvariate(4.2, 0.7))))
        out.append(Req(ids, new, useful=new))
    return out


async def _one(client, url, r: Req, t0: float):
    body = {"prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    r.sent = time.perf_counter() - t0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if not r.first and chunk["choices"][0]["text"]:
                r.first = now
            if chunk["choices"][0]["finish_reason"]:
                r.end, r.ok = now, True
    if not r.first:
        r.first = r.end


async def poisson(url, reqs: list[Req], rate: float, seed: int) -> Result:
    rng = random.Random(seed)
    t = 0.0
    for r in reqs:
        r.arrival = t
        if rate != float("inf"):
            t += rng.expovariate(rate)
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=len(reqs) + 8)) as client:
        t0 = time.perf_counter()

        async def later(r):
            await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
            await _one(client, url, r, t0)
        await asyncio.gather(*(later(r) for r in reqs))
        wall = time.perf_counter() - t0
    return Result(f"in-flight, rate {rate:g}/s" if rate != float("inf") else "in-flight, all at once", wall, reqs)


async def static(url, reqs: list[Req], batch: int, pad_id: int) -> Result:
    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()
        padded = []
        for k in range(0, len(reqs), batch):
            group = reqs[k:k + batch]
            longest_prompt = max(len(r.prompt) for r in group)
            longest_out = max(r.max_tokens for r in group)
            batch_reqs = [Req([pad_id] * (longest_prompt - len(r.prompt)) + r.prompt, longest_out, useful=r.useful)
                          for r in group]
            start = time.perf_counter() - t0
            for r in batch_reqs:
                r.arrival = start
            await asyncio.gather(*(_one(client, url, r, t0) for r in batch_reqs))
            padded += batch_reqs
        wall = time.perf_counter() - t0
    return Result(f"static batches of {batch}", wall, padded)


async def sequential(url, reqs: list[Req]) -> Result:
    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()
        for r in reqs:
            r.arrival = time.perf_counter() - t0
            await _one(client, url, r, t0)
        wall = time.perf_counter() - t0
    return Result("one at a time", wall, reqs)


def _copy(reqs):
    return [Req(list(r.prompt), r.max_tokens, useful=r.useful) for r in reqs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0], help="requests/s (Poisson)")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--sequential-requests", type=int, default=None,
                    help="run only this many one at a time (their throughput is per request; default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="extra `ffc serve` arguments, e.g. '--kv-cache-memory 2GiB'")
    a = ap.parse_args()

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(f"{a.artifact}/tokenizer")
    reqs = make_requests(tok, a.requests, a.seed)
    from ffc.util import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ffc.cli", "serve", a.artifact, "--port", str(port),
                             "--log-level", "warning", *a.server_args.split()])
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        asyncio.run(sequential(url, _copy(reqs[:2])))        # warm-up
        results = [asyncio.run(poisson(url, _copy(reqs), float("inf"), a.seed))]
        for rate in a.rates:
            results.append(asyncio.run(poisson(url, _copy(reqs), rate, a.seed)))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        results.append(asyncio.run(static(url, _copy(reqs), a.static_batch, pad)))
        results.append(asyncio.run(sequential(url, _copy(reqs[:a.sequential_requests or len(reqs)]))))
    finally:
        proc.terminate()
        proc.wait(120)
    assert all(r.ok for res in results for r in res.reqs), "some requests did not finish"
    lens = [len(r.prompt) for r in reqs]
    outs = [r.max_tokens for r in reqs]
    print(f"{a.requests} requests: prompt tokens median {statistics.median(lens):.0f} (range {min(lens)}-{max(lens)}), "
          f"output tokens median {statistics.median(outs):.0f} (range {min(outs)}-{max(outs)})")
    print(f"{'mode':32} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'wall s':>7}")
    for res in results:
        print(f"{res.name:32} {res.throughput:8.1f} {res.ttft(50) * 1e3:7.0f}ms {res.ttft(99) * 1e3:7.0f}ms "
              f"{res.tpot(50) * 1e3:7.1f}ms {res.tpot(99) * 1e3:7.1f}ms {res.wall:7.1f}")
    sat, stat, seq = results[0].throughput, results[-2].throughput, results[-1].throughput
    print(f"saturated in-flight / one at a time: {sat / seq:.2f}x; / static batching: {sat / stat:.2f}x")


if __name__ == "__main__":
    main()
