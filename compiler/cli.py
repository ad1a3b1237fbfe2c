"""The `ffc` command line: compile, run, inspect, debug compare."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import torch

import ffc
from ffc.ir.quant import QUANT_MODES, QuantPolicy
from ffc.ir.strategy import Workload
from ffc.lower import PHASES
from ffc.lower.describe import describe_plan
from ffc.runtime.server import serve

from . import build
from .api import compile_model
from .artifact import REBUILT, Artifact, read_manifest, refresh_manifest
from .bench import format_bench, run_bench
from .spec_bench import format_spec_bench, run_spec_bench
from .calibrate import calibrate, profile_for, save
from .codegen import render_sources
from .debug import compare
from .errors import FfcError
from .evaluate import evaluate, read_text
from .parallel import dry_run
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
    compile_model(a.model, a.output, max_seq_len=a.max_seq_len, from_ir=a.from_ir, allow_pickle=a.allow_pickle,
                  log=lambda s: print(f"[ffc] {s}", file=sys.stderr), dtype=a.dtype, target=a.target,
                  codegen=not a.no_codegen, prefill_tokens=a.prefill_tokens, max_batch=a.max_batch,
                  kv_block_size=a.kv_block_size, tp=tp, pp=pp, profile=a.profile, memory_per_device=a.memory_per_device,
                  workload=a.workload, quant=a.quant, quant_skip=a.quant_skip, kv_dtype=a.kv_dtype,
                  self_draft=a.self_draft, calibration=a.calibration)
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
    res = run_bench(a.artifact, compare=a.compare, runs=a.runs, new_tokens=a.new_tokens,
                    batches=tuple(a.batch), prefill_lens=tuple(a.prefill), threads=a.threads,
                    log=lambda s: print(f"[ffc] {s}", file=sys.stderr))
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
    prof = calibrate(a.ranks, a.artifact, log=lambda s: print(f"[ffc] {s}", file=sys.stderr))
    print(save(prof, a.output))


def _engine(a) -> dict:
    return dict(kv_cache_memory=a.kv_cache_memory, max_tokens_per_batch=a.max_tokens_per_batch,
                max_requests_per_batch=a.max_requests_per_batch, prefix_caching=not a.no_prefix_caching)


def _serve(a) -> None:
    serve(a.artifact, host=a.host, port=a.port, model_name=a.model_name, log_level=a.log_level,
          speculative=a.speculative, **_engine(a))


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=tuple(a.stop or ()), ignore_eos=a.ignore_eos, speculative=a.speculative)


def _run(a) -> None:
    if (a.prompt is None) == (a.chat is None):
        raise FfcError("give exactly one of --prompt TEXT or --chat TEXT")
    llm = ffc.load(a.artifact, backend="interpreter" if a.interpreter else None, **_engine(a))
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


def _find_dump(root: Path, key: str) -> Path:
    dumps = sorted([*(root / "ir").glob("*.ir"), *(root / "ir").glob("*.txt")])   # passes' IR, decisions' text
    exact = [d for d in dumps if d.stem.split("-", 1)[-1] == key or d.stem == key]
    hits = exact or [d for d in dumps if key in d.stem]
    if len(hits) > 1 and not exact:
        raise FfcError(f"--ir {key!r} matches several passes ({', '.join(d.stem for d in hits)}); be more precise")
    if not hits:
        raise FfcError(f"no IR dump matches {key!r}; dumps: {', '.join(d.stem for d in dumps)}")
    return hits[-1] if exact else hits[0]


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
    if a.strategy:
        par = m.get("parallel")
        if not par:
            raise FfcError(f"{root} was compiled for one rank (no strategy); compile with --tp N, or see "
                           "`ffc compile MODEL --tp N --dry-run`")
        print(art.path(par["strategy"], "parallel.strategy").read_text(), end="")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffc", description="ffc: a compiler for LLM inference")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact")
    c.add_argument("model", help="alias (smollm2-135m), .gguf file, HF folder, or model id in the local HF cache")
    c.add_argument("-o", "--output", help="artifact directory to write (not needed with --dry-run)")
    c.add_argument("--max-seq-len", type=int, default=None, help="KV-cache length per sequence")
    c.add_argument("--from-ir", default=None, help="compile this (edited) IR dump instead of tracing")
    c.add_argument("--allow-pickle", action="store_true", help="accept pickle checkpoints (runs their code!)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="storage type of weights (computation is fp32)")
    c.add_argument("--quant", default="none", choices=list(QUANT_MODES),
                   help="weights in quantized blocks: gguf (each weight as the model's GGUF file stores it, no "
                        "round trip through float), q4_0, q4_1, q8_0, int4-g32, int4-g64 (group-wise min/scale), "
                        "int8 (a scale per row); the lm_head and embedding get q8_0 with 4-bit formats")
    c.add_argument("--quant-skip", default=None, metavar="CLASSES",
                   help="tensor classes kept in float with --quant: lm_head, embed (comma-separated)")
    c.add_argument("--kv-dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                   help="storage of the KV cache (int8: a scale per position and head; 4x the tokens of fp32)")
    c.add_argument("--self-draft", nargs="?", const="auto", default=None, choices=["auto", "none", *QUANT_MODES[1:]],
                   help="also compile a draft for speculative decoding (ffc run --speculative self): the model "
                        "without the layers that measured acceptance and the cost model say to skip, its weights "
                        "in this storage (auto: the GGUF file's blocks, else int4-g32; none: as the target's)")
    c.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="text the self-draft's acceptance is measured on (default: the model's own answers to a "
                        "few prompts)")
    c.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="generated kernels for this device")
    c.add_argument("--no-codegen", action="store_true", help="skip kernel generation (interpreter only)")
    c.add_argument("--prefill-tokens", type=int, default=2048, help="tokens per prefill step (longer: chunks)")
    c.add_argument("--max-batch", type=int, default=128, help="sequences per decode step")
    c.add_argument("--kv-block-size", type=int, default=16, help="positions per paged-KV-cache block")
    c.add_argument("--tp", default="1", help="tensor-parallel degree, or 'auto' (with --devices)")
    c.add_argument("--pp", default="1", help="pipeline-parallel degree, or 'auto' (with --devices)")
    c.add_argument("--devices", type=int, default=None, help="devices there are: the splits --tp/--pp auto try; with fixed degrees a check that tp*pp fits")
    c.add_argument("--profile", default="local",
                   help="device profile for the cost model: local (this machine, measured by `ffc calibrate`; "
                        "measured on first use), a100-nvlink, a100-pcie, h100-nvlink, h100-pcie, h200-nvlink, "
                        "or a JSON file")
    c.add_argument("--memory-per-device", default=None, help="memory limit per rank, e.g. 24GiB (default: the "
                                                             "profile's device memory)")
    c.add_argument("--workload", default=None, help="what to optimise for: prompt=512,output=128,batch=8")
    c.add_argument("--dry-run", action="store_true",
                   help="stop before codegen: print per (tp, pp) each rank's memory and predicted latency")
    c.set_defaults(fn=_compile)

    ca = sub.add_parser("calibrate", help="measure this machine (GEMM, bandwidth, gloo collectives) into a profile")
    ca.add_argument("--ranks", type=int, default=2, help="local processes for the collectives")
    ca.add_argument("--threads", type=int, default=None)
    ca.add_argument("--artifact", default=None,
                    help="also fit the cost of this artifact's generated kernels per family (linear, attention, ...)")
    ca.add_argument("-o", "--output", default=None, help="where to write it (default $FFC_CACHE_DIR/profiles/"
                                                         "local.json)")
    ca.set_defaults(fn=_calibrate)

    def engine_options(x):
        x.add_argument("--kv-cache-memory", default=None,
                       help="KV-cache pool: a size (2GiB, 512MB) or a fraction of available memory (0.3); "
                            "default 0.2 of it")
        x.add_argument("--max-tokens-per-batch", type=int, default=256, help="prefill + decode tokens per step")
        x.add_argument("--max-requests-per-batch", type=int, default=None,
                       help="sequences per step (default: the plan's decode batch)")
        x.add_argument("--no-prefix-caching", action="store_true",
                       help="do not share KV blocks between requests with the same prompt prefix")
        x.add_argument("--speculative", default=None, metavar="DRAFT",
                       help="speculative decoding: a draft proposes token trees that one step verifies (output "
                            "as without it): ngram (prompt lookup), self (the artifact's --self-draft) or a draft artifact's path")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (in-flight batching, paged KV cache)")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the model's name)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    engine_options(sv)
    sv.set_defaults(fn=_serve)

    b = sub.add_parser("build", help="rebuild an artifact's kernels from its kernels/src")
    b.add_argument("artifact")
    b.set_defaults(fn=_build)

    be = sub.add_parser("bench", help="benchmark an artifact against transformers eager in one run")
    be.add_argument("artifact")
    be.add_argument("--compare", default="transformers", metavar="transformers|none|OTHER.ffc",
                    help="the baseline run side by side: transformers eager, nothing, or another artifact "
                         "(e.g. the fp32 one next to a quantized one)")
    be.add_argument("--runs", type=int, default=5)
    be.add_argument("--new-tokens", type=int, default=128)
    be.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    be.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    be.add_argument("--threads", type=int, default=None)
    be.add_argument("--speculative", nargs="+", default=None, metavar="DRAFT",
                    help="instead: plain decoding against each draft (ngram, self, DRAFT.ffc) on chat, rewrite and "
                         "edit workloads at each --batch (--runs rounds, --new-tokens per request)")
    be.set_defaults(fn=_bench)

    ev = sub.add_parser("eval", help="perplexity on a text (llama.cpp's windows), KL divergence against a base "
                                     "artifact")
    ev.add_argument("artifact")
    ev.add_argument("--perplexity", required=True, metavar="FILE.txt", help="the text to score")
    ev.add_argument("--ctx", type=int, default=512, help="tokens per window (the second half of each is scored)")
    ev.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    ev.add_argument("--kl-divergence", default=None, metavar="BASE.ffc",
                    help="also compare the next-token distributions with this artifact's (e.g. fp32): mean KL, "
                         "top-1 agreement")
    ev.add_argument("--kv-cache-memory", default="256MiB", help="KV pool for the windows")
    ev.set_defaults(fn=_eval)

    r = sub.add_parser("run", help="generate text with an artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt")
    r.add_argument("--chat", help="a user message, formatted with the tokenizer's chat template")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true")
    r.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    r.add_argument("--interpreter", action="store_true", help="run the reference interpreter, not the kernels")
    engine_options(r)
    r.set_defaults(fn=_run)

    i = sub.add_parser("inspect", help="passes, node counts, times, options; IR after a pass; IR diffs")
    i.add_argument("artifact")
    i.add_argument("--ir", metavar="PASS", help="print the IR after PASS (name or part of it)")
    i.add_argument("--plan", nargs="?", const="", default=None, metavar="PHASE",
                   help="kernels, fusion groups (and rejections), arena; with a lowering phase "
                        f"({', '.join(PHASES)}): that phase's dump")
    i.add_argument("--strategy", action="store_true",
                   help="per op: placement, predicted compute/communication/memory per rank, rejected alternatives")
    i.add_argument("--diff", nargs=2, metavar=("PASS_A", "PASS_B"), help="unified diff of two IR dumps")
    i.set_defaults(fn=_inspect)

    d = sub.add_parser("debug", help="debugging tools")
    dsub = d.add_subparsers(dest="debug_cmd", required=True)
    dc = dsub.add_parser("compare", help="find where the IR departs from transformers")
    dc.add_argument("model", help="model (as for compile) or an artifact")
    dc.add_argument("--prompt", required=True)
    dc.add_argument("--tolerance", type=float, default=1e-4)
    dc.add_argument("--fail", action="store_true", help="exit 1 when something departs")
    dc.set_defaults(fn=_debug_compare)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
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
