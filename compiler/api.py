"""``ffc.compile``: model -> IR -> passes (with the strategy search) -> plan -> kernels -> artifact."""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from safetensors.torch import save_file

from ffc.ir import Module, materialize_params, parse
from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Strategy, Workload
from ffc.ir.types import DType
from ffc.ir.text import IRParseError
from ffc.lower import PHASES, LoweringError, lower_module
from ffc.passes import PIPELINE, PassContext, run_pipeline
from ffc.passes.manager import dump_name
from ffc.plan.schema import Target
from ffc.runtime.kernel_library import load_library, vouch

from . import __version__, build, frontend, gguf_blocks, provenance, sources, trace_cache
from . import self_draft as drafting
from .artifact import ArtifactWriter
from .calibrate import profile_for
from .codegen import render_sources
from .errors import FfcError, InvalidRequestError
from .options import CompileOptions
from .progress import Reporter
from .search import decode_step_costs, search
from .util import parse_memory

Log = Callable[[str], None]


def build_kernels(root: Path, module: Module, options: CompileOptions, log: Log, final: Path) -> dict:
    """Lower ``module`` to a plan, generate sources, build them; the manifest's ``kernels`` entry.
    Each lowering phase's dump goes to ``kernels/lowering/N-phase.txt``. ``final``: where the
    artifact being written at ``root`` will be."""
    t0 = time.perf_counter()
    dumps: dict[str, list[str]] = {p: [] for p in PHASES}
    plan = lower_module(module, target=options.target, prefill_tokens=options.prefill_tokens,
                        max_batch=options.max_batch, dump=lambda phase, text: dumps[phase].append(text))
    kdir = root / "kernels"
    (kdir / "src").mkdir(parents=True, exist_ok=True)
    (kdir / "lowering").mkdir(exist_ok=True)
    for k, phase in enumerate(PHASES, 1):
        (kdir / "lowering" / f"{k}-{phase}.txt").write_text("\n\n".join(dumps[phase]) + "\n")
    (kdir / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    vouch(kdir / "plan.json")      # lowered here: loads need not lower it again
    srcs, spans = render_sources(plan)
    for name, text in srcs.items():
        (kdir / "src" / name).write_text(text)
    t1 = time.perf_counter()
    lib = build.build(kdir, options.target, spans, log, final=final / "kernels")
    info = {"plan": "kernels/plan.json", "target": options.target.value, "library": str(lib.relative_to(root)),
            "unique_kernels": len(plan.kernels),
            "launches": {g: len(p.steps) for g, p in plan.graphs.items()},
            "lower_seconds": round(t1 - t0, 2), "build_seconds": round(time.perf_counter() - t1, 2),
            "cflags": build.toolchain(options.target)["cflags"]}
    if options.target is Target.CPU:
        info["isa"] = load_library(lib).isa()
    return info


def load_ir(path: str) -> Module:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FfcError(f"cannot read IR file {path!r}: {e.strerror}") from None
    try:
        return parse(text)
    except IRParseError as e:
        raise FfcError(f"{path}: {e}") from None


def strategy_planner(options: CompileOptions, log: Log) -> Callable[[Module, PassContext], Strategy]:
    """The pipeline's search step, on the options' profile, memory limit and workload."""
    def plan(module: Module, ctx: PassContext) -> Strategy:
        prof = profile_for(options.profile, log).per_rank(options.tp * options.pp)
        report = Reporter.of(log)
        with report.phase(f"search a tp={options.tp} pp={options.pp} strategy on {prof.name}"):
            st = search(module, options.tp, options.pp, prof, options.workload, options.memory_per_device)
            report.note(f"{st.predicted.collectives} collectives, predicted decode step "
                        f"{st.predicted.decode_s * 1e3:.2f} ms")
        return st
    return plan


def weight_summary(module: Module) -> dict:
    """The manifest's ``weights``: each weight the graphs read, its format, and bytes per format
    (shapes as the IR declares them: a tensor-parallel rank's own)."""
    formats, per = {}, {}
    stored = set().union(*(g.param_names() for g in module.graphs.values()))
    for name, p in sorted(module.params.items()):
        if name not in stored:
            continue
        shape = p.type.storage_shape()
        nbytes = int(math.prod(shape)) * p.type.dtype.itemsize
        formats[name] = p.type.dtype.value
        f = per.setdefault(p.type.dtype.value, {"tensors": 0, "bytes": 0})
        f["tensors"] += 1
        f["bytes"] += nbytes
    out = {"formats": formats, "bytes_per_format": per}
    if "quant" in module.meta:
        out["quant"] = module.meta["quant"]
    return out


def _eos_ids(hf, config, tokenizer) -> list[int]:
    gen = getattr(hf, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else config.eos_token_id
    ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def compile_model(model: str, output: str, max_seq_len: Optional[int] = None, from_ir: Optional[str] = None,
                  allow_pickle: bool = False, log: Log = lambda s: None, *,
                  dtype: str = "fp32", target: str = "cpu", codegen: bool = True,
                  prefill_tokens: int = 2048, max_batch: int = 128, kv_block_size: int = 16,
                  tp: int = 1, pp: int = 1, profile: Optional[str] = None, memory_per_device=None,
                  workload: Optional[str] = None, quant: Optional[str] = None, quant_skip=None,
                  kv_dtype: str = "fp32", self_draft: Optional[str] = None, calibration: Optional[str] = None,
                  memory_budget=None, _prepared: Optional[tuple] = None, _final: Optional[Path] = None) -> Path:
    """Compile ``model`` into an artifact. ``tp`` > 1: the strategy search (on ``profile``, within
    ``memory_per_device`` per rank, for ``workload``) places every op; the artifact holds one
    weights file per rank and ``ffc.load`` starts the ranks. ``quant``: weights stored in blocks
    (``gguf``: as the model's GGUF file holds them; or a format, see ``ffc.ir.quant``),
    ``quant_skip``: tensor classes kept float; ``kv_dtype``: the KV cache's storage.
    ``self_draft``: also derive a draft for speculative decoding (self_draft.py) with weights in
    this storage ("auto": the GGUF file's blocks, else int4-g32), layers chosen on the
    ``calibration`` text file (default: the model's own answers to a few prompts).
    ``memory_budget``: recorded in the manifest; ``ffc.load`` then streams the weights that do not
    fit from disk (compiler/offload_policy.py) unless given another budget."""
    t0 = time.perf_counter()
    log = report = Reporter.of(log)
    with report.phase(f"resolve {model}"):           # a GGUF file is converted once (cached)
        source = sources.resolve(model, allow_pickle=allow_pickle)
        config = sources.load_config(source)
    family = sources.check_architecture(config, log)
    msl = sources.resolve_max_seq_len(config, max_seq_len)
    policy = QuantPolicy.parse(quant, quant_skip)
    if policy.mode == "gguf" and source.gguf is None:
        raise InvalidRequestError(f"--quant gguf runs the blocks of a GGUF file, but {model!r} is not one; give a "
                                  ".gguf file or a GGUF alias, or quantize with --quant q4_0|q8_0|int4-g32|int8")
    linear_fmt = gguf_blocks.linear_format(policy, source.gguf)
    draft_policy = draft_fmt = calib_text = None
    if self_draft is not None:
        if self_draft == "auto":
            self_draft = "gguf" if source.gguf is not None else "int4-g32"
        draft_policy = QuantPolicy.parse(None if self_draft == "none" else self_draft)
        if draft_policy.mode == "gguf" and source.gguf is None:
            raise InvalidRequestError(f"--self-draft gguf takes the blocks of a GGUF file, but {model!r} is not one; "
                                      "use --self-draft auto or a format (q4_0, int4-g32, ...)")
        draft_fmt = gguf_blocks.linear_format(draft_policy, source.gguf)
        if calibration is not None:
            try:
                calib_text = Path(calibration).read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise InvalidRequestError(f"cannot read the --calibration text {calibration!r}: {e}") from None
    options = CompileOptions(max_seq_len=msl, allow_pickle=allow_pickle, dtype=dtype, target=target,
                             quant=policy, kv_dtype=kv_dtype,
                             codegen=codegen, prefill_tokens=prefill_tokens, max_batch=max_batch,
                             kv_block_size=kv_block_size, tp=tp, pp=pp, profile=profile or "local",
                             memory_per_device=parse_memory(memory_per_device, what="memory_per_device"),
                             workload=Workload.parse(workload, max_seq_len=msl, weight_dtype=linear_fmt or dtype,
                                                     kv_dtype=kv_dtype),
                             memory_budget=parse_memory(memory_budget, what="memory_budget"))
    with ArtifactWriter(output) as art:
        if _prepared is not None:       # a self-draft: the target's model, reduced
            hf, tokenizer, blocks = _prepared
            raw = frontend.raw_weights(hf)
        else:
            with report.phase(f"load the {family} model"):
                hf = sources.load_model(source, allow_pickle)
                tokenizer = sources.load_tokenizer(source)
                raw = frontend.raw_weights(hf)
            blocks = {}
        if policy.mode == "gguf" and _prepared is None:
            with report.phase(f"read the quantized blocks of {Path(source.gguf).name}"):
                blocks = gguf_blocks.read_blocks(source.gguf, config, raw)
        if from_ir:
            module = load_ir(from_ir)
            log(f"read IR from {from_ir}")
        else:
            with report.phase("trace with torch.export"):
                module = trace_cache.trace(hf, options.max_seq_len)

        def dump(name, module, text):
            art.path(f"ir/{name}").write_text(text)
            report.advance()
        spec_costs: dict = {}

        one_rank = []

        def price_steps(module):        # the cost model's step times, on the graph the search plans
            spec_costs.update(speculation_costs(module, options, draft_fmt or options.workload.weight_dtype, log))
            try:    # the one-rank plan next to the chosen one (it may not fit the memory limit)
                one_rank.append(search(module, 1, 1, profile_for(options.profile, log).per_rank(1),
                                       options.workload, options.memory_per_device, explain=False).predicted)
            except InvalidRequestError as e:
                one_rank.append(str(e))
        ctx = PassContext(max_seq_len=options.max_seq_len, model=model, dtype=options.dtype, quant=policy,
                          source_formats={k: fmt for k, (fmt, _) in blocks.items()}, kv_dtype=options.kv_dtype,
                          kv_block_size=options.kv_block_size, tp=tp, pp=pp, planner=strategy_planner(options, log),
                          on_search_point=price_steps)
        with report.phase(f"run {len(PIPELINE)} passes", total=len(PIPELINE) + 1):
            result = run_pipeline(module, PIPELINE, ctx, dump)
        final, strategy = result.module, result.ctx.strategy
        kinds = ("prefill", "decode") + (("verify",) if any(g.startswith("verify") for g in final.graphs) else ())
        expected = set(kinds) if pp == 1 else {f"{g}_stage{k}" for g in kinds for k in range(pp)}
        if set(final.graphs) != expected:
            raise FfcError(f"the pipeline ended with graphs {sorted(final.graphs)}, expected {sorted(expected)}")
        if strategy is not None:
            art.path("parallel/strategy.txt").write_text(strategy.describe() + "\n")
            art.path("parallel/strategy.json").write_text(json.dumps(strategy.to_json()))
        with report.phase(f"write weights ({tp * pp} file{'s' if tp * pp > 1 else ''})", total=tp * pp):
            # only what the graphs read: recipe sources (unfused q/k/v, fp32 originals of narrow
            # weights) are needed at compile time only
            t1, written = time.perf_counter(), 0
            for rank in range(tp * pp):   # each rank's file holds only its slices / its stage's weights
                mine = final.stage_params(rank // tp, pp)
                weights = {k: v for k, v in materialize_params(final.params, raw, mine, rank=rank % tp,
                                                               blocks=blocks).items() if k in mine}
                path = art.path(f"weights/rank{rank}.safetensors")
                save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
                written += path.stat().st_size
                report.advance()
            report.note(f"{written / 1e6:.1f} MB at {written / 1e6 / max(time.perf_counter() - t1, 1e-6):.0f} MB/s")
        tokenizer.save_pretrained(str(art.path("tokenizer")))
        kernels = None
        if options.codegen:
            try:
                with report.phase("lower and build kernels"):
                    kernels = build_kernels(art.root, final, options, log, Path(_final or art.output))
            except LoweringError as e:
                if tp == 1:
                    raise
                # a plan whose collectives read strided views: its ranks run the interpreter
                log(f"no generated kernels for this tp plan ({e}); the ranks will run the reference interpreter")
                shutil.rmtree(art.path("kernels"), ignore_errors=True)
        speculative = {"verify_cost": spec_costs["curve"]} if "verify" in kinds and spec_costs else {}
        if self_draft is not None:
            if "verify" not in kinds:
                raise InvalidRequestError("--self-draft: this model has no verify graph (sliding-window attention), "
                                          "so it cannot decode speculatively; compile without --self-draft")
            with report.phase("self-draft: choose its layers, compile it"):
                speculative["self_draft"] = build_self_draft(
                    art, model, hf, tokenizer, blocks, source, spec_costs, draft_policy, calib_text, log,
                    max_seq_len=msl, allow_pickle=allow_pickle, dtype=dtype, target=target, codegen=codegen,
                    prefill_tokens=prefill_tokens, max_batch=max_batch, kv_block_size=kv_block_size,
                    kv_dtype=kv_dtype)
        last = result.records[-1]
        prof = profile_for(options.profile, log)
        manifest = {
            "ffc_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "model": {"source": model, "kind": source.kind, "family": family,
                      "architecture": final.meta.get("arch", ""), "config": config.to_dict()},
            "options": options.to_dict(),
            "options_hash": options.digest(),
            "from_ir": bool(from_ir),
            "passes": [{"index": r.index, "name": r.name, "seconds": round(r.seconds, 4), "nodes": r.nodes,
                        "changed": r.changed} for r in result.records],
            "final_ir": f"ir/{dump_name(last.index, last.name)}",
            "eos_token_ids": _eos_ids(hf, config, tokenizer),
            "weights": weight_summary(final),
            "kernels": kernels,
            "parallel": None if strategy is None else {
                "tp": tp, "pp": pp, "profile": strategy.profile, "strategy": "parallel/strategy.txt",
                "predicted": asdict(strategy.predicted), "collectives": strategy.collective_counts()},
            "provenance": provenance.record(source, options, prof, one_rank[0] if one_rank else None,
                                            options.memory_per_device or prof.per_rank(tp * pp).memory_bytes),
            "compile_seconds": round(time.perf_counter() - t0, 2),
        }
        if speculative:
            manifest["speculative"] = speculative
        out = art.commit(manifest)
    if _final is None:      # the outermost artifact is in place: its builds read its sources there
        build.settle(out)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out


VERIFY_COST_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


def speculation_costs(module: Module, options: CompileOptions, draft_fmt: DType, log: Log) -> dict:
    """The cost model's step times speculative decoding is planned with (one rank): the
    target's step over T tokens against one (the manifest's speculative.verify_cost, the tree
    shapes' prior), and per layer and the rest in a self-draft's weight storage."""
    prof = profile_for(options.profile, log).per_rank(1)
    w = options.workload
    steps = {}
    for t in VERIFY_COST_TOKENS:
        per, rest = decode_step_costs(module, prof, w, t)
        steps[t] = sum(per.values()) + rest
    per_d, rest_d = decode_step_costs(module, prof, replace(w, weight_dtype=draft_fmt), 1)
    return {"target": steps[1], "layers": per_d, "rest": rest_d,
            "curve": {str(t): round(steps[t] / steps[1], 4) for t in VERIFY_COST_TOKENS}}


def build_self_draft(art: ArtifactWriter, model: str, hf, tokenizer, blocks: dict, source, costs: dict,
                     policy: QuantPolicy, calibration: Optional[str], log: Log, **compile_options) -> dict:
    """Choose the self-draft's layers and compile it into ``draft/`` (see self_draft.py); its
    manifest entry."""
    fmt = gguf_blocks.linear_format(policy, source.gguf) if policy.enabled else None
    log("self-draft: calibration sequences")
    seqs = drafting.calibration_sequences(hf, tokenizer, calibration)
    q_hf = drafting.quantized_copy(hf, None if policy.mode in ("gguf", "none") else fmt)

    def cost(skip: list[int]) -> float:
        return (sum(t for layer, t in costs["layers"].items() if layer not in skip) + costs["rest"]) / costs["target"]
    choice = drafting.choose(hf, q_hf, seqs, cost, costs["curve"], policy.mode, log)
    log(f"self-draft: skipping layers {choice.skip_layers or 'none'} ({policy.mode} weights): acceptance "
        f"{choice.acceptance:.3f}, predicted speed-up {choice.speedup:.2f}x")
    d_hf, rename = drafting.draft_model(hf, choice.skip_layers)
    d_blocks = drafting.rename_blocks(blocks, rename) if blocks else {}
    if policy.mode == "gguf" and not d_blocks:
        d_blocks = drafting.rename_blocks(gguf_blocks.read_blocks(source.gguf, hf.config, frontend.raw_weights(hf)),
                                            rename)
    compile_model(model, str(art.path("draft")), log=lambda s: log(f"  draft: {s}"),
                  quant=None if policy.mode == "none" else policy.mode, _prepared=(d_hf, tokenizer, d_blocks),
                  _final=art.output / "draft",
                  **compile_options)
    return choice.manifest("draft")
