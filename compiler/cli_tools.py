"""`ffc inspect`, `ffc debug compare`, `ffc bench` and `ffc eval`: looking into artifacts and measuring
them (imported by ffc.cli only for these commands)."""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import torch

import ffc
from ffc.ir import parse
from ffc.lower import PHASES
from ffc.lower.describe import describe_plan
from ffc.runtime.trace import format_trace, trace_generation, write_trace

from .artifact import Artifact
from .bench import format_bench, run_bench
from .debug import compare
from .errors import FfcError
from .evaluate import evaluate, read_text
from .graph_svg import diff_nodes, plan_steps, render_graph
from .offload_policy import explain_policy
from .plots import strategy_plot
from .progress import Reporter
from .report import render_report
from .spec_bench import format_spec_bench, run_spec_bench


def _bench(a) -> None:
    if a.trace:
        if a.threads:
            torch.set_num_threads(a.threads)
        llm = ffc.load(a.artifact)
        try:
            n = max(1, min(a.prefill[0], llm.max_seq_len - 2))
            doc = trace_generation(llm, torch.randint(100, 1000, (n,), generator=torch.Generator().manual_seed(0)).tolist())
        finally:
            llm.close()
        write_trace(doc, a.trace)
        print(format_trace(doc))
        print(f"[ffc] wrote {a.trace}: open it in ui.perfetto.dev or chrome://tracing", file=sys.stderr)
        return
    if a.speculative:
        if a.threads:
            torch.set_num_threads(a.threads)
        llm = ffc.load(a.artifact)
        try:
            rows = run_spec_bench(llm, a.speculative, batches=a.batch, rounds=a.runs, new_tokens=a.new_tokens,
                                  log=lambda s: print(f"[ffc] {s}", file=sys.stderr))
        finally:
            llm.close()
        print(format_spec_bench(rows, torch.get_num_threads()))
        return
    with Reporter() as report:
        res = run_bench(a.artifact, compare=a.compare, runs=a.runs, new_tokens=a.new_tokens,
                        batches=tuple(a.batch), prefill_lens=tuple(a.prefill), threads=a.threads, log=report)
    print(format_bench(res))


def _eval(a) -> None:
    text = read_text(a.perplexity)
    llm = ffc.load(a.artifact, kv_cache_memory=a.kv_cache_memory)
    base = ffc.load(a.kl_divergence, kv_cache_memory=a.kv_cache_memory) if a.kl_divergence else None
    try:
        res = evaluate(llm, text, ctx=a.ctx, base=base, max_windows=a.chunks,
                       progress=lambda k, n: print(f"[ffc] window {k}/{n}", file=sys.stderr) if k % 10 == 0 or k == n
                       else None)
    finally:
        llm.close()
        if base is not None:
            base.close()
    print(res.format())


def _find_dump(root: Path, key: str) -> Path:
    dumps = sorted([*(root / "ir").glob("*.ir"), *(root / "ir").glob("*.txt")])   # passes' IR, decisions' text
    exact = [d for d in dumps if d.stem.split("-", 1)[-1] == key or d.stem == key]
    hits = exact or [d for d in dumps if key in d.stem]
    if len(hits) > 1 and not exact:
        raise FfcError(f"--ir {key!r} matches several passes ({', '.join(d.stem for d in hits)}); be more precise")
    if not hits:
        raise FfcError(f"no IR dump matches {key!r}; dumps: {', '.join(d.stem for d in dumps)}")
    return hits[-1] if exact else hits[0]


