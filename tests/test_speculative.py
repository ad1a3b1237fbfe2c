"""Speculative decoding: the verify graph (token trees over the paged KV cache), acceptance,
drafts, and the engine running them."""
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ffc import build
from ffc.errors import InvalidRequestError
from ffc.codegen import render_sources
from ffc.ir import parse, run_graph, verify_module
from ffc.ir.attention import tree_slots
from ffc.lower import lower_module
from ffc.runtime.compiled import CompiledPlan

from conftest import QKV_ROPE_IR

VERIFY_IR = """# ffc ir 1
meta {}
param @inv_freq : f32[3]
graph verify(%qkv : f32[1,T,48], %position_ids : i64[1,T], %seq_ids : i64[T], %block_tables : i64[N,5], %kv_cache : f32[2,2,S,2,8,6], %tree_base : i64[T], %tree_mask : i64[T]) {
""" + QKV_ROPE_IR + """  %19 = cached_attention(%17, %18, %14, %position_ids, %seq_ids, %block_tables, %kv_cache, %tree_base, %tree_mask) {form="verify", layer=1, scale=0.4, window=null} : f32[1,4,T,6]
  %20 = transpose(%19) {dim0=1, dim1=2} : f32[1,T,4,6]
  %21 = reshape(%20) {shape=[1,"T",24]} : f32[1,T,24]
  return %21
}
"""

# two sequences' trees, packed: A (committed 5 slots, table row 2): root, two children of the
# root, a grandchild under the first child, and its child (an asymmetric tree); B (committed
# 9 slots, row 0): a chain of three
TREE_A = [(-1, 0), (0, 1), (0, 1), (1, 2), (3, 3)]          # (parent, depth) per node
TREE_B = [(-1, 0), (0, 1), (1, 2)]


def tree_masks(tree):
    masks = []
    for j, (parent, _) in enumerate(tree):
        masks.append((masks[parent] if parent >= 0 else 0) | (1 << j))
    return masks


def verify_inputs(g, dtype=torch.float32):
    base = [5] * len(TREE_A) + [9] * len(TREE_B)
    masks = tree_masks(TREE_A) + tree_masks(TREE_B)
    pos = [b + d for b, (_, d) in zip(base, TREE_A + TREE_B)]
    T = len(base)
    return {"qkv": torch.randn(1, T, 48, generator=g), "position_ids": torch.tensor([pos]),
            "seq_ids": torch.tensor([2] * len(TREE_A) + [0] * len(TREE_B)),
            "block_tables": torch.tensor([[5, 1, 7, 0, 0], [0, 0, 0, 0, 0], [2, 6, 3, 4, 0]]),
            "kv_cache": torch.randn(2, 2, 8, 2, 8, 6, generator=g).to(dtype),
            "tree_base": torch.tensor(base), "tree_mask": torch.tensor(masks)}


def test_tree_slots_are_each_nodes_own_index():
    masks = torch.tensor(tree_masks(TREE_A) + [(1 << 63 | 1) - (1 << 64)])     # node 63: the sign bit
    assert tree_slots(torch.tensor([5] * 6), masks).tolist() == [5, 6, 7, 8, 9, 5 + 63]


# the same verify step with ALiBi: the heads' slopes, their products with key positions
# rounded to bf16 and scaled by 0.3 (ffc.ir.attention.alibi_bias)
ALIBI_VERIFY_IR = VERIFY_IR.replace("param @inv_freq : f32[3]\n", "param @inv_freq : f32[3]\nparam @slopes : f32[4]\n") \
    .replace("%tree_base, %tree_mask) {form=", "%tree_base, %tree_mask, @slopes) {alibi=0.3, form=")
SLOPES = torch.tensor([0.71, -0.237, 0.0313, 0.5])


