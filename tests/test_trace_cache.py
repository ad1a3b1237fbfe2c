"""The trace cache (compiler/trace_cache.py): a second compile of a model reads its traced graph
from $FFC_CACHE_DIR/traces and gives the artifact a fresh trace gives; what the graph depends on
is in the key; a damaged entry is traced anew."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ffc
from conftest import tiny_model_folder
from ffc import frontend, trace_cache


def _llama(tie=False, layers=2, **extra):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie, **extra)).eval()


def test_a_second_compile_reads_the_trace_and_builds_the_same_artifact(tmp_path, smol_source, monkeypatch):
    monkeypatch.setattr(trace_cache, "folder", lambda: tmp_path / "traces")    # kernels: the suite's cache
    folder = tiny_model_folder(tmp_path / "m", "qwen2", smol_source)
    first = ffc.compile(str(folder), str(tmp_path / "a.ffc"), max_seq_len=64)
    assert len(list((tmp_path / "traces").glob("*.ir"))) == 1

    def no_trace(*a, **k):
        raise AssertionError("traced again")
    monkeypatch.setattr(frontend, "trace", no_trace)
    second = ffc.compile(str(folder), str(tmp_path / "b.ffc"), max_seq_len=64)
    for f in sorted((first / "ir").glob("*.ir")):
        assert (second / "ir" / f.name).read_text() == f.read_text(), f.name
    assert (second / "kernels" / "plan.json").read_text() == (first / "kernels" / "plan.json").read_text()
    prompt = [[5, 17, 42]]
    assert ffc.load(second).generate(prompt, 8, ignore_eos=True).token_ids == \
        ffc.load(first).generate(prompt, 8, ignore_eos=True).token_ids
    with pytest.raises(AssertionError, match="traced again"):      # another max_seq_len is another graph
        ffc.compile(str(folder), str(tmp_path / "c.ffc"), max_seq_len=32)


def test_the_key_holds_what_the_graph_depends_on():
    base = trace_cache.key(_llama(), 64)
    assert trace_cache.key(_llama(), 64) == base             # weights' values are not in it
    assert trace_cache.key(_llama(), 32) != base             # max_seq_len
    assert trace_cache.key(_llama(layers=3), 64) != base     # the config
    assert trace_cache.key(_llama(rms_norm_eps=1e-3), 64) != base
    tied = _llama(tie=True)
    assert trace_cache.key(tied, 64) != base                 # a tied lm_head reads the embedding's tensor
    untied = _llama(tie=True)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert trace_cache.key(untied, 64) != trace_cache.key(tied, 64)
    pruned = _llama(layers=3)                                # a module changed without its config (a self-draft)
    del pruned.model.layers[1]
    assert trace_cache.key(pruned, 64) != trace_cache.key(_llama(layers=3), 64)


def test_a_damaged_entry_is_traced_anew(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_cache, "folder", lambda: tmp_path / "traces")
    model = _llama()
    want = frontend.trace(model, 64)
    entry = tmp_path / "traces" / f"{trace_cache.key(model, 64)}.ir"
    from ffc.ir.text import print_module
    text = print_module(trace_cache.trace(model, 64))
    whole = entry.read_text()
    assert text == print_module(want) and whole.endswith(text)
    graph = whole.index("\ngraph ")
    for damaged in (whole[:graph], whole[:-40], whole.replace("f32[", "f16[", 1)):   # cut short, edited
        entry.write_text(damaged)
        assert print_module(trace_cache.trace(model, 64)) == text
        assert entry.read_text() == whole
    assert not list(entry.parent.glob(".tmp-*"))
