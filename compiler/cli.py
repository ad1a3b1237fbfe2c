"""The `ffc` command line: compile, run, inspect, debug compare."""
from __future__ import annotations

import difflib
import signal
import json
import sys
from pathlib import Path

import torch

import ffc
from ffc.ir import parse
from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Workload
from ffc.lower import PHASES
from ffc.lower.describe import describe_plan
from ffc.runtime.server import serve
from ffc.runtime.trace import format_trace, trace_generation, write_trace

from . import build, knobs
from .api import compile_model
from .artifact import REBUILT, Artifact, read_manifest, refresh_manifest
from .batch import read_batch, run_batch
from .bench import format_bench, run_bench
from .spec_bench import format_spec_bench, run_spec_bench
from .calibrate import calibrate, profile_for, save
from .cli_args import build_parser
from .codegen import render_sources
from .debug import compare
from .errors import FfcError
from .evaluate import evaluate, read_text
from .graph_svg import diff_nodes, plan_steps, render_graph
from .offload_policy import disk_bandwidth, explain_policy, format_policy, plan_offload
from .parallel import dry_run
from .plots import strategy_plot
from .progress import Reporter
from .report import render_report
from .util import parse_memory


def _degree(text: str):
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise FfcError(f"parallel degree {text!r} must be a positive integer or 'auto'")
    return int(text)


def _compile(a) -> None:
    tp, pp = _degree(a.tp), _degree(a.pp)
    if a.devices is not None:
        if a.devices < 1:
            raise FfcError(f"--devices {a.devices} must be a positive number of devices")
        if "auto" not in (tp, pp) and tp * pp > a.devices:
            raise FfcError(f"--tp {tp} --pp {pp} needs {tp * pp} devices but --devices gives {a.devices}: lower the "
                           "degrees, or pass --tp auto / --pp auto to search the splits of the devices")
    if a.dry_run and a.memory_budget is not None:
        raise FfcError("--memory-budget is priced on the artifact's weights as its kernels read them, which a dry run "
                       "does not write: compile with --memory-budget (the policy is printed), or run `ffc inspect "
                       "ART --policy SIZE` on an artifact")
    if a.dry_run or tp == "auto" or pp == "auto":
        if not a.dry_run:
            raise FfcError("--tp auto / --pp auto choose degrees in a --dry-run; then compile with the degrees it "
                           "reports")
        log = lambda s: print(f"[ffc] {s}", file=sys.stderr)  # noqa: E731
        print(dry_run(a.model, tp=tp, pp=pp, devices=a.devices, profile=profile_for(a.profile, log),
                      memory_limit=parse_memory(a.memory_per_device, what="--memory-per-device"),
                      workload=Workload.parse(a.workload),
                      max_seq_len=a.max_seq_len, dtype=a.dtype, allow_pickle=a.allow_pickle,
                      quant=QuantPolicy.parse(a.quant, a.quant_skip), kv_dtype=a.kv_dtype, log=log))
        return
    if not a.output:
        raise FfcError("give the artifact directory to write with -o/--output")
    with Reporter(quiet=a.quiet) as report:
        compile_model(a.model, a.output, max_seq_len=a.max_seq_len, from_ir=a.from_ir, allow_pickle=a.allow_pickle,
                      log=report, dtype=a.dtype, target=a.target, codegen=not a.no_codegen,
                      prefill_tokens=a.prefill_tokens, max_batch=a.max_batch, kv_block_size=a.kv_block_size, tp=tp,
                      pp=pp, profile=a.profile, memory_per_device=a.memory_per_device, workload=a.workload,
                      quant=a.quant, quant_skip=a.quant_skip, kv_dtype=a.kv_dtype, self_draft=a.self_draft,
                      calibration=a.calibration, memory_budget=a.memory_budget)
    if not a.quiet:
        print(report.summary(), file=sys.stderr)
    if a.memory_budget is not None:       # what loads will run (it builds the weights store once, too)
        budget = parse_memory(a.memory_budget, what="--memory-budget")
        print(format_policy(plan_offload(Artifact.open(a.output), budget).policy.summary), file=sys.stderr)
    print(a.output)


def _build(a) -> None:
    """Rebuild an artifact's kernels from its (possibly edited) sources."""
    # everything but what the build writes is verified first: a build never blesses corruption
    art = Artifact(a.artifact, read_manifest(a.artifact, skip=REBUILT))
    if not art.kernels:
        raise FfcError(f"{art.root} has no generated kernels (compiled with --no-codegen); recompile it")
    log = lambda s: print(f"[ffc] {s}", file=sys.stderr)  # noqa: E731
    build.check_plan(art, log)     # the edited sources may be vouched for, a crafted plan may not
    _, spans = render_sources(art.plan)
    root = art.root
    lib = build.build(root / "kernels", art.plan.target, spans, log=log, reuse=False)
    kernels = dict(art.kernels, library=str(lib.relative_to(root)))
    refresh_manifest(root, {"kernels": kernels})
    print(lib)


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


def _calibrate(a) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    with Reporter() as report:
        prof = calibrate(a.ranks, a.artifact, log=report)
        with report.phase("disk reads, page cache bypassed (offloaded weights)"):
            store = knobs.cache_dir() / "offload"
            store.mkdir(parents=True, exist_ok=True)
            report.note(f"{disk_bandwidth(store, remeasure=True) / 1e9:.2f} GB/s")
    print(report.summary("calibrate"), file=sys.stderr)
    print(save(prof, a.output))


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


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a job scheduler, a container stop) unwinds like Ctrl-C: a compile removes its
    # temporary directory, child processes and ranks are stopped (the server drains on its own)
    if args.cmd != "serve":
        signal.signal(signal.SIGTERM, _terminated)
    handler = {"compile": _compile, "calibrate": _calibrate, "serve": _serve, "build": _build, "bench": _bench,
               "eval": _eval, "run": _run, "inspect": _inspect, "debug": _debug_compare}[args.cmd]
    try:
        handler(args)
    except FfcError as e:
        print(f"ffc: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. `ffc inspect ... | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