def _graph_picture(art: Artifact, a) -> None:
    """``inspect --graph [PASS] [--diff A B]``: an SVG of one graph of an IR dump."""
    def read(key):
        path = _find_dump(art.root, key) if key else art.path(art.final_ir, "final_ir")
        if path.suffix != ".ir":
            raise FfcError(f"{path.name} is a decision's text, not IR: --graph draws the IR after a pass")
        mod = parse(path.read_text())
        name = a.graph_name if a.graph_name in mod.graphs else next(iter(mod.graphs))
        return path, mod.graphs[name], name
    path, g, name = read(a.diff[1] if a.diff else a.graph)
    added = removed = None
    if a.diff:
        old_path, old, _ = read(a.diff[0])
        added, removed = diff_nodes(old, g)
        title = f"{name}: what {old_path.stem} -> {path.stem} changed ({len(added)} nodes new)"
    else:
        title = f"graph {name} after {path.stem} ({len(g.nodes)} nodes)"
    final = path == art.path(art.final_ir, "final_ir")
    steps = plan_steps(art.plan, name) if final and art.kernels and not a.diff else None
    out = Path(a.output or "graph.svg")
    out.write_text(render_graph(g, layers=a.layers, steps=steps, added=added, removed=removed,
                                title=f"{art.root.name}: {title}"))
    print(f"[ffc] {title}", file=sys.stderr)
    print(out)


def _inspect(a) -> None:
    art = Artifact.open(a.artifact, check_hashes=False)
    root, m = art.root, art.manifest
    if a.ir:
        print(_find_dump(root, a.ir).read_text(), end="")
        return
    if a.plan is not None:
        if not art.kernels:
            raise FfcError(f"{root} has no plan (compiled with --no-codegen)")
        if a.plan == "":
            print(describe_plan(art.plan))
            return
        hits = [p for p in PHASES if p.startswith(a.plan)]
        if len(hits) != 1:
            raise FfcError(f"--plan {a.plan!r} is not one lowering phase; phases: {', '.join(PHASES)}")
        print((root / "kernels" / "lowering" / f"{PHASES.index(hits[0]) + 1}-{hits[0]}.txt").read_text(), end="")
        return
    if a.policy is not None:
        print(explain_policy(root, a.policy))
        return
    if a.strategy:
        par = m.get("parallel")
        if not par:
            raise FfcError(f"{root} was compiled for one rank (no strategy); compile with --tp N, or see "
                           "`ffc compile MODEL --tp N --dry-run`")
        if a.plot:
            data = root / "parallel" / "strategy.json"
            if not data.is_file():
                raise FfcError(f"{root} has no parallel/strategy.json (compiled before ffc wrote it): recompile it")
            strategy_plot(json.loads(data.read_text()), a.plot)
            print(a.plot)
            return
        print(art.path(par["strategy"], "parallel.strategy").read_text(), end="")
        return
    if a.graph is not None:
        _graph_picture(art, a)
        return
    if a.report:
        Path(a.report).write_text(render_report(art))
        print(a.report)
        return
    if a.diff:
        x, y = (_find_dump(root, k) for k in a.diff)
        sys.stdout.writelines(difflib.unified_diff(x.read_text().splitlines(True), y.read_text().splitlines(True),
                                                   str(x.relative_to(root)), str(y.relative_to(root))))
        return
    model = m["model"]
    print(f"artifact   {root}  (format {m['format_version']}, ffc {m['ffc_version']}, torch {m['torch_version']}, "
          f"transformers {m['transformers_version']})")
    print(f"model      {model['source']}  [{model['family']}: {model['architecture']}]")
    print(f"options    {json.dumps(m['options'], sort_keys=True)}  (hash {m['options_hash']})")
    print(f"compiled   in {m['compile_seconds']} s{'  from edited IR' if m.get('from_ir') else ''}")
    print(f"\n{'#':>3}  {'pass':34s} {'nodes':>6} {'ms':>8}  changed")
    for p in m["passes"]:
        print(f"{p['index']:>3}  {p['name']:34s} {p['nodes']:>6} {p['seconds'] * 1e3:8.1f}  "
              f"{'yes' if p['changed'] else '-'}")
    print(f"\nIR dumps in {root / 'ir'}; final: {m['final_ir']}")
    k = m.get("kernels")
    if k:
        print(f"kernels    {k['unique_kernels']} unique, launches per step {k['launches']}, target {k['target']}, "
              f"ISA {k.get('isa')}, library {k['library']} (plan: ffc inspect {root} --plan)")


def _debug_compare(a) -> None:
    report = compare(a.model, a.prompt, tolerance=a.tolerance)
    print(report.format())
    if a.fail and (report.first_bad_stage or report.first_divergence):
        sys.exit(1)


COMMANDS = {"bench": _bench, "eval": _eval, "inspect": _inspect, "debug": _debug_compare}
