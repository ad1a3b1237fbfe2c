"""Timelines of engine steps as Chrome trace JSON (open in ui.perfetto.dev or chrome://tracing).

Tracing is off unless asked: ``ModelRunner.events`` is None and every step runs the executor's
plain ``run``. Set it to a list and each step runs ``trace`` instead (the same kernels, with a
steady-clock timestamp before and after each kernel on every executor thread, taken in C++;
collectives and send/recv timed where the runtime runs them, on thread 0), and the engine adds
its own Python time (scheduling and drafting before the forward call, sampling, detokenizing
and retiring after it) on a track of its own. Ranks time their own steps (pid = rank); every
clock is CLOCK_MONOTONIC, so the ranks' tracks line up.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ffc.errors import InvalidRequestError

PY_TID = 1000      # the engine's Python track, beside the executor threads (tids 0..)


def python_pid(runner) -> int:
    """The track group of the engine's Python time: the driver's (after the ranks) or process 0."""
    return int(getattr(runner.ranks, "world", 0)) if runner.ranks is not None else 0


def engine_spans(runner, start: int, scheduled: int, forwarded: int, end: int, sequences: int) -> None:
    """The engine's two Python spans of a step around its forward call (monotonic ns)."""
    pid = python_pid(runner)
    for name, a, b in (("schedule, draft", start, scheduled), ("sample, detokenize, retire", forwarded, end)):
        runner.events.append({"name": name, "cat": "python", "ph": "X", "pid": pid, "tid": PY_TID, "ts": a / 1e3,
                              "dur": (b - a) / 1e3, "args": {"sequences": sequences}})


def chrome_trace(events: Sequence[dict], python_pid: int, ranks: int, meta: Optional[dict] = None) -> dict:
    """The trace document: events sorted by time, processes and threads named."""
    named = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
              "args": {"name": f"rank {pid}" if pid < ranks else "driver"}} for pid in sorted({e["pid"] for e in events})]
    for pid, tid in sorted({(e["pid"], e["tid"]) for e in events}):
        label = "Python: engine" if tid == PY_TID else f"executor thread {tid}" + (" (and collectives)" if tid == 0 else "")
        named.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}})
    if ranks == 1:
        named[0]["args"]["name"] = "ffc"
    return {"traceEvents": named + sorted(events, key=lambda e: (e["ts"], e["pid"], e["tid"])),
            "displayTimeUnit": "ms", "otherData": dict(meta or {})}


def runner_trace(runner, events: Sequence[dict], meta: dict) -> dict:
    """``chrome_trace`` of events a runner recorded: its ranks' tracks and the driver's."""
    ranks = python_pid(runner) or 1
    return chrome_trace(events, python_pid(runner), ranks, dict(meta, ranks=ranks))


def trace_generation(llm, prompt: Sequence[int], new_tokens: int = 2) -> dict:
    """Generate ``new_tokens`` after ``prompt`` (greedy, EOS ignored) with tracing on: its prefill
    step and new_tokens - 1 decode steps, as one Chrome trace document."""
    runner = llm.runner
    if runner.compiled is None and getattr(runner.ranks, "limits", None) is None:   # ranks report their plan's
        raise InvalidRequestError("a trace times the artifact's kernels; the interpreter backend has none")
    runner.events = []
    try:
        llm.generate([list(prompt)], max_new_tokens=new_tokens, ignore_eos=True)
        events = runner.events
    finally:
        runner.events = None
    return runner_trace(runner, events, {"prompt_tokens": len(prompt), "new_tokens": new_tokens})


def format_trace(doc: dict) -> str:
    """Per traced step and rank (thread 0's track): steps, span, time per kernel family and in
    collectives; the engine's Python time per step."""
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    lines = []
    for graph in sorted({e["args"]["graph"] for e in events if "graph" in e["args"]}):
        for pid in sorted({e["pid"] for e in events if e["args"].get("graph") == graph}):
            mine = [e for e in events if e["args"].get("graph") == graph and e["pid"] == pid and e["tid"] == 0]
            span = max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)
            fams: dict[str, float] = {}
            for e in mine:
                fams[e["cat"]] = fams.get(e["cat"], 0.0) + e["dur"]
            parts = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(fams.items(), key=lambda kv: -kv[1]))
            lines.append(f"{graph:16s} rank {pid}: {len(mine)} steps in {span / 1e3:.2f} ms (ms per family: {parts})")
    py = [e for e in events if e["cat"] == "python"]
    if py:
        lines.append(f"engine Python time: {sum(e['dur'] for e in py) / 1e3:.2f} ms over {len(py) // 2} steps")
    return "\n".join(lines)


def write_trace(doc: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(doc))
    return path


class StepTracer:
    """Traces every ``every``-th step of an engine's loop (``ffc serve --trace-dir``) into
    ``directory``/step<N>.json: the steps between run untraced."""

    def __init__(self, runner, directory, every: int = 100):
        if every < 1:
            raise ValueError(f"trace every {every} steps: must be >= 1")
        self.runner, self.dir, self.every, self.count = runner, Path(directory), every, 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def step(self, step) -> None:
        """Run ``step()``, traced when its turn comes."""
        self.count += 1
        if (self.count - 1) % self.every:
            step()
            return
        self.runner.events = []
        try:
            step()
            events = self.runner.events
        finally:
            self.runner.events = None
        if events:
            write_trace(runner_trace(self.runner, events, {"step": self.count}),
                        self.dir / f"step{self.count:08d}.json")
