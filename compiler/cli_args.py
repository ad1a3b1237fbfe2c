"""The `ffc` command line's arguments: every option of every subcommand, with its help text, and
types that refuse a bad value naming the option (argparse: "argument --port: ...", exit 2)
before any work starts. The README's "Command-line options" lists the same options (a test
keeps them in step).
"""
from __future__ import annotations

import argparse

from ffc.errors import FfcError
from ffc.choices import PHASES, QUANT_MODES

from .util import parse_memory


def _count(low: int = 1, high: int | None = None):
    """An integer option in [low, high]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{v} is out of range: give {low}..{high}" if high is not None
                                             else f"{v} must be >= {low}")
        return v
    return parse


def _size(text: str) -> str:
    """A memory size ("2GiB", "512MB", bytes) or a fraction of available memory (0.3): checked
    here, resolved where it is used (a fraction depends on the device)."""
    try:
        parse_memory(text, what="it")
    except FfcError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give e.g. 2GiB, 512MB, a byte count, or a "
                                         "fraction of available memory such as 0.3") from None
    return text


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def _compile_args(sub) -> None:
    c = sub.add_parser("compile", help="compile a model into an artifact")
    c.add_argument("model", help="alias (smollm2-135m, gemma3-270m), .gguf file, HF folder, or model id in the local HF cache")
    c.add_argument("-o", "--output", help="artifact directory to write (not needed with --dry-run)")
    c.add_argument("--max-seq-len", type=_count(), default=None,
                   help="KV-cache length per sequence (default: the model's context, capped)")
    c.add_argument("--from-ir", default=None, help="compile this (edited) IR dump instead of tracing")
    c.add_argument("--quiet", action="store_true",
                   help="print only errors and the artifact's path (no progress, no summary table)")
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
    c.add_argument("--no-codegen", action="store_true",
                   help="skip kernel generation: the artifact runs on the reference interpreter only")
    c.add_argument("--prefill-tokens", type=_count(), default=2048,
                   help="tokens per prefill step (longer prompts run in chunks)")
    c.add_argument("--max-batch", type=_count(), default=128, help="sequences per decode step")
    c.add_argument("--kv-block-size", type=_count(), default=16, help="positions per paged-KV-cache block")
    c.add_argument("--tp", default="1", help="tensor-parallel degree, or 'auto' (with --devices and --dry-run)")
    c.add_argument("--pp", default="1", help="pipeline-parallel degree, or 'auto' (with --devices and --dry-run)")
    c.add_argument("--devices", type=_count(), default=None,
                   help="devices there are: the splits --tp/--pp auto try; with fixed degrees a check that tp*pp "
                        "fits")
    c.add_argument("--profile", default="local",
                   help="device profile for the cost model: local (this machine, measured by `ffc calibrate`; "
                        "measured on first use), a100-nvlink, a100-pcie, h100-nvlink, h100-pcie, h200-nvlink, "
                        "or a JSON file")
    c.add_argument("--memory-budget", type=_size, default=None,
                   help="RAM the artifact is to run in (weights, their streaming buffers, KV cache): recorded, so "
                        "loads stream what does not fit from disk; the offload policy is printed (with --dry-run: "
                        "before anything is built; ffc inspect ART --policy SIZE explains it)")
    c.add_argument("--memory-per-device", type=_size, default=None,
                   help="memory limit per rank, e.g. 24GiB (default: the profile's device memory)")
    c.add_argument("--workload", default=None,
                   help="what the search optimises for: prompt=512,output=128,batch=8")
    c.add_argument("--dry-run", action="store_true",
                   help="stop before codegen: print per (tp, pp) each rank's memory and predicted latency (and the "
                        "offload policy under --memory-budget)")


def _engine_args(x) -> None:
    x.add_argument("--kv-cache-memory", type=_size, default=None,
                   help="KV-cache pool: a size (2GiB, 512MB) or a fraction of available memory (0.3); "
                        "default 0.2 of it")
    x.add_argument("--max-tokens-per-batch", type=_count(), default=256, help="prefill + decode tokens per step")
    x.add_argument("--max-requests-per-batch", type=_count(), default=None,
                   help="sequences per step (default: the plan's decode batch)")
    x.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share KV blocks between requests with the same prompt prefix")
    x.add_argument("--memory-budget", type=_size, default=None,
                   help="RAM for the weights, their streaming buffers and the KV cache (a size or a fraction of "
                        "available memory): weights that do not fit are streamed from disk, as the policy search "
                        "chooses (printed on stderr; `ffc inspect ART --policy SIZE` explains it)")
    x.add_argument("--no-overlap", action="store_true",
                   help="with --memory-budget: read each streamed layer when it is needed instead of ahead of it "
                        "(the baseline the overlapped schedule is measured against)")
    x.add_argument("--speculative", default=None, metavar="DRAFT",
                   help="speculative decoding: a draft proposes token trees that one step verifies (output "
                        "as without it): ngram (prompt lookup), self (the artifact's --self-draft), a draft "
                        "artifact's path, or ngram+self / ngram+PATH (prompt lookup where the text is copied, "
                        "else the model)")


def _tool_args(sub) -> None:
    ca = sub.add_parser("calibrate", help="measure this machine (GEMM, bandwidth, gloo collectives) into a profile")
    ca.add_argument("--ranks", type=_count(2), default=2,
                    help="local processes the collectives (all-reduce, all-gather, send/recv) are timed over")
    ca.add_argument("--threads", type=_count(), default=None,
                    help="threads per process for the GEMM and bandwidth runs (default: torch's)")
    ca.add_argument("--artifact", default=None,
                    help="also fit the cost of this artifact's generated kernels per family (linear, attention, ...)")
    ca.add_argument("-o", "--output", default=None,
                    help="where to write the profile (default $FFC_CACHE_DIR/profiles/local.json, the one "
                         "--profile local reads)")

    b = sub.add_parser("build", help="rebuild an artifact's kernels from its kernels/src (after an edit)")
    b.add_argument("artifact", help="the artifact directory")

    be = sub.add_parser("bench", help="benchmark an artifact against transformers eager in one run")
    be.add_argument("artifact", help="the artifact directory")
    be.add_argument("--compare", default="transformers", metavar="transformers|none|OTHER.ffc",
                    help="the baseline run side by side: transformers eager, nothing, or another artifact "
                         "(e.g. the fp32 one next to a quantized one)")
    be.add_argument("--runs", type=_count(), default=5, help="timed runs per measure (the median is reported)")
    be.add_argument("--new-tokens", type=_count(2), default=128,
                    help="tokens generated per decode run (capped by the artifact's max_seq_len)")
    be.add_argument("--batch", type=_count(), nargs="+", default=[1, 8, 32], help="decode batch sizes to measure")
    be.add_argument("--prefill", type=_count(), nargs="+", default=[128, 512],
                    help="prompt lengths whose prefill is timed (capped by the artifact's max_seq_len)")
    be.add_argument("--threads", type=_count(), default=None, help="threads for both engines (default: torch's)")
    be.add_argument("--speculative", nargs="+", default=None, metavar="DRAFT",
                    help="instead: plain decoding against each draft (ngram, self, DRAFT.ffc, ngram+self) on chat, rewrite and "
                         "edit workloads at each --batch (--runs rounds, --new-tokens per request)")
    be.add_argument("--trace", metavar="FILE.json", default=None,
                    help="instead: a Chrome/Perfetto trace (ui.perfetto.dev) of one prefill of the first --prefill "
                         "length and one decode step: every kernel on every executor thread and rank, collectives, "
                         "the engine's Python time")

    ev = sub.add_parser("eval", help="perplexity on a text (llama.cpp's windows), KL divergence against a base "
                                     "artifact")
    ev.add_argument("artifact", help="the artifact directory")
    ev.add_argument("--perplexity", required=True, metavar="FILE.txt", help="the text to score")
    ev.add_argument("--ctx", type=_count(2), default=512,
                    help="tokens per window (the second half of each is scored)")
    ev.add_argument("--chunks", type=_count(), default=None, help="score only the first N windows")
    ev.add_argument("--kl-divergence", default=None, metavar="BASE.ffc",
                    help="also compare the next-token distributions with this artifact's (e.g. fp32): mean KL, "
                         "top-1 agreement")
    ev.add_argument("--kv-cache-memory", type=_size, default="256MiB", help="KV pool for the windows")

    i = sub.add_parser("inspect", help="passes, node counts, times, options; IR after a pass; IR diffs")
    i.add_argument("artifact", help="the artifact directory")
    i.add_argument("--ir", metavar="PASS", help="print the IR after PASS (name or part of it)")
    i.add_argument("--plan", nargs="?", const="", default=None, metavar="PHASE",
                   help="kernels, fusion groups (and rejections), arena; with a lowering phase "
                        f"({', '.join(PHASES)}): that phase's dump")
    i.add_argument("--policy", type=_size, default=None, metavar="SIZE",
                   help="the offload policy under a memory budget of SIZE: which weights stay in RAM, which are "
                        "streamed from disk, predicted throughput next to the alternatives")
    i.add_argument("--strategy", action="store_true",
                   help="per op: placement, predicted compute/communication/memory per rank, rejected alternatives")
    i.add_argument("--plot", metavar="FILE.png", default=None,
                   help="with --strategy: a picture of it (per layer: compute, communication, the next-best "
                        "strategies, memory per rank; the whole plan against the others priced)")
    i.add_argument("--diff", nargs=2, metavar=("PASS_A", "PASS_B"),
                   help="unified diff of two IR dumps (with --graph: a picture of what the pass changed)")
    i.add_argument("--graph", nargs="?", const="", default=None, metavar="PASS",
                   help="an SVG of a graph of the IR after PASS (default: the final IR): one transformer layer node "
                        "by node, the others folded; colours: kernel families after lowering; edges: types")
    i.add_argument("--graph-name", default="decode", help="which graph --graph draws (prefill, decode, verify, ...)")
    i.add_argument("--layers", choices=["one", "all"], default="one", help="--graph: draw one layer or all of them")
    i.add_argument("-o", "--output", default=None, metavar="FILE.svg", help="where --graph writes (default graph.svg)")
    i.add_argument("--report", metavar="FILE.html", default=None,
                   help="one self-contained HTML page: manifest, passes, the decode graph, the plan's fusion decisions, "
                        "weights per format, the strategy and its picture, provenance (attach it to a bug report)")

    d = sub.add_parser("debug", help="debugging tools")
    dsub = d.add_subparsers(dest="debug_cmd", required=True)
    dc = dsub.add_parser("compare", help="find where the IR (or an artifact's IR and kernels) departs from "
                                         "transformers")
    dc.add_argument("model", help="model (as for compile): every pass of a fresh trace; or an artifact: its own "
                                  "final IR and kernels")
    dc.add_argument("--prompt", required=True, help="the text both sides run")
    dc.add_argument("--tolerance", type=_nonneg_float, default=1e-4,
                    help="largest error counted as equal, relative to the logits' (or the module output's) scale")
    dc.add_argument("--fail", action="store_true", help="exit 1 when something departs (for scripts and CI)")


def _run_args(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (in-flight batching, paged KV cache)")
    sv.add_argument("artifact", help="the artifact directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=_count(1, 65535), default=8000, help="TCP port to listen on")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the model's name)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="the server's (uvicorn's) log level")
    sv.add_argument("--trace-dir", default=None, metavar="DIR",
                    help="write a Chrome/Perfetto trace of every --trace-every-th engine step here (step<N>.json)")
    sv.add_argument("--trace-every", type=_count(), default=100, help="engine steps per trace written to --trace-dir")
    _engine_args(sv)

    r = sub.add_parser("run", help="generate text with an artifact")
    r.add_argument("artifact", help="the artifact directory")
    r.add_argument("--prompt", help="text to continue (or use --chat)")
    r.add_argument("--chat", help="a user message, formatted with the tokenizer's chat template")
    r.add_argument("--batch-file", metavar="PROMPTS.jsonl", default=None,
                   help="instead: every prompt of a JSON-lines file ({\"prompt\": ...} or {\"messages\": [...]} per "
                        "line, optional id and max_new_tokens) through continuous batching, with progress and tok/s")
    r.add_argument("--output", metavar="OUT.jsonl", default=None,
                   help="with --batch-file: where the results go, one line per prompt in input order")
    r.add_argument("--max-new-tokens", type=_count(), default=64, help="tokens to generate at most")
    r.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0: greedy; higher: more random")
    r.add_argument("--top-k", type=_count(0), default=0, help="sample among the k likeliest tokens (0: all)")
    r.add_argument("--top-p", type=_nonneg_float, default=1.0,
                   help="sample among the likeliest tokens whose probabilities sum to p (1: all)")
    r.add_argument("--repetition-penalty", type=_nonneg_float, default=1.0,
                   help="divide the logits of tokens already seen by this (1: none)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed (0 .. 2**63-1) for reproducible samples")
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    r.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    r.add_argument("--interpreter", action="store_true", help="run the reference interpreter, not the kernels")
    _engine_args(r)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffc", description="ffc: a compiler for LLM inference")
    sub = p.add_subparsers(dest="cmd", required=True)
    _compile_args(sub)
    _tool_args(sub)
    _run_args(sub)
    return p


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "ffc"):
    """(command line prefix, its parser) for every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, p in subs[0].choices.items():
        yield from _subcommands(p, f"{prefix} {name}")


def options_markdown() -> str:
    """The README's option reference: every option of every subcommand with its help text."""
    lines = []
    for cmd, p in _subcommands(build_parser()):
        lines.append(f"`{cmd}`:")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            name = "/".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}`"
            default = "" if a.default in (None, False, argparse.SUPPRESS) or not a.option_strings else \
                f" (default {' '.join(map(str, a.default)) if isinstance(a.default, list) else a.default})"
            lines.append(f"- {name}: {a.help}{default}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
