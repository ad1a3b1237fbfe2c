"""`ffc run` and `ffc serve`: an artifact loaded and decoded (imported by ffc.cli only for these
commands; none of tracing, lowering, the search or codegen is imported, so they start in about the
time torch and the runtime take)."""
from __future__ import annotations

import sys

import ffc
from ffc.runtime.offload import format_policy
from ffc.runtime.server import serve

from .batch import read_batch, run_batch
from .errors import FfcError
from .progress import Reporter


def _load(a):
    """The artifact, as run and serve load it; with --memory-budget its offload policy on stderr."""
    llm = ffc.load(a.artifact, backend="interpreter" if a.interpreter else None, **_engine(a))
    stream = getattr(llm.compiled, "offload", None)
    if stream is not None:
        print(format_policy(stream.policy.summary), file=sys.stderr)
    return llm


def _engine(a) -> dict:
    return dict(kv_cache_memory=a.kv_cache_memory, max_tokens_per_batch=a.max_tokens_per_batch,
                max_requests_per_batch=a.max_requests_per_batch, prefix_caching=not a.no_prefix_caching,
                memory_budget=a.memory_budget, overlap=not a.no_overlap)


def _serve(a) -> None:
    serve(a.artifact, host=a.host, port=a.port, model_name=a.model_name, log_level=a.log_level,
          speculative=a.speculative, trace_dir=a.trace_dir, trace_every=a.trace_every, **_engine(a))


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=tuple(a.stop or ()), ignore_eos=a.ignore_eos, speculative=a.speculative)


def _run(a) -> None:
    if a.batch_file is not None:
        _run_batch(a)
        return
    if (a.prompt is None) == (a.chat is None):
        raise FfcError("give exactly one of --prompt TEXT or --chat TEXT (or --batch-file PROMPTS.jsonl)")
    llm = _load(a)
    prompt, chat = (a.chat, True) if a.chat is not None else (a.prompt, False)
    try:
        if a.no_stream:
            print(llm.generate([prompt], a.max_new_tokens, chat=chat, **_sampling(a)).texts[0])
            return
        for piece in llm.stream(prompt, a.max_new_tokens, chat=chat, **_sampling(a)):
            print(piece, end="", flush=True)
        print()
    finally:
        llm.close()


def _run_batch(a) -> None:
    if a.prompt is not None or a.chat is not None or not a.output:
        raise FfcError("--batch-file takes no --prompt / --chat, and needs --output OUT.jsonl")
    items = read_batch(a.batch_file)
    sampling = {k: v for k, v in _sampling(a).items() if k != "speculative"}
    llm = _load(a)
    try:
        with Reporter() as report:
            line = run_batch(llm, items, a.output, report, a.max_new_tokens, sampling)
    finally:
        llm.close()
    print(f"[ffc] {line}", file=sys.stderr)
    print(a.output)


COMMANDS = {"run": _run, "serve": _serve}
