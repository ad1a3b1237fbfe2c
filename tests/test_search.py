"""Parallelization search: sharding rules, the MILP over placements, the pipeline split."""
import pytest
import torch

from ffc import knobs
from ffc.cluster import load_profile
from ffc.ir import parse, print_module
from ffc.ir.sharding import P, R, S, strategies
from ffc.ir.strategy import Workload
from ffc.search import search

W7B = Workload(prompt_tokens=512, output_tokens=128, batch=8, max_seq_len=4096, weight_dtype="bf16")


def _raised(model, max_seq_len):
    """The forward graph after the raise passes (where the search runs)."""
    from ffc import frontend
    from ffc.passes import PIPELINE, PassContext, run_pipeline
    from ffc.passes.pipeline import SEARCH_POINT as stop
    return run_pipeline(frontend.trace(model, max_seq_len), PIPELINE[:stop], PassContext(max_seq_len)).module


def _llama7b_shape(layers: int):
    """A Llama-2-7B-shaped model (4096 wide, ``layers`` layers): shapes only, no weights in
    memory (meta init, then uninitialized storage that tracing never reads)."""
    path = knobs.cache_dir() / "plans" / f"llama-7b-shape-{layers}.v2.ir"     # v2: nodes carry their layer
    if not path.exists():
        import transformers as tf
        cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=4096)
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(cfg).eval()
        module = _raised(model.to_empty(device="cpu"), 4096)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(print_module(module))
    return parse(path.read_text())


@pytest.fixture(scope="module")
def llama7b():
    """Llama-2-7B's shape, all 32 layers."""
    return _llama7b_shape(32)


@pytest.fixture(scope="module")
def llama7b_4():
    """Its first 4 layers: what a test of per-layer choices needs, in a MILP a tenth the size."""
    return _llama7b_shape(4)


def _by_origin(st):
    return {c.origin: c for c in st.choices}


def test_sharding_rules():
    m = parse("""param @w : f32[12,8]
param @n : f32[8]

graph forward(%x : f32[1,T,8]) {
  %0 = linear(%x, @w) : f32[1,T,12]
  %1 = reshape(%0) {shape=[1,"T",3,4]} : f32[1,T,3,4]
  %2 = rms_norm(%x, @n) {eps=1e-5} : f32[1,T,8]
  %3 = add(%x, %2) : f32[1,T,8]
  return %1, %3
}
""")
    g = m.graphs["forward"]
    lin, view, norm, add = g.nodes
    got = {s.name: (s.inputs, s.output) for s in strategies(lin, 2, m.params)}
    assert got == {"replicated": ((R, R), R), "column": ((R, S(0)), S(2)), "row": ((S(2), S(1)), P)}
    assert {s.name for s in strategies(lin, 5, m.params)} == {"replicated"}      # 12 and 8 do not split in 5
    assert {(s.inputs[0], s.output) for s in strategies(view, 3, m.params)} >= {(S(2), S(2)), (P, P)}
    assert all(s.inputs[0] in (R,) or s.inputs[0].dim != 2 for s in strategies(norm, 2, m.params))
    assert ((P, P), P) in {(s.inputs, s.output) for s in strategies(add, 2, m.params)}


def test_megatron_found_on_h100_for_7b(llama7b):
    st = search(llama7b, tp=4, profile=load_profile("h100-nvlink"), workload=W7B)
    by = _by_origin(st)
    for layer in (0, 17, 31):
        pre = f"model.layers.{layer}."
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert by[pre + proj].strategy == "column", (proj, by[pre + proj])
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            assert by[pre + proj].strategy == "row", (proj, by[pre + proj])
        assert any(c.op == "attention" and c.strategy == "heads" for c in st.choices if c.origin == pre + "self_attn")
    per_layer = {}
    for c in st.collectives:
        per_layer.setdefault(st.choice(c.consumer).layer, []).append(c.kind)
    assert all(per_layer.get(k) == ["all_reduce", "all_reduce"] for k in range(32)), per_layer
    # the lm_head is vocab-parallel (column), its logits gathered once
    assert by["lm_head"].strategy == "column" and per_layer.get(None) == ["all_gather"]
    assert st.predicted.memory_bytes < st.predicted.memory_limit
    assert "all replicated" in st.describe() and "rejected" in st.describe()


