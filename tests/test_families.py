"""Random-weight tiny models of every supported family made by transformers (Llama, Mistral,
Qwen2, GPT-2, OPT, GPTBigCode, Qwen3, GPT-NeoX, Phi-3, Falcon's grouped and multi-query
layouts and Falcon-RW's ALiBi, Gemma 3 with a sliding-window layer, Gemma 2's soft-capped
attention, the mixtures of experts Mixtral and Qwen3-MoE): prefill and several decode steps
against transformers within 1e-4, greedy generation equal batched and alone (and, for ALiBi,
through speculative verify steps), and on two tensor-parallel ranks and two pipeline stages."""
import json

import pytest
import torch

import ffc
from conftest import Sequences, tiny_model_folder
from ffc.runtime.speculative import Tree
from test_parallel import free_link  # noqa: F401 - a profile whose search shards what it can

WINDOWED = {"gemma3": 1, "mistral_sw": 2, "gemma2": 1}     # family -> layers with a sliding window of 8
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt", "gpt_bigcode", "qwen3", "gpt_neox", "phi3", "falcon",
            "falcon_mq", "falcon_rw", "gemma3", "mistral_sw", "gemma2", "mixtral", "qwen3_moe"]
MOE = {"mixtral": 2, "qwen3_moe": 3}        # family -> experts per token


class OracleTrees:
    """A draft that knows the greedy answers: under the root a wrong token, then the right one
    (so an accepted node sits past its depth's slot and its K/V moves), its right child with a
    wrong sibling, and so on."""
    kind = "oracle"

    def __init__(self, answers):
        self.answers = answers

    def propose(self, tokens, depth, max_nodes):
        full = next((a for a in self.answers if a[:len(tokens)] == list(tokens)), None)
        nxt = full[len(tokens):len(tokens) + depth] if full is not None else []
        if not nxt:
            return None
        toks, parents, at = [tokens[-1]], [-1], 0
        for t in nxt:
            if len(toks) + 2 > max_nodes:
                break
            toks += [(t + 1) % 49152, t]          # a wrong sibling first, then the right token
            parents += [at, at]
            at = len(toks) - 1
        return Tree(toks, parents) if len(toks) > 1 else None


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family, tmp_path, smol_source):
    from transformers import AutoModelForCausalLM
    folder = tiny_model_folder(tmp_path / family, family, smol_source)
    art = ffc.compile(str(folder), str(tmp_path / f"{family}.ffc"), max_seq_len=64)
    llm = ffc.load(art)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if family in WINDOWED:          # the layers' windows reach the kernels (HF applies them too)
        final = sorted((art / "ir").glob("*.ir"))[-1].read_text()
        assert final.count("window=8") == WINDOWED[family] * 2      # prefill and decode
        assert final.count("softcap=2.0") == (4 if family == "gemma2" else 0)   # both layers' attention
    if family in MOE:               # routing and experts as ops (a kernel each), not a loop over experts
        final = sorted((art / "ir").glob("*.ir"))[-1].read_text()
        layers = 2 * final.count("\ngraph ")       # prefill, decode, verify
        assert final.count("moe_route(") == final.count("moe_experts(") == layers and "top_k(" not in final
        assert final.count(f"top_k={MOE[family]}") == 2 * layers
        plan = json.loads((art / "kernels" / "plan.json").read_text())
        assert sum(k["family"] == "moe" for k in plan["kernels"].values()) == 2
    torch.manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,)).tolist() for n in (7, 3, 11)]
    seqs = Sequences(llm, prompts)
    for step in range(5):
        logits = seqs.step()
        refs = [hf(torch.tensor([t])).logits[0, -1] for t in seqs.tokens]
        for row, ref in zip(logits, refs):
            assert (row - ref).abs().max() < 1e-4, (family, step)
        seqs.append(ref.argmax() for ref in refs)
    # and the whole generate loop, batched and alone, against transformers' generate
    out = llm.generate(prompts, max_new_tokens=32, ignore_eos=True)
    for p, got in zip(prompts, out.token_ids):
        want = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(p):]
        assert got == want.tolist()
    assert llm.generate([prompts[1]], max_new_tokens=32, ignore_eos=True).token_ids[0] == out.token_ids[1]
    if family == "falcon_rw":       # ALiBi in verify steps: tree nodes scored at their depth, accepted ones moved
        spec = llm.engine.speculation
        spec.drafts["oracle"] = OracleTrees([p + o for p, o in zip(prompts, out.token_ids)])
        spec.control.shape = lambda *a, **k: [1, 1, 1]
        spec.gate = False
        stats = llm.engine.stats
        before = (stats.verify_steps, stats.spec_accepted)
        spec_out = llm.generate(prompts, max_new_tokens=32, ignore_eos=True, speculative="oracle").token_ids
        assert spec_out == out.token_ids
        assert stats.verify_steps - before[0] >= 10 and stats.spec_accepted - before[1] >= 20
    if family == "mistral_sw":     # every layer windowed: blocks behind the window go back to the pool
        from ffc.runtime.sampling import SamplingParams
        engine, most = llm.engine, 0
        req = engine.submit(prompts[2], SamplingParams(max_new_tokens=48, ignore_eos=True))
        while not req.finished:
            engine.step()
            most = max(most, engine.pool.used_blocks)
        bs = engine.pool.block_size        # 59 positions would take 4 blocks; a window of 8 spans 2
        assert req.released >= 2 and most <= 3 < -(-(len(prompts[2]) + 48) // bs)
        assert req.out[:32] == out.token_ids[2]


# llama: test_parallel; falcon_mq and mistral_sw differ from falcon and mistral in attention only,
# qwen3_moe from qwen3 and mixtral in routing only
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "falcon_mq", "mistral_sw", "qwen3_moe")])
def test_family_on_ranks(family, tmp_path, smol_source, free_link):  # noqa: F811
    """Two tensor-parallel ranks (heads, MLP and vocabulary sharded as the search finds cheapest
    on a free interconnect; one KV head replicated) and two pipeline stages give transformers'
    greedy tokens (as the one-rank artifact does: test_family_matches_transformers)."""
    from transformers import AutoModelForCausalLM
    folder = tiny_model_folder(tmp_path / family, family, smol_source)
    torch.manual_seed(3)
    prompts = [torch.randint(3, 49152, (n,)).tolist() for n in (7, 3, 11)]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(p):].tolist()
            for p in prompts]
    for tp, pp in ((2, 1), (1, 2)):
        art = ffc.compile(str(folder), str(tmp_path / f"tp{tp}pp{pp}.ffc"), max_seq_len=64, tp=tp, pp=pp,
                          profile=free_link)
        manifest = json.loads((art / "manifest.json").read_text())
        assert (manifest["parallel"]["tp"], manifest["parallel"]["pp"]) == (tp, pp)
        if tp > 1:
            assert sum(manifest["parallel"]["collectives"].values()) > 0
        if tp > 1 and family == "falcon_rw":     # each rank holds its heads' ALiBi slopes
            final = sorted((art / "ir").glob("*.ir"))[-1].read_text()
            attention = [line for line in final.splitlines() if "= cached_attention(" in line]
            assert len(attention) == 2 * final.count("\ngraph ")
            assert all("_ffc_alibi_slopes.shard0of2) {alibi=" in line for line in attention)
        if tp > 1 and family in MOE:     # expert parallelism: each rank holds half of every layer's experts
            final = sorted((art / "ir").glob("*.ir"))[-1].read_text()
            experts = [line for line in final.splitlines() if "= moe_experts(" in line]
            assert len(experts) == 2 * final.count("\ngraph ")
            assert all("gate_up_proj.shard0of2" in line and "down_proj.shard0of2" in line for line in experts)
        llm = ffc.load(art)
        try:
            assert llm.generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids == want, (tp, pp)
        finally:
            llm.close()


