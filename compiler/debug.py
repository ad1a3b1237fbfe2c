"""Divergence finder: transformers and the IR side by side on one prompt.

For a model: for the frontend's IR and after every pass it reports the largest error of the
final logits; then, for the first IR whose logits depart (or the final IR), it walks the
nodes in order and reports the first one whose output departs from the output of the HF
module it came from, with the module path and the printed IR line.

For an artifact: what that artifact runs, not a fresh trace of its source model - its own
final IR on its own weights (the interpreter) and its generated kernels, each against
transformers on the artifact's source model; then the node walk on its final IR. An
artifact compiled ``--from-ir`` with an edited IR is checked as edited.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ffc.ir import Module, Node, materialize_params, run_graph
from ffc.ir.text import format_node, node_names
from ffc.passes import PIPELINE, PassContext, run_pipeline
from ffc.runtime.llm import LLM
from ffc.runtime.model_runner import Chunk, single_sequence_inputs

from . import frontend, sources
from .artifact import read_manifest
from .build import library_for


@dataclass
class Divergence:
    stage: str
    module_path: str
    ir_line: str
    error: float
    module_lines: tuple = ()     # the IR lines of every node that came from that module itself


@dataclass
class CompareReport:
    tolerance: float
    stages: list[tuple[str, float]] = field(default_factory=list)   # (stage, max |logits error|)
    checked_stage: str = ""
    first_divergence: Optional[Divergence] = None
    modules_compared: int = 0

    @property
    def first_bad_stage(self) -> Optional[str]:
        return next((s for s, e in self.stages if e > self.tolerance), None)

    def format(self) -> str:
        lines = [f"{'stage':44s} max |logits - transformers| / (1 + max |transformers|)"]
        for s, e in self.stages:
            lines.append(f"{s:44s} {e:.3e}{'   <-- departs' if e > self.tolerance else ''}")
        lines.append("")
        if self.first_divergence is None:
            lines.append(f"{self.checked_stage}: all {self.modules_compared} HF module outputs match within "
                         f"{self.tolerance:g}")
        else:
            d = self.first_divergence
            lines.append(f"first divergent node in {d.stage} (relative error {d.error:.3e} > {self.tolerance:g}):")
            lines.append(f"  HF module: {d.module_path}")
            lines.append(f"  IR:        {d.ir_line}")
            others = [ln for ln in d.module_lines if ln != d.ir_line]
            if others:
                lines.append(f"  the module's other nodes ({len(others)}):")
                lines += [f"    {ln}" for ln in others[:12]]
        return "\n".join(lines)


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        x = x.to_tuple()
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def hf_module_outputs(model, ids: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Every named module's tensor outputs on ``ids``, and the logits."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: captured.__setitem__(name, [t.detach() for t in _first_tensor(o)])))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return captured, logits


def _graph_inputs(module: Module, ids: torch.Tensor):
    t = ids.shape[1]
    if "forward" in module.graphs:
        return module.graphs["forward"], {"input_ids": ids, "position_ids": torch.arange(t)[None]}
    g = module.graphs["prefill"]
    return g, single_sequence_inputs(g, ids, logits="all")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / (1.0 + b.float().abs().max()))


def first_divergence(stage: str, module: Module, weights, ids, hf_outputs, tol) -> tuple[Optional[Divergence], int]:
    g, inputs = _graph_inputs(module, ids)
    values: dict[Node, torch.Tensor] = {}
    run_graph(g, weights, inputs, hook=lambda n, v: values.__setitem__(n, v))
    order = {n: k for k, n in enumerate(g.nodes)}
    # A module's output is the last node that came from the module or one of its children
    # and has the shape of one of the module's outputs.
    candidates: list[tuple[int, str, Node, list[torch.Tensor]]] = []
    for path, outs in hf_outputs.items():
        best = None
        for n in g.nodes:
            if (n.origin.module == path or n.origin.module.startswith(path + ".")) and \
                    any(tuple(o.shape) == tuple(values[n].shape) for o in outs):
                best = n
        if best is not None:
            candidates.append((order[best], path, best, outs))
    candidates.sort(key=lambda c: c[0])
    names = node_names(g)
    for _, path, node, outs in candidates:
        v = values[node]
        err = min(_rel_err(v, o) for o in outs if tuple(o.shape) == tuple(v.shape))
        if err > tol:
            own = tuple(format_node(n, names) for n in g.nodes if n.origin.module == path)
            return Divergence(stage, path, format_node(node, names), err, own), len(candidates)
    return None, len(candidates)


def compare(model_or_artifact: str, prompt: str, tolerance: float = 1e-4, pipeline=None,
            max_seq_len: Optional[int] = None) -> CompareReport:
    """A model (as for compile) through a fresh trace and every pass; an artifact directory
    through what it holds (compare_artifact)."""
    if (Path(model_or_artifact) / "manifest.json").is_file():
        return compare_artifact(model_or_artifact, prompt, tolerance)
    source = sources.resolve(model_or_artifact)
    model = sources.load_model(source)
    ids = _prompt_ids(source, prompt)
    msl = sources.resolve_max_seq_len(model.config, max_seq_len)
    raw = frontend.raw_weights(model)
    stages: list[tuple[str, Module]] = []
    run_pipeline(frontend.trace(model, msl), pipeline if pipeline is not None else PIPELINE,
                 PassContext(max_seq_len=msl, model=model_or_artifact),
                 dump=lambda name, mod, text: stages.append((name[:-3], mod)) if mod is not None else None)
    hf_outputs, ref = hf_module_outputs(model, ids)
    report = CompareReport(tolerance)
    weights_of = {}
    for name, mod in stages:
        weights_of[name] = materialize_params(mod.params, raw)
        g, inputs = _graph_inputs(mod, ids)
        logits, = run_graph(g, weights_of[name], inputs)
        report.stages.append((name, _rel_err(logits, ref)))
    bad = report.first_bad_stage
    report.checked_stage = bad or stages[-1][0]
    mod = dict(stages)[report.checked_stage]
    report.first_divergence, report.modules_compared = first_divergence(
        report.checked_stage, mod, weights_of[report.checked_stage], ids, hf_outputs, tolerance)
    return report


def _prompt_ids(source, prompt: str) -> torch.Tensor:
    return torch.tensor([sources.load_tokenizer(source)(prompt)["input_ids"]])


def compare_artifact(path: str, prompt: str, tolerance: float = 1e-4) -> CompareReport:
    """The artifact's final IR (the interpreter, on the artifact's weights) and its kernels
    (last position's logits) against transformers on the artifact's source model; then the
    node walk on the final IR. An artifact of several ranks has its kernels checked only."""
    manifest = read_manifest(path)
    source = sources.resolve(manifest["model"]["source"])
    model = sources.load_model(source)
    ids = _prompt_ids(source, prompt)
    hf_outputs, ref = hf_module_outputs(model, ids)
    report = CompareReport(tolerance)
    final = f"artifact IR {manifest['final_ir']}"
    one_rank = not manifest.get("parallel") or manifest["parallel"]["tp"] * manifest["parallel"]["pp"] == 1
    if one_rank:
        interp = LLM.load(path, backend="interpreter")
        g, inputs = _graph_inputs(interp.module, ids)
        logits, = run_graph(g, interp.weights, inputs)
        interp.close()
        report.stages.append((final, _rel_err(logits, ref)))
    if manifest.get("kernels"):
        llm = LLM.load(path, kernel_library=library_for)
        try:
            report.stages.append(("artifact kernels (last position)",
                                  _rel_err(_kernel_logits(llm, ids[0].tolist()), ref[0, -1])))
        finally:
            llm.close()
    report.checked_stage = final
    if one_rank:
        report.first_divergence, report.modules_compared = first_divergence(
            final, interp.module, interp.weights, ids, hf_outputs, tolerance)
    return report


def _kernel_logits(llm, ids: list[int]) -> torch.Tensor:
    """The compiled plan's logits after a prefill of ``ids`` (blocks of the engine's pool)."""
    pool = llm.engine.pool
    blocks = pool.allocate(pool.blocks_for(len(ids)))
    try:
        return llm.runner.forward([Chunk(list(ids), 0, blocks)], pool.tensor)[0]
    finally:
        pool.free(blocks)