def test_slow_link_picks_fewer_collectives_and_says_why(llama7b):
    fast = search(llama7b, tp=4, profile=load_profile("h100-nvlink"), workload=W7B, explain=False)
    slow = search(llama7b, tp=4, profile=load_profile("h100-nvlink").scaled_link(1000), workload=W7B)
    assert len(slow.collectives) < len(fast.collectives)
    text = slow.describe()
    refs = {r.plan: (r.compute_s, r.comm_s) for r in slow.references}
    # why: sharding would cut compute but cost far more communication on this link
    assert refs["fastest ignoring communication"][0] < refs["chosen"][0]
    assert sum(refs["fastest ignoring communication"]) > sum(refs["chosen"])
    assert "link 1000x slower" in text and "fastest ignoring communication" in text


def test_memory_limit_shards_what_must_be_sharded(llama7b_4):
    prof = load_profile("h100-nvlink").scaled_link(1000)          # sharding only when it must
    free = search(llama7b_4, tp=4, profile=prof, workload=W7B, explain=False)
    need = free.predicted.memory_bytes
    assert len(free.collectives) == 0
    limit = 0.6 * need
    st = search(llama7b_4, tp=4, profile=prof, workload=W7B, memory_limit=limit, explain=False)
    assert st.predicted.memory_bytes <= limit
    sharded = [c for c in st.choices if c.strategy != "replicated" and c.op in ("linear", "attention")]
    total = [c for c in st.choices if c.op in ("linear", "attention")]
    assert 0 < len(sharded) < len(total)
    with pytest.raises(Exception, match="no tp=4 plan fits"):
        search(llama7b_4, tp=4, profile=prof, workload=W7B, memory_limit=0.05 * need, explain=False)


def test_pipeline_split_balances_cost_not_layers():
    """Llama-3.2-1B's shape: 16 layers and a 128256-token vocabulary, so the lm_head costs
    about four layers; the last stage must take fewer layers than the others."""
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).eval()
    m = _raised(model.to_empty(device="cpu"), 2048)
    st = search(m, tp=1, pp=4, profile=load_profile("a100-nvlink"), workload=Workload(max_seq_len=2048),
                explain=False)
    layers = [[k for k in range(s.first_segment, s.last_segment + 1) if 1 <= k <= 16]
              for s in st.stages]  # segment 0: head
    assert [x for part in layers for x in part] == list(range(1, 17))
    assert len(layers[-1]) < min(len(x) for x in layers[:-1])
    secs = [s.seconds for s in st.stages]
    # against four equal layer counts (4/4/4/4, the head with the first and the lm_head with the last)
    cost = {}
    for c in st.choices:
        cost[c.layer] = cost.get(c.layer, 0.0) + c.compute_s
    even = [sum(cost[k] for k in range(4 * i, 4 * i + 4)) for i in range(4)]
    even[-1] += cost[None]
    assert max(secs) < 0.8 * max(even)


def test_every_pipeline_stage_holds_a_layer():
    """Two small layers and a 49152-token lm_head: the slowest-stage minimum alone would put both
    layers on stage 0 and the lm_head alone on stage 1, which compile cannot build. Every stage
    holds a layer (a constraint of the split), and the dry run refuses pp above the layer count
    with compile's message instead of listing it as fitting."""
    import transformers as tf
    from ffc.errors import InvalidRequestError
    from ffc.parallel import plan_candidates
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).eval()
    m = _raised(model.to_empty(device="cpu"), 256)
    prof, w = load_profile("a100-nvlink"), Workload(max_seq_len=256)
    st = search(m, tp=1, pp=2, profile=prof, workload=w, explain=False)
    assert [(s.first_layer, s.last_layer) for s in st.stages] == [(0, 0), (1, 1)]
    msg = "--pp 3 needs a transformer layer on every pipeline stage but the model has 2: use --pp 2 or fewer"
    with pytest.raises(InvalidRequestError, match=msg):
        search(m, tp=1, pp=3, profile=prof, workload=w, explain=False)
    rows = {(t, p): (st, err) for t, p, st, err in plan_candidates(m, prof, w, "auto", "auto", 4, None)}
    assert rows[(1, 4)][0] is None and rows[(1, 4)][1].startswith("--pp 4 needs a transformer layer")
    assert rows[(1, 2)][0] is not None and all(s.has_layers for s in rows[(1, 2)][0].stages)