def test_gpt2_conv1d_is_folded_to_linear(tmp_path, smol_source):
    from ffc import frontend, sources
    from ffc.passes import PIPELINE, PassContext, run_pipeline
    folder = tiny_model_folder(tmp_path / "g", "gpt2", smol_source)
    model = sources.load_model(sources.resolve(str(folder)))
    mod = run_pipeline(frontend.trace(model, 64), PIPELINE, PassContext(64)).module
    ops = [n.op.value for n in mod.graphs["decode"].nodes]
    assert "layer_norm" in ops and "attention" not in ops and ops.count("cached_attention") == 2
    assert any(p.recipe and p.recipe.op.value == "transpose" for p in mod.params.values())
    assert "matmul" not in ops


def test_model_id_from_the_local_hf_cache(tmp_path, smol_source, monkeypatch):
    """An 'org/name' id resolves offline through the HF cache layout (snapshots + refs)."""
    import shutil
    from ffc import sources
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    tiny_model_folder(tmp_path / "src", "llama", smol_source)
    shutil.copytree(tmp_path / "src", snap)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    src = sources.resolve("tiny-org/tiny-llama")
    assert src.kind == "hub-cache" and src.path.endswith("0123abcd")
    art = ffc.compile("tiny-org/tiny-llama", str(tmp_path / "t.ffc"), max_seq_len=32)
    assert ffc.load(art).generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True).token_ids[0]


def test_phi3_longrope_switches_factors_past_the_original_context(tmp_path, smol_source):
    """LongRoPE (Phi-3 128k): the short factors up to the original context (32 here), the long
    ones from there on, per position - as transformers decoding one token at a time with its
    cache (its generate() additionally recomputes the whole cache with the long factors once a
    sequence passes the original context; ffc keeps the keys it has)."""
    from transformers import AutoModelForCausalLM
    folder = tiny_model_folder(tmp_path / "phi3lr", "phi3_longrope", smol_source)
    llm = ffc.load(ffc.compile(str(folder), str(tmp_path / "lr.ffc"), max_seq_len=64))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [5, 17, 300, 4000, 12, 9, 77]
    seqs = Sequences(llm, [prompt])
    out = hf(torch.tensor([prompt]), use_cache=True)
    for step in range(34):            # positions 6 .. 39: past 32
        logits = seqs.step()[0]
        assert (logits - out.logits[0, -1]).abs().max() < 1e-4, step
        token = int(out.logits[0, -1].argmax())
        seqs.append([token])
        n = len(seqs.tokens[0])
        out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True,
                 position_ids=torch.tensor([[n - 1]]))
    # the long factors matter: transformers with them at every position (a fresh forward over the
    # 40 tokens) gives other logits than the per-position switch above
    full = hf(torch.tensor([seqs.tokens[0]])).logits[0, -1]
    assert (full - out.logits[0, -1]).abs().max() > 1e-3