@pytest.mark.parametrize("alibi", [False, True])
def test_tree_mask_attends_to_ancestors_only(alibi):
    """The interpreter's verify attention: a node's output equals attention over the committed
    slots and its ancestors' slots alone (computed here with a plain softmax); with ALiBi, a tree
    node's key position is its depth past the committed slots, not its slot."""
    module = parse(ALIBI_VERIFY_IR if alibi else VERIFY_IR)
    verify_module(module)
    g = torch.Generator().manual_seed(0)
    inputs = verify_inputs(g)
    cache = inputs["kv_cache"].clone()
    out = run_graph(module.graphs["verify"], {"inv_freq": torch.tensor([1.0, 0.1, 0.01]), "slopes": SLOPES},
                    inputs)[0]
    # node 4 of A (slot 9) sees slots 0-4, then nodes 0, 1, 3, 4: slots 5, 6, 8, 9 (not node 2's 7)
    kc, vc = inputs["kv_cache"][1, 0], inputs["kv_cache"][1, 1]
    table = inputs["block_tables"][2]
    slots = [0, 1, 2, 3, 4, 5, 6, 8, 9]
    k = torch.stack([kc[table[s // 8], :, s % 8] for s in slots])       # [9, Hkv, D]
    v = torch.stack([vc[table[s // 8], :, s % 8] for s in slots])
    # q of node 4 (token 4), rotated as the graph does, head 0 (kv head 0)
    x = inputs["qkv"][0, 4, :6]
    ang = 8.0 * torch.tensor([1.0, 0.1, 0.01]).repeat(2)                   # position 5 + depth 3
    qr = x * ang.cos() + torch.cat([-x[3:], x[:3]]) * ang.sin()
    bias = (SLOPES[0] * torch.arange(9.0)).bfloat16().float() * 0.3 if alibi else 0.0   # positions 0..8
    w = torch.softmax((k[:, 0] @ qr) * 0.4 + bias, 0)
    torch.testing.assert_close(out[0, 4, :6], w @ v[:, 0], atol=1e-5, rtol=1e-5)
    # committed slots are untouched; tree nodes were written at base + node
    assert torch.equal(inputs["kv_cache"][1, :, table[0], :, :5], cache[1, :, table[0], :, :5])
    assert not torch.equal(inputs["kv_cache"][1, :, table[0], :, 5:], cache[1, :, table[0], :, 5:])


@pytest.mark.parametrize("dtype,alibi", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_verify_kernel_matches_interpreter(dtype, alibi, tmp_path):
    text = ALIBI_VERIFY_IR if alibi else VERIFY_IR
    text = text if dtype == torch.float32 else text.replace("%kv_cache : f32", "%kv_cache : bf16")
    module = parse(text)
    plan = lower_module(module, prefill_tokens=40, max_batch=8)
    assert any(k.spec.tree for k in plan.kernels.values() if k.family.value == "attention")
    (tmp_path / "src").mkdir()
    sources, spans = render_sources(plan)
    for name, src in sources.items():
        (tmp_path / "src" / name).write_text(src)
    weights = {"inv_freq": torch.tensor([1.0, 0.1, 0.01]), **({"slopes": SLOPES} if alibi else {})}
    cp = CompiledPlan(plan, build.load_library(build.build(tmp_path, "cpu", spans)), weights, threads=2)
    for seed in range(3):
        inputs = verify_inputs(torch.Generator().manual_seed(seed), dtype)
        ref_inputs = {k: v.clone() for k, v in inputs.items()}
        got = cp.run("verify", inputs)[0]
        ref = run_graph(module.graphs["verify"], weights, ref_inputs)[0]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(inputs["kv_cache"].float(), ref_inputs["kv_cache"].float(),
                                   atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)


# ---------------------------------------------------------------- the default model

def _continuation(llm, ids, n):
    return llm.generate([ids], max_new_tokens=n, ignore_eos=True).token_ids[0]


def test_accepted_kv_equals_plain_decoding(smol_llm):
    """A verified tree whose accepted path runs through later siblings (so its K/V rows move
    down to their positions): afterwards the cache holds, at every position, what plain
    decoding of the same tokens writes (max abs diff <= 1e-5), and the greedy tokens agree."""
    from ffc.runtime.model_runner import Chunk
    from ffc.runtime.speculative import Tree, accept_greedy, commit_moves
    llm, runner = smol_llm, smol_llm.runner
    ids = llm.encode("The capital of France is")
    nxt = _continuation(llm, ids, 5)                   # plain greedy: the tokens to accept
    cache = torch.zeros(llm.cache_type.concrete({"S": 8}), dtype=llm.cache_type.torch_dtype)
    plain = torch.zeros_like(cache)
    blocks = list(range(8))
    base = len(ids)
    runner.forward([Chunk(ids, 0, blocks)], plain)
    for k, t in enumerate(nxt[:4]):
        runner.forward([Chunk([t], base + k, blocks)], plain)
    runner.forward([Chunk(ids[:-1], 0, blocks)], cache)   # the last prompt token is the tree's root
    # root = last prompt token; depth 1: a wrong token (node 1) then the right one (node 2);
    # depth 2: under node 2 a wrong one (3) and the right one (4); depth 3: the right one (5)
    wrong = (nxt[0] + 1, nxt[1] + 1)
    tree = Tree([ids[-1], wrong[0], nxt[0], wrong[1], nxt[1], nxt[2]], [-1, 0, 0, 2, 2, 4])
    logits = runner.verify([(tree, base - 1, blocks)], cache)[0]
    acc = accept_greedy(tree, logits)
    assert acc.path == [2, 4, 5] and acc.tokens == nxt[:4]
    runner.copy_slots(blocks, commit_moves(tree, acc.path, base - 1), cache)
    n = base + 3                                        # prompt, then three accepted tokens
    bs = cache.shape[4]
    got = torch.stack([cache[:, :, blocks[p // bs], :, p % bs] for p in range(n)])
    want = torch.stack([plain[:, :, blocks[p // bs], :, p % bs] for p in range(n)])
    assert (got - want).abs().max() <= 1e-5


def test_long_context_rows_agree_exactly_across_prefill_decode_and_verify(smol_llm):
    """At a context past one attention chunk (256 keys), where decoding one sequence shares each
    KV head's chunks out among the threads (their partials merged in a third phase) while
    prefill and verify rows run their chunks in turn: the last position's logits are the same,
    bit for bit, from a prefill of the whole text, a decode step and a verify step's root."""
    from ffc.runtime.model_runner import Chunk
    from ffc.runtime.speculative import Tree
    llm, runner = smol_llm, smol_llm.runner
    ids = llm.encode("The history of the printing press. " * 45)[:300]
    n = len(ids)
    blocks = list(range(-(-(n + 8) // runner.block_size)))
    caches = [torch.zeros(llm.cache_type.concrete({"S": len(blocks)}), dtype=llm.cache_type.torch_dtype)
              for _ in range(3)]
    prefill = runner.forward([Chunk(ids, 0, blocks)], caches[0])[-1]
    runner.forward([Chunk(ids[:-1], 0, blocks)], caches[1])
    decode = runner.forward([Chunk(ids[-1:], n - 1, blocks)], caches[1])[-1]
    runner.forward([Chunk(ids[:-1], 0, blocks)], caches[2])
    verify = runner.verify([(Tree.chain(ids[-1], [11, 12]), n - 1, blocks)], caches[2])[0][0]
    assert torch.equal(decode, prefill) and torch.equal(verify, decode)


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_ngram_equals_plain(smol_llm, batch, monkeypatch):
    """Prompt lookup on texts it can copy from and texts it cannot, alone and in a mixed batch
    (some requests speculate, some do not): the same tokens as plain greedy decoding. The trees
    are forced (whether they pay is the cost model's call on this machine's times)."""
    spec = smol_llm.engine.speculation      # trees forced: whether one pays depends on this machine's timing
    monkeypatch.setattr(spec, "gate", False)
    monkeypatch.setattr(spec.control, "shape", lambda *a, **k: [2, 1, 1, 1])
    monkeypatch.setattr(spec.control, "losing", lambda *a, **k: False)
    from conftest import PROMPTS
    text = ("Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over "
            "the lazy dog, and the quick brown fox")
    prompts = ([text] + PROMPTS + [text + " again", "def add(a, b):\n    return a + b\n\ndef add("])[:batch]
    want = smol_llm.generate(prompts, max_new_tokens=64).token_ids
    stats = smol_llm.engine.stats
    before = stats.verify_steps, stats.spec_accepted
    got = smol_llm.generate(prompts, max_new_tokens=64, speculative="ngram").token_ids
    assert got == want
    assert stats.verify_steps > before[0] and stats.spec_accepted > before[1]   # it did speculate


def test_prompt_lookup_rates_its_proposals_by_match_length():
    """The occurrence matching most of the text's ending is proposed first; its match length's
    bucket rates the proposal (a verbatim copy of 8 tokens is trusted far more than a repeated
    common token), each token deeper in it by the bucket of the match it would make (every
    accepted token lengthens the match), the rates learn from what verification accepts, and
    a long match gets a deeper tree than a short one under the same step costs, a short match
    whose later tokens hold a deeper one than a rate for every depth would give. A first token
    that followed every earlier occurrence of the ending is trusted more than one that
    followed a few."""
    from ffc.runtime.speculative import NgramDraft, SpecControl
    ng = NgramDraft()
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 9, 50, 51, 52, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    found = ng.lookup(text)
    assert found[0] == (9, 8) and (1, 13) in found           # 9 tokens match ending at 8, "40 9" only the 9
    tree = ng.propose(text, 3, 16)
    assert tree.tokens[:4] == [9, 10, 11, 12] and 50 in tree.tokens   # the long match first, a branch
    assert ng.propose(text, 3, 4).tokens == [9, 10, 11, 12]   # within the nodes priced: the first branch only
    long_rates, long_key = ng.expect(text, 4)
    short_rates, short_key = ng.expect([7, 3, 8, 3], 4)      # "3" once before, followed by 8: all agree
    assert (long_key[0], short_key) == (9, (1, 0)) and long_rates[0] > short_rates[0]
    assert short_rates == [ng.rate(1, 0)] + [ng.rate(m) for m in (2, 3, 4)] and short_rates == sorted(short_rates)
    assert ng.expect([1, 2, 3], 4) is None                   # the ending occurs nowhere before
    # the first token's agreement: "5" followed by 7, 6, 7 (the latest, 7, proposed: 2 of 3), by 6, 7, 8
    assert ng.expect([5, 7, 5, 6, 5, 7, 9, 5], 4)[1] == (1, 1) and ng.expect([5, 6, 5, 7, 9, 5, 8, 1, 5], 4)[1] == (1, 2)
    assert ng.rate(1, 0) > ng.rate(1, 1) > ng.rate(1, 2)
    for _ in range(40):                                       # proposals from 9-token matches fail at once
        ng.observe(long_key, 4, 0)
    assert ng.expect(text, 4)[0][0] < 0.1 and ng.expect([7, 3, 8, 3], 4)[0] == short_rates
    assert ng.rate(16) == NgramDraft.PRIOR[-1]                # only the first token was tried each time
    ng.observe((1, 0), 4, 2)                                  # two accepted: matches of 1 and 2 held, 3 failed
    assert ng.rate(1, 0) > short_rates[0] and ng.rate(2) > short_rates[1] and ng.rate(3) < short_rates[2]
    c = SpecControl()
    for t in (1, 8, 16, 33):
        c.observe(t, 0.010 + 2e-4 * t)
        c.observe(t, 0.010 + 2e-4 * t, verify=False)
    assert len(c.shape(0.95)) > len(c.shape(0.3)) >= 1
    assert len(c.shape([0.3, 0.9, 0.9, 0.9, 0.9])) > len(c.shape(0.3))


def mixed_batch(llm, prompts, drafts, max_new_tokens=64):
    """Requests submitted together, each with its own draft (None: plain): their tokens."""
    reqs = [llm.submit(p, max_new_tokens, speculative=d) for p, d in zip(prompts, drafts)]
    llm.engine.wait(reqs)
    assert all(r.finish in ("stop", "length") for r in reqs)
    return [list(r.out) for r in reqs]


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_model_drafts_equal_plain(smol_llm, smol_artifact, batch, monkeypatch):
    """The self-draft and a draft artifact (here the self-draft's own directory, loaded as any
    artifact is): the same tokens as plain greedy decoding, alone and in a batch of 8 whose
    requests use different drafts or none (trees forced, to check what they give: at 8 the cost
    model rightly turns model drafts down on this CPU, and at 1 whether they pay is timing)."""
    spec = smol_llm.engine.speculation      # trees forced: whether one pays depends on this machine's timing
    monkeypatch.setattr(spec, "gate", False)
    monkeypatch.setattr(spec.control, "shape", lambda *a, **k: [2, 1, 1, 1])
    monkeypatch.setattr(spec.control, "losing", lambda *a, **k: False)
    from conftest import PROMPTS
    code = "def add(a, b):\n    return a + b\n\ndef add("
    prompts = (PROMPTS + [code, "Tell me about the moon.", "1, 2, 3, 4,"])[:batch]
    want = smol_llm.generate(prompts, max_new_tokens=64).token_ids
    path = str(smol_artifact / "draft")
    stats = smol_llm.engine.stats
    for draft in ("self", path):
        before = stats.verify_steps
        assert smol_llm.generate(prompts, max_new_tokens=64, speculative=draft).token_ids == want, draft
        assert stats.verify_steps > before
    if batch > 1:
        kinds = [None, "ngram", "self", path]
        assert mixed_batch(smol_llm, prompts, [kinds[k % 4] for k in range(batch)]) == want


def test_lookup_first_draft(smol_llm, monkeypatch):
    """"ngram+self": prompt lookup's tree where it is predicted to pay at least as much as the
    self-draft's (here, forced: wherever the text's ending occurs before), the self-draft's
    elsewhere, its cache catching up over what lookup drafted: the same tokens as plain greedy
    decoding, alone and beside other drafts in one batch; both kinds made trees."""
    spec = smol_llm.engine.speculation
    monkeypatch.setattr(spec, "gate", False)
    monkeypatch.setattr(spec.control, "shape", lambda *a, **k: [2, 1, 1, 1])
    monkeypatch.setattr(spec.control, "plan", lambda a, cost=0.0, *r, **k: ([2, 1, 1, 1], 1.5 if cost else 2.0))
    monkeypatch.setattr(spec.control, "losing", lambda *a, **k: False)
    from conftest import PROMPTS
    text = ("Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over "
            "the lazy dog, and the quick brown fox")
    prompts = [text, *PROMPTS[:2], "def add(a, b):\n    return a + b\n\ndef add("]
    want = smol_llm.generate(prompts, max_new_tokens=48).token_ids
    smol_llm.draft("ngram+self")
    lookup, model = spec.drafts["ngram"], spec.drafts["self"]
    before = sum(lookup.trials), model.calls
    for k, p in enumerate(prompts):
        assert smol_llm.generate([p], max_new_tokens=48, speculative="ngram+self").token_ids[0] == want[k]
    assert sum(lookup.trials) > before[0] and model.calls > before[1]
    assert mixed_batch(smol_llm, prompts, ["ngram+self", "self", None, "ngram+self"], 48) == want


def test_self_draft_is_recorded(smol_artifact):
    """The manifest says which layers the self-draft skips and why (acceptance, costs, the
    candidates measured); the draft is an artifact of its own with those layers gone."""
    import json
    sd = json.loads((smol_artifact / "manifest.json").read_text())["speculative"]["self_draft"]
    assert sd["path"] == "draft" and sd["quant"] == "gguf"
    assert 0 < sd["acceptance"] <= 1 and 0 < sd["draft_cost"] < 1 and sd["speedup"] >= 1
    assert sd["candidates"][0]["skip"] == 0 and len(sd["candidates"]) > 1     # skipping was measured
    best = max(sd["candidates"], key=lambda c: c["speedup"])
    assert best["skip_layers"] == sd["skip_layers"]
    curve = json.loads((smol_artifact / "manifest.json").read_text())["speculative"]["verify_cost"]
    assert curve["1"] == 1.0 and curve["8"] < curve["64"] < curve["128"]   # the cost model's t(T) / t(1)
    draft = json.loads((smol_artifact / "draft" / "manifest.json").read_text())
    assert draft["model"]["config"]["num_hidden_layers"] == 30 - len(sd["skip_layers"])


def test_tree_shapes_follow_step_costs():
    """Extra tree nodes nearly free (a bandwidth-bound step): deep trees, widened where the
    draft's second choices often hit; every token costing its own time (compute-bound, or a
    large batch) or an expensive draft: plain decoding."""
    from ffc.runtime.speculative import SpecControl
    flat = SpecControl()
    for t in (1, 8, 16, 64, 128):
        flat.observe(t, 0.010 + 1e-5 * t)
        flat.observe(t, 0.010 + 1e-5 * t, verify=False)
    assert len(flat.shape(0.8)) >= 6
    assert flat.shape(0.8, draft_cost=2.0) == []              # a draft step costing 2 plain steps
    assert max(flat.shape(0.4, alt=[0.6, 0.7])) > 1           # leaves beside the chain pay
    steep = SpecControl()
    for t in (1, 8, 16, 64):
        steep.observe(t, 0.004 + 0.002 * t)                   # every token mostly its own time
        steep.observe(t, 0.004 + 0.002 * t, verify=False)
    assert steep.shape(0.6, batch=8) == [] and steep.shape(0.95, batch=8) != []
    linear = SpecControl()
    for t in (1, 8, 64):
        linear.observe(t, 0.002 * t)
    assert linear.shape(0.99) == []                           # k + 1 tokens at most for k + 1 times the cost
    dear = SpecControl()                                      # verify steps dearer than decode steps
    for t in (1, 8, 16, 64):
        dear.observe(t, 0.010 + 1e-5 * t, verify=False)
        dear.observe(t, 0.013 + 1e-5 * t)
    assert dear.shape(0.2) == [] and dear.shape(0.9) != []
    c = SpecControl()                                         # before any step: the cost model's curve
    c.set_curve({"1": 1.0, "8": 1.1, "64": 3.0})
    assert c.predicted(8) == pytest.approx(1.1) and c.predicted(36) == pytest.approx(2.05)
    assert c.predicted(128) == pytest.approx(3.0 + 64 * 1.9 / 56)
    assert len(c.shape(0.7)) >= 3


def test_a_batch_running_to_its_cap_speculates_for_its_slowest_members():
    """The requests of one llm.generate call end when the last does. Where answers end by
    themselves at lengths spread out, every member's accepted tokens count (no pace setters);
    where they run to max_new_tokens, the members with the most steps left set the pace, the
    others are not drafted for, and a verify step is taken only when each pace setter has a
    tree worth it (one without: the group's end comes no closer this step), unless each of
    them gains enough at most steps (its outlook) that one without a tree now catches up."""
    from types import SimpleNamespace
    from ffc.runtime.sampling import SamplingParams
    from ffc.runtime.scheduler import Request
    from ffc.runtime.speculative import Speculation, Tree

    def req(n, accepted=0, group="g", tokens=(7, 8)):
        r = Request(f"r{len(tokens)}-{n}-{accepted}", [1, 2, 3], SamplingParams(max_new_tokens=128),
                    group=group, draft="ngram")
        r.out = list(tokens) * (n // len(tokens))
        r.computed, r.accepted = len(r.prompt) + len(r.out) - 1, accepted
        return r

    sp = Speculation()
    a, b, c = req(40), req(40, accepted=20), req(40)     # b's steps yielded twice a's tokens: it ends first
    solo = req(40, group=None)
    paced = ({a: ("g", 3), c: ("g", 3)}, {b})
    assert sp.pace_setters([a, b, c, solo]) == paced     # nothing seen yet: taken to run to the cap
    for x in (30, 55, 70, 90, 100, 45):
        sp.lengths.answered(x)                                   # answers end by themselves, lengths spread
    assert sp.pace_setters([a, b, c, solo]) == ({}, set())
    for _ in range(8):
        sp.lengths.answered(128, cut=True)                       # most answers run to their cap
    assert sp.pace_setters([a, b, c, solo]) == paced
    prefilling = req(0)
    prefilling.computed = 0                              # a member whose prompt still runs ends last
    assert sp.pace_setters([a, b, c, prefilling]) == ({}, {a, b, c})

    config = SimpleNamespace(max_seq_len=1024)
    trees = sp.trees([a, b, c], config)                 # every member repeats itself: a and c are drafted for
    assert set(trees) == {a, c}
    assert sp.trees([a, b, c], config, waiting=True).keys() == {a, b, c}   # requests waiting: tokens count
    c2 = req(40, tokens=tuple(range(100, 140)))          # a pace setter whose text never repeats itself
    assert sp.trees([a, b, c2], config) == {}
    chain = Tree.chain(8, [7, 8, 7])
    sp.expected = {a: 0.9, c: 0.9}
    setters = {a: ("g", 3), c: ("g", 3)}
    assert sp._worth_a_verify_step({a: chain, c: chain}, set(), 3, setters).keys() == {a, c}
    a.outlook = c.outlook = 0.0
    assert sp._worth_a_verify_step({a: chain}, set(), 3, setters) == {}
    a.outlook = c.outlook = 3.0       # both would gain ~3 tokens a step: c, without a tree now, catches up later
    assert sp._worth_a_verify_step({a: chain}, set(), 3, setters).keys() == {a}


def test_bad_drafts_are_refused(smol_llm, smol_artifact, tiny_vocab, tmp_path):
    import hashlib
    import json
    for bad, says in (("nope", "draft 'nope' is not 'ngram', 'self', the path of an ffc artifact or 'ngram+'"),
                      ("ngram+ngram", "'ngram+ngram': after 'ngram+' comes a draft model"),
                      ("ngram+/no/such", "draft '/no/such' is not 'ngram', 'self', the path")):
        with pytest.raises(InvalidRequestError, match=re.escape(says)):
            smol_llm.generate(["Hi"], max_new_tokens=2, speculative=bad)
    with pytest.raises(InvalidRequestError, match="has no self-draft; recompile it with --self-draft"):
        tiny_vocab.generate([[1, 3]], max_new_tokens=2, speculative="self")
    # a draft whose tokenizer is not the target's
    other = tmp_path / "other.ffc"
    shutil.copytree(smol_artifact / "draft", other)
    tj = other / "tokenizer" / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(k for k, v in vocab.items() if v == i) for i in (500, 501))
    vocab[a], vocab[b] = 501, 500                # two tokens' ids swapped
    tj.write_text(json.dumps(tok))
    man = json.loads((other / "manifest.json").read_text())
    man["files"]["tokenizer/tokenizer.json"] = hashlib.sha256(tj.read_bytes()).hexdigest()
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InvalidRequestError, match="different tokenizer"):
        smol_llm.generate(["Hi"], max_new_tokens=2, speculative=str(other))


# ---------------------------------------------------------------- sampling keeps the distribution

class RandomTrees:
    """A draft that proposes random trees: some children picked (point masses), others drawn
    i.i.d. from a random distribution q that they carry, as a sampling draft model's are."""
    kind = "random"

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def propose(self, tokens, depth, max_nodes):
        from ffc.runtime.speculative import Tree
        toks, parents, q = [tokens[-1]], [-1], [None]
        frontier = [(0, 0)]
        while frontier:
            node, d = frontier.pop(0)
            if d == depth:
                continue
            width = int(torch.randint(1, 4, (), generator=self.g))
            dist = torch.softmax(torch.randn(self.vocab, generator=self.g) * 2, 0) \
                if torch.rand((), generator=self.g) < 0.5 else None
            for _ in range(width):
                if len(toks) == max_nodes:
                    break
                t = int(torch.multinomial(dist, 1, generator=self.g)) if dist is not None else \
                    int(torch.randint(0, self.vocab, (), generator=self.g))
                toks.append(t)
                parents.append(node)
                q.append(dist)
                frontier.append((len(toks) - 1, d + 1))
        return Tree(toks, parents, q)


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory, smol_source):
    """A random Llama with an 8-token vocabulary (distributions that sampling can be counted on)."""
    import transformers as tf
    import ffc
    from ffc import sources
    path = tmp_path_factory.mktemp("v8") / "m"
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=8, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval().save_pretrained(path)
    sources.load_tokenizer(smol_source).save_pretrained(path)
    return ffc.load(ffc.compile(str(path), str(path.parent / "v8.ffc"), max_seq_len=32))


def test_speculative_sampling_keeps_the_distribution(tiny_vocab):
    """20,000 seeded runs each, temperature 0.8 and top-p 0.9: the first 3 generated tokens'
    joint distribution with random draft trees (depth up to 3, point-mass and sampled children)
    matches plain sampling's, by a chi-square test of the two samples (p > 0.01; 343 outcomes
    seen). The test has power: accepting with 1.5 p / q instead of p / q gives p = 6e-5."""
    import collections
    import numpy as np
    from scipy.stats import chi2_contingency
    llm = tiny_vocab
    llm.engine.speculation.drafts["random"] = RandomTrees(8)
    llm.engine.speculation.control.shape = lambda *a, **k: [1, 1, 1]   # always speculate, 3 deep,
    llm.engine.speculation.gate = False                                 # and verify every tree
    n, kw = 20_000, dict(max_new_tokens=5, temperature=0.8, top_p=0.9, ignore_eos=True, seed=0)
    prompt = [[1, 5, 3]] * n
    before = llm.engine.stats.verify_steps
    plain = llm.generate(prompt, **kw).token_ids
    spec = llm.generate(prompt, speculative="random", **kw).token_ids
    assert llm.engine.stats.verify_steps - before > 1000 and llm.engine.stats.spec_accepted > 1000
    counts = [collections.Counter(tuple(t[:3]) for t in runs) for runs in (plain, spec)]
    cells = sorted(set(counts[0]) | set(counts[1]))
    table = np.array([[c[k] for k in cells] for c in counts])
    table = table[:, table.sum(0) >= 10]          # cells with enough mass for the chi-square approximation
    p = chi2_contingency(table)[1]
    assert p > 0.01, p
    # the same seeds without speculation reproduce plain sampling exactly (the draft does not leak)
    assert llm.generate(prompt[:64], **kw).token_ids == plain[:64]


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_verify_cuda_kernel_compiles(tmp_path, monkeypatch):
    """The CUDA attention's tree variant (int8 cache, ALiBi) builds with nvcc (it runs where a GPU is lent)."""
    monkeypatch.setenv("FFC_CUDA_ARCHS", "80")
    if shutil.which("nvcc") is None:
        monkeypatch.setenv("PATH", str(Path(NVCC).parent) + ":" + os.environ["PATH"])
    plan = lower_module(parse(ALIBI_VERIFY_IR.replace("%kv_cache : f32[2,2,S,2,8,6]", "%kv_cache : i8[2,2,S,2,8,10]")),
                        target="cuda", prefill_tokens=40, max_batch=8)
    (tmp_path / "src").mkdir()
    sources, spans = render_sources(plan)
    for name, src in sources.items():
        (tmp_path / "src" / name).write_text(src)
    assert "__popcll" in sources["attention.cu"] and "+alibi" in sources["attention.cu"]
    assert build.build(tmp_path, "cuda", spans).exists()


def test_spec_bench_runs_and_bounds_prompt_lookup(smol_llm):
    """`ffc bench --speculative` (ffc.spec_bench) on a short setting: a row per mode with the
    tokens equal to plain's; at batch 1, prompt lookup's ceiling on the workload. The ceiling
    itself: an oracle proposing what follows an earlier occurrence of the last token."""
    from ffc.spec_bench import format_spec_bench, lookup_ceiling, run_spec_bench
    # answer 7 (from the prefill) 9 1 2 3 4 5: "7", "9" occur nowhere before (plain steps), then "2 3 4 5" follows "1"
    assert lookup_ceiling([[1, 2, 3, 4, 5]], [[7, 9, 1, 2, 3, 4, 5]], lambda n: 1.0) == 6 / 3
    assert lookup_ceiling([[1, 2, 3, 4, 5]], [[7, 9, 1, 2, 3, 4, 5]], lambda n: 5.0) == 1.0   # never pays
    assert lookup_ceiling([[1, 2]], [[5, 6, 7]], lambda n: 1.0) == 1.0
    rows = run_spec_bench(smol_llm, ["ngram", "ngram+self"], batches=[1], rounds=1, new_tokens=12, names=["edit"])
    assert [r["draft"] for r in rows] == ["plain", "ngram", "ngram+self"]
    assert all(r["equal_to_plain"] and r["tokens"] > 0 for r in rows)
    assert rows[0]["lookup_ceiling_free"] >= rows[0]["lookup_ceiling"] >= 1.0
    assert "prompt lookup's ceiling on edit at batch 1" in format_spec_bench(rows, 2)
