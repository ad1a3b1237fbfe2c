"""Divergence finder: transformers and the IR side by side on one prompt.

For the frontend's IR and after every pass it reports the largest error of the final
logits; then, for the first IR whose logits depart (or the final IR), it walks the
nodes in order and reports the first one whose output departs from the output of the
HF module it came from, with the module path and the printed IR line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ffc.ir import Module, Node, materialize_params, run_graph
from ffc.ir.text import format_node, node_names
from ffc.passes import PIPELINE, PassContext, run_pipeline
from ffc.runtime.model_runner import single_sequence_inputs

from . import frontend, sources
from .artifact import read_manifest


@dataclass
class Divergence:
    stage: str
    module_path: str
    ir_line: str
    error: float


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
        lines = [f"{'stage':36s} max |logits - transformers|"]
        for s, e in self.stages:
            lines.append(f"{s:36s} {e:.3e}{'   <-- departs' if e > self.tolerance else ''}")
        lines.append("")
        if self.first_divergence is None:
            lines.append(f"{self.checked_stage}: all {self.modules_compared} HF module outputs match within "
                         f"{self.tolerance:g}")
        else:
            d = self.first_divergence
            lines.append(f"first divergent node in {d.stage} (relative error {d.error:.3e} > {self.tolerance:g}):")
            lines.append(f"  HF module: {d.module_path}")
            lines.append(f"  IR:        {d.ir_line}")
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
            return Divergence(stage, path, format_node(node, names), err), len(candidates)
    return None, len(candidates)


def compare(model_or_artifact: str, prompt: str, tolerance: float = 1e-4, pipeline=None,
            max_seq_len: Optional[int] = None) -> CompareReport:
    spec = model_or_artifact
    if (Path(spec) / "manifest.json").is_file():
        manifest = read_manifest(spec)
        spec = manifest["model"]["source"]
        max_seq_len = max_seq_len or manifest["options"]["max_seq_len"]
    source = sources.resolve(spec)
    model = sources.load_model(source)
    tok = sources.load_tokenizer(source)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    msl = sources.resolve_max_seq_len(model.config, max_seq_len)
    raw = frontend.raw_weights(model)
    stages: list[tuple[str, Module]] = []
    run_pipeline(frontend.trace(model, msl), pipeline if pipeline is not None else PIPELINE,
                 PassContext(max_seq_len=msl, model=spec),
                 dump=lambda name, mod: stages.append((name[:-3], mod)) if isinstance(mod, Module) else None)
    hf_outputs, ref = hf_module_outputs(model, ids)
    report = CompareReport(tolerance)
    weights_of = {}
    for name, mod in stages:
        weights_of[name] = materialize_params(mod.params, raw)
        g, inputs = _graph_inputs(mod, ids)
        logits, = run_graph(g, weights_of[name], inputs)
        report.stages.append((name, float((logits - ref).abs().max())))
    bad = report.first_bad_stage
    report.checked_stage = bad or stages[-1][0]
    mod = dict(stages)[report.checked_stage]
    report.first_divergence, report.modules_compared = first_divergence(
        report.checked_stage, mod, weights_of[report.checked_stage], ids, hf_outputs, tolerance)
    return report