def test_tp_on_the_default_model_respects_head_counts(smol_source):
    """SmolLM2 has 9 query / 3 KV heads: attention cannot split in 2, the MLP can."""
    from ffc import sources
    model = sources.load_model(smol_source)
    m = _raised(model, 512)
    st = search(m, tp=2, profile=load_profile("a100-nvlink"), workload=Workload(max_seq_len=512))
    by = _by_origin(st)
    assert all(c.strategy == "replicated" for c in st.choices if c.op == "attention")
    assert by["model.layers.3.mlp.gate_proj"].strategy == "column"
    assert by["model.layers.3.mlp.down_proj"].strategy == "row"


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "ffc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_dry_run_prints_every_candidate(smol_hf):
    r = _cli("compile", "smollm2-135m", "--tp", "auto", "--pp", "auto", "--devices", "2", "--profile", "a100-nvlink",
             "--workload", "prompt=128,output=64,batch=4", "--dry-run")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line[:3].strip().isdigit()]
    assert [row[:2] for row in rows] == [["1", "1"], ["1", "2"], ["2", "1"]]
    assert "best: tp=" in r.stdout and "weights/rank" in r.stdout and "yes" in r.stdout
    # one rank holds the tied embedding / lm_head once (parameters() lists it once)
    assert " ".join(rows[0][2:4]) == f"{sum(p.numel() for p in smol_hf.parameters()) * 4 / 2**20:.1f} MiB"


def test_best_prefers_fewer_devices_within_the_cost_models_reach():
    """pp=2 with two batches in flight predicts the throughput of one rank (to rounding): one
    rank is chosen; a clearly faster candidate still wins."""
    from types import SimpleNamespace as NS
    from ffc.parallel import best

    def cand(tp, pp, tok_s, fits=True):
        return (tp, pp, NS(predicted=NS(decode_tok_s=tok_s, fits=fits)), "")
    assert best([cand(1, 1, 484.0), cand(1, 2, 484.3), cand(2, 1, 309.0)])[:2] == (1, 1)
    assert best([cand(1, 1, 484.0), cand(1, 2, 560.0)])[:2] == (1, 2)
    assert best([cand(1, 1, 900.0, fits=False), cand(2, 1, 309.0)])[:2] == (2, 1)
    assert best([cand(1, 1, 900.0, fits=False)]) is None


@pytest.mark.parametrize("args,msg", [
    (["--tp", "3x", "--dry-run"], "parallel degree '3x'"),
    (["--tp", "2", "--profile", "tpu-v9", "--dry-run"], "unknown device profile 'tpu-v9'"),
    (["--tp", "2", "--profile", "a100-nvlink", "--workload", "prompt=lots", "--dry-run"], "--workload"),
    (["--tp", "auto", "--profile", "a100-nvlink", "--dry-run"], "need --devices"),
    (["--tp", "2", "--pp", "2", "--devices", "2", "--dry-run"], "--tp 2 --pp 2 needs 4 devices but --devices gives 2"),
    (["--tp", "2", "--devices", "1", "-o", "x.ffc"], "--tp 2 --pp 1 needs 2 devices but --devices gives 1"),
])
def test_bad_parallel_options(args, msg):
    r = _cli("compile", "smollm2-135m", *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_calibrate_measures_this_machine(tmp_path):
    out = tmp_path / "local.json"
    r = _cli("calibrate", "-o", out)
    assert r.returncode == 0, r.stderr
    prof = load_profile(str(out))
    assert prof.flops("fp32") > 1e9 and prof.memory_bandwidth > 1e9 and prof.memory_bytes > 1e9
    fitted = {c: (a, b) for c, p, a, b in prof.link.fitted if p == 2}
    assert {"all_reduce", "all_gather", "send_recv"} <= set(fitted)
    # the fit reproduces what gloo does: more bytes take longer
    assert prof.collective_time("all_reduce", 16 << 20, 2) > prof.collective_time("all_reduce", 4 << 10, 2)
    assert "disk reads, page cache bypassed" in r.stderr and "GB/s" in r.stderr     # the offload policy's disk
