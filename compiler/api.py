"""``ffc.compile``: model -> IR -> passes -> artifact."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ffc.ir import materialize_params, parse, print_module
from ffc.ir.text import IRParseError
from ffc.passes import PIPELINE, PassContext, run_pipeline
from ffc.passes.pipeline import SEARCH_POINT

from . import __version__, build, frontend, sources
from .codegen import render_sources
from .lower import LoweringError, lower_module
from .artifact import ArtifactWriter
from .errors import FfcError, InvalidRequestError
from .options import MAX_SEQ_LEN_CAP, CompileOptions


def resolve_max_seq_len(config, requested: Optional[int]) -> int:
    limit = frontend.max_positions(config)
    if requested is None:
        return min(limit, MAX_SEQ_LEN_CAP)
    if requested > limit:
        raise InvalidRequestError(f"max_seq_len {requested} exceeds the model's context of {limit} positions")
    return requested


def build_kernels(root: Path, module, options: CompileOptions, log) -> dict:
    """Lower ``module`` to a plan, generate sources, build them; the manifest's ``kernels`` entry."""
    t0 = time.perf_counter()
    plan = lower_module(module, target=options.target, prefill_tokens=options.prefill_tokens,
                        max_batch=options.max_batch)
    kdir = root / "kernels"
    (kdir / "src").mkdir(parents=True, exist_ok=True)
    (kdir / "plan.json").write_text(json.dumps(plan, indent=1))
    sources, spans = render_sources(plan)
    for name, text in sources.items():
        (kdir / "src" / name).write_text(text)
    t1 = time.perf_counter()
    lib = build.build(kdir, options.target, spans, log)
    info = {"plan": "kernels/plan.json", "target": options.target, "library": str(lib.relative_to(root)),
            "unique_kernels": len(plan["kernels"]),
            "launches": {g: len(p["steps"]) for g, p in plan["graphs"].items()},
            "lower_seconds": round(t1 - t0, 2), "build_seconds": round(time.perf_counter() - t1, 2),
            "cflags": build.toolchain(options.target)["cflags"]}
    if options.target == "cpu":
        info["isa"] = build.load_library(lib).isa()
    return info


def load_ir(path: str):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FfcError(f"cannot read IR file {path!r}: {e.strerror}") from None
    try:
        return parse(text)
    except IRParseError as e:
        raise FfcError(f"{path}: {e}") from None


def stage_params(module, stage: int, pp: int) -> set:
    """Weights the graphs of pipeline ``stage`` read (all graphs' when pp == 1)."""
    graphs = [g for n, g in module.graphs.items() if pp == 1 or n.endswith(f"_stage{stage}")]
    return set().union(*(g.param_names() for g in graphs))


def _search_strategy(module, options, profile, memory_per_device, workload, log):
    from .calibrate import profile_for
    from .runtime.kv_cache import parse_memory
    from .search import Workload, search
    prof = profile_for(profile, log).per_rank(options.tp * options.pp)
    w = Workload.parse(workload, max_seq_len=options.max_seq_len, weight_dtype=options.dtype)
    log(f"searching a tp={options.tp} pp={options.pp} strategy on {prof.name}")
    st = search(module, options.tp, options.pp, prof, w, parse_memory(memory_per_device))
    empty = [k for k, stage in enumerate(st.stages) if stage[4] < 0]
    if empty:
        raise InvalidRequestError(f"pipeline stage {empty[0]} would hold no transformer layer (only the embedding "
                                  f"or the lm_head); use fewer stages than --pp {options.pp}")
    log(f"strategy: {st.prediction('collectives'):.0f} collectives, predicted decode step "
        f"{st.prediction('decode_s') * 1e3:.2f} ms")
    return st


