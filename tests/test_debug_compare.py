"""The divergence finder finds a deliberately broken rewrite: the pass and the node."""
import pytest

from ffc.debug import compare
from ffc.ir import Node, Op
from ffc.passes import PIPELINE
from ffc.passes import raise_rms_norm as rr
from ffc.passes.rewrite import apply_rules, per_graph


def test_clean_pipeline_matches(smol_artifact):
    report = compare(str(smol_artifact), "The capital of France is")
    assert report.first_bad_stage is None and report.first_divergence is None
    assert report.modules_compared > 100
    assert all(e < 1e-4 for _, e in report.stages)


def test_broken_rewrite_is_found(monkeypatch):
    def broken_rule(node, m):
        out = rr._rms_norm(node, m)
        if out and node.origin.module == "model.layers.3.post_attention_layernorm":
            out[-1].attrs["eps"] = 0.5  # the bug: a wrong epsilon in one layer
        return out

    @per_graph
    def raise_rms_norm(graph, module, ctx):
        apply_rules(graph, module, {Op.MUL: [broken_rule]})

    pipeline = [raise_rms_norm if p.__name__ == "raise_rms_norm" else p for p in PIPELINE]
    report = compare("smollm2-135m", "The capital of France is", pipeline=pipeline, max_seq_len=128)
    assert report.first_bad_stage.endswith("raise_rms_norm")
    d = report.first_divergence
    assert d.module_path == "model.layers.3.post_attention_layernorm"
    assert "rms_norm(" in d.ir_line and "eps=0.5" in d.ir_line
    assert "raise_rms_norm" in report.format() and d.module_path in report.format()
