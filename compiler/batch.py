"""Throughput mode: ``ffc run ART --batch-file prompts.jsonl --output out.jsonl``.

Every prompt of the file goes to the engine at once; its scheduler runs them by continuous
batching (as many sequences per step as the plan and the KV pool allow), so the CPU sees full
batches however many prompts there are. A line is a JSON object with ``prompt`` (text to
continue) or ``messages`` (chat messages, formatted with the tokenizer's chat template), and
optionally ``id`` and ``max_new_tokens``; or a bare JSON string (a prompt). The whole file is
checked before anything runs (a bad line is named). The output has one line per input, in
input order: ``id``, ``text``, ``tokens`` (generated), ``finish_reason``; it is written aside
and renamed into place when every prompt has finished, so a failed run leaves no partial file.
Progress: a bar over the prompts on a terminal, else a line every tenth of them, with the
generated tokens per second so far.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ffc.runtime.sampling import SamplingParams

from .errors import InvalidRequestError
from .progress import Reporter


def read_batch(path) -> list[dict]:
    """The file's prompts as {"id", "prompt" | "messages", "max_new_tokens"?}."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read the batch file {path}: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            x = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n}: not JSON ({e.msg}); each line is a JSON object with \"prompt\" or "
                                      "\"messages\", or a JSON string") from None
        x = {"prompt": x} if isinstance(x, str) else x
        if not isinstance(x, dict) or ("prompt" in x) == ("messages" in x):
            raise InvalidRequestError(f"{path}:{n}: give exactly one of \"prompt\" (a string) or \"messages\" (a list)")
        if ("prompt" in x and not isinstance(x["prompt"], str)) or ("messages" in x and not isinstance(x["messages"], list)):
            raise InvalidRequestError(f"{path}:{n}: \"prompt\" must be a string, \"messages\" a list of messages")
        m = x.get("max_new_tokens")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise InvalidRequestError(f"{path}:{n}: max_new_tokens must be an integer >= 1")
        items.append(dict(x, id=x.get("id", len(items))))
    if not items:
        raise InvalidRequestError(f"the batch file {path} holds no prompts")
    return items


def run_batch(llm, items: list[dict], output, report: Reporter, max_new_tokens: int, sampling: dict) -> str:
    """Generate for every item, write ``output``; a one-line summary."""
    n, done, tokens, t0 = len(items), [0], [0], time.perf_counter()
    every = max(1, n // 10)

    def finished(req) -> None:
        done[0] += 1
        tokens[0] += len(req.out)
        report.advance()
        if not report.live and (done[0] % every == 0 or done[0] == n):
            report(f"{done[0]}/{n} prompts, {tokens[0] / (time.perf_counter() - t0):.1f} generated tok/s")
    results: dict = {}
    engine = llm.engine
    engine.on_finish.append(finished)
    try:
        with report.phase(f"generate for {n} prompts", total=n):
            for chat in (False, True):       # plain prompts, then chat messages: each one generate call
                mine = [k for k, x in enumerate(items) if ("messages" in x) == chat]
                if not mine:
                    continue
                params = [SamplingParams(max_new_tokens=items[k].get("max_new_tokens", max_new_tokens), **sampling)
                          for k in mine]
                out = llm.generate([items[k]["messages" if chat else "prompt"] for k in mine], chat=chat,
                                   sampling_params=params)
                for k, text, ids, why in zip(mine, out.texts, out.token_ids, out.finish_reasons):
                    results[k] = {"id": items[k]["id"], "text": text, "tokens": len(ids), "finish_reason": why}
    finally:
        engine.on_finish.remove(finished)
    output = Path(output)
    fd, tmp = tempfile.mkstemp(dir=output.parent if str(output.parent) else ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            for k in range(n):
                f.write(json.dumps(results[k]) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results.values())
    return f"{n} prompts, {total} tokens generated in {seconds:.1f} s: {total / seconds:.1f} tok/s -> {output}"