def compile_model(model: str, output: str, max_seq_len: Optional[int] = None, from_ir: Optional[str] = None,
                  allow_pickle: bool = False, log: Callable[[str], None] = lambda s: None, *,
                  dtype: str = "fp32", target: str = "cpu", codegen: bool = True,
                  prefill_tokens: int = 2048, max_batch: int = 128, kv_block_size: int = 16,
                  tp: int = 1, pp: int = 1, profile: Optional[str] = None, memory_per_device=None,
                  workload: Optional[str] = None) -> Path:
    """Compile ``model`` into an artifact. ``tp`` > 1: the strategy search (on ``profile``, within
    ``memory_per_device`` per rank, for ``workload``) places every op; the artifact holds one
    weights file per rank and ``ffc.load`` starts the ranks."""
    t0 = time.perf_counter()
    source = sources.resolve(model, allow_pickle=allow_pickle)
    config = sources.load_config(source)
    family = sources.check_architecture(config)
    options = CompileOptions(max_seq_len=resolve_max_seq_len(config, max_seq_len), allow_pickle=allow_pickle,
                             dtype=dtype, target=target, codegen=codegen, prefill_tokens=prefill_tokens,
                             max_batch=max_batch, kv_block_size=kv_block_size, tp=tp, pp=pp)
    with ArtifactWriter(output) as art:
        log(f"loading {model} ({family})")
        hf = sources.load_model(source, allow_pickle)
        tokenizer = sources.load_tokenizer(source)
        if from_ir:
            module = load_ir(from_ir)
            log(f"read IR from {from_ir}")
        else:
            log("tracing with torch.export")
            module = frontend.trace(hf, options.max_seq_len)

        def dump(name, mod):
            art.path(f"ir/{name}").write_text(print_module(mod))
        ctx = PassContext(max_seq_len=options.max_seq_len, model=model, dtype=options.dtype,
                          kv_block_size=options.kv_block_size)
        strategy = None
        result = run_pipeline(module, PIPELINE[:SEARCH_POINT], ctx, dump)
        if tp > 1 or pp > 1:
            strategy = _search_strategy(result.module, options, profile, memory_per_device, workload, log)
            ctx = replace(ctx, tp=tp, tp_plan=tuple((c.node, c.inputs, c.output) for c in strategy.choices),
                          pp_stages=tuple((st[4], st[5]) for st in strategy.stages))
            art.path("parallel/strategy.txt").write_text(strategy.describe() + "\n")
        rest = run_pipeline(result.module, PIPELINE[SEARCH_POINT:], ctx, dump, first=SEARCH_POINT + 1)
        result.records += rest.records
        result.module = final = rest.module
        if pp == 1 and set(final.graphs) != {"prefill", "decode"}:
            raise FfcError(f"the pipeline ended with graphs {sorted(final.graphs)}, expected prefill and decode")
        log("writing weights")
        # only what the graphs read: recipe sources (unfused q/k/v, fp32 originals of narrow
        # weights) are needed at compile time only
        if pp > 1 and set(final.graphs) != {f"{g}_stage{k}" for g in ("prefill", "decode") for k in range(pp)}:
            raise FfcError(f"the pipeline ended with graphs {sorted(final.graphs)}, expected {pp} stages")
        from safetensors.torch import save_file
        raw = frontend.raw_weights(hf)
        for rank in range(tp * pp):   # each rank's file holds only its slices / its stage's weights
            mine = stage_params(final, rank // tp, pp)
            weights = {k: v for k, v in materialize_params(final.params, raw, mine, rank=rank % tp).items()
                       if k in mine}
            save_file({k: v.contiguous() for k, v in weights.items()}, str(art.path(f"weights/rank{rank}.safetensors")))
        tokenizer.save_pretrained(str(art.path("tokenizer")))
        gen = getattr(hf, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else config.eos_token_id
        eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        if tokenizer.eos_token_id is not None:
            eos_ids = sorted(set(eos_ids) | {int(tokenizer.eos_token_id)})
        last_dump = f"{len(result.records):02d}-{result.records[-1].name}.ir"
        kernels = None
        if options.codegen:
            try:
                kernels = build_kernels(art.root, final, options, log)
            except LoweringError as e:
                if tp == 1:
                    raise
                # a plan whose collectives read strided views: its ranks run the interpreter
                log(f"no generated kernels for this tp plan ({e}); the ranks will run the reference interpreter")
                import shutil
                shutil.rmtree(art.path("kernels"), ignore_errors=True)
        manifest = {
            "ffc_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": __import__("transformers").__version__,
            "model": {"source": model, "kind": source.kind, "family": family,
                      "architecture": final.meta.get("arch", ""), "config": config.to_dict()},
            "options": options.to_dict(),
            "options_hash": options.digest(),
            "from_ir": bool(from_ir),
            "passes": [{"index": r.index, "name": r.name, "seconds": round(r.seconds, 4), "nodes": r.nodes,
                        "changed": r.changed} for r in result.records],
            "final_ir": f"ir/{last_dump}",
            "eos_token_ids": eos_ids,
            "kernels": kernels,
            "parallel": None if strategy is None else {
                "tp": tp, "pp": pp, "profile": strategy.profile, "strategy": "parallel/strategy.txt",
                "predicted": dict(strategy.predicted),
                "collectives": {k: sum(1 for c in strategy.collectives if c.kind == k)
                                for k in sorted({c.kind for c in strategy.collectives})}},
            "compile_seconds": round(time.perf_counter() - t0, 2),
        }
        out = art.commit(manifest)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out
