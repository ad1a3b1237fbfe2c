"""Each pass: IR text before, the exact IR expected after, the same numbers from the
interpreter before and after, and one input the pass must leave unchanged."""
import pytest
import torch

from ffc.ir import Comm, Placement, materialize_params, parse, print_module, run_graph, verify_module
from ffc.ir.strategy import Strategy
from ffc.passes import PassContext
from ffc.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from ffc.passes.eliminate_dead_code import eliminate_dead_code
from ffc.passes.fold_constants import fold_constants
from ffc.passes.fuse_gate_up import fuse_gate_up
from ffc.passes.fuse_qkv import fuse_qkv
from ffc.passes.insert_kv_cache import insert_kv_cache
from ffc.passes.raise_attention import raise_attention
from ffc.passes.raise_glu import raise_glu
from ffc.passes.raise_rms_norm import raise_rms_norm
from ffc.passes.raise_rope import raise_rope
from ffc.passes.remove_noops import remove_noops
from ffc.passes.select_logits import select_logits

CTX = PassContext(max_seq_len=16)
H = "# ffc ir 1\n"


def full(text: str) -> str:
    """A module's text: the header, then a blank line before the first graph when there are no params."""
    return H + ("\n" if text.startswith("graph") else "") + text


def _inputs(g, T=5):
    out = {}
    for n in g.inputs:
        shape = n.type.concrete({"T": T, "B": T, "N": 2, "S": 1})
        if n.type.dtype == "i64":
            out[n.name] = torch.arange(T)[None] if n.name == "position_ids" else torch.randint(0, 7, shape)
        else:
            out[n.name] = torch.randn(shape)
    return out


def check(p, before: str, after: str, ctx=CTX):
    m0 = parse(full(before))
    verify_module(m0)
    m1 = p(m0, ctx)
    assert print_module(m1) == full(after)
    assert print_module(m0) == full(before), "a pass must not mutate its input"
    verify_module(m1)
    same_interface = set(m0.graphs) == set(m1.graphs) and all(
        [n.name for n in g.inputs] == [n.name for n in m1.graphs[k].inputs] for k, g in m0.graphs.items())
    if same_interface:  # same numbers
        torch.manual_seed(0)
        raw = {k: torch.randn(v.type.concrete({})) for k, v in m0.params.items() if v.recipe is None}
        for name, g in m0.graphs.items():
            ins = _inputs(g)
            a, = run_graph(g, materialize_params(m0.params, raw), ins)
            b, = run_graph(m1.graphs[name], materialize_params(m1.params, raw), ins)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1.3e-6)
    return m1


def unchanged(p, text: str, ctx=CTX):
    m = parse(full(text))
    assert print_module(p(m, ctx)) == full(text)


def test_remove_noops():
    check(remove_noops, """param @w : f32[4]

graph forward(%x : f32[1,T,4]) {
  %0 = cast(%x) {dtype="f32"} : f32[1,T,4]
  %1 = mul(%0, 1.0) : f32[1,T,4]
  %2 = reshape(%1) {shape=[1,"T",4]} : f32[1,T,4]
  %3 = cast(@w) {dtype="f32"} : f32[4]
  %4 = mul(%2, %3) : f32[1,T,4]
  return %4
}
""", """param @w : f32[4]

graph forward(%x : f32[1,T,4]) {
  %0 = mul(%x, @w) : f32[1,T,4]
  return %0
}
""")
    unchanged(remove_noops, """graph forward(%x : f32[1,T,4]) {
  %0 = cast(%x) {dtype="f16"} : f16[1,T,4]
  %1 = mul(%0, 2.0) : f16[1,T,4]
  return %1
}
""")


def test_eliminate_dead_code():
    check(eliminate_dead_code, """graph forward(%x : f32[1,T,4]) {
  %0 = exp(%x) : f32[1,T,4]
  %1 = neg(%x) : f32[1,T,4]
  %2 = tanh(%1) : f32[1,T,4]
  return %1
}
""", """graph forward(%x : f32[1,T,4]) {
  %0 = neg(%x) : f32[1,T,4]
  return %0
}
""")
    unchanged(eliminate_dead_code, """graph forward(%x : f32[1,T,4]) {
  %0 = neg(%x) : f32[1,T,4]
  return %0
}
""")


def test_fold_constants_makes_a_derived_param():
    check(fold_constants, """param @w : f32[4,8]

graph forward(%x : f32[1,T,8]) {
  %0 = transpose(@w) {dim0=0, dim1=1} : f32[8,4]
  %1 = matmul(%x, %0) : f32[1,T,4]
  return %1
}
""", """param @w : f32[4,8]
param @w.transpose_0_1 : f32[8,4] = transpose(@w) {dim0=0, dim1=1}

graph forward(%x : f32[1,T,8]) {
  %0 = matmul(%x, @w.transpose_0_1) : f32[1,T,4]
  return %0
}
""")
    unchanged(fold_constants, """param @w : f32[8,4]

graph forward(%x : f32[1,T,8]) {
  %0 = transpose(%x) {dim0=1, dim1=2} : f32[1,8,T]
  %1 = matmul(%x, @w) : f32[1,T,4]
  return %1
}
""")


def test_eliminate_common_subexpressions():
    check(eliminate_common_subexpressions, """graph forward(%x : f32[1,T,4]) {
  %0 = unsqueeze(%x) {dim=1} : f32[1,1,T,4]
  %1 = unsqueeze(%x) {dim=1} : f32[1,1,T,4]
  %2 = add(%0, %1) : f32[1,1,T,4]
  return %2
}
""", """graph forward(%x : f32[1,T,4]) {
  %0 = unsqueeze(%x) {dim=1} : f32[1,1,T,4]
  %1 = add(%0, %0) : f32[1,1,T,4]
  return %1
}
""")
    unchanged(eliminate_common_subexpressions, """graph forward(%x : f32[1,T,4]) {
  %0 = unsqueeze(%x) {dim=1} : f32[1,1,T,4]
  %1 = unsqueeze(%x) {dim=2} : f32[1,T,1,4]
  %2 = add(%0, %1) : f32[1,T,T,4]
  return %2
}
""")


RMS = """param @w : f32[8]

graph forward(%x : f32[1,T,8]) {
  %0 = pow(%x, 2) : f32[1,T,8]
  %1 = mean(%0) {dims=[2], keepdim=true} : f32[1,T,1]
  %2 = add(%1, 1e-05) : f32[1,T,1]
  %3 = rsqrt(%2) : f32[1,T,1]
  %4 = mul(%x, %3) : f32[1,T,8]
  %5 = mul(@w, %4) : f32[1,T,8]
  return %5
}
"""


def test_raise_rms_norm():
    check(raise_rms_norm, RMS, """param @w : f32[8]

graph forward(%x : f32[1,T,8]) {
  %0 = pow(%x, 2) : f32[1,T,8]
  %1 = mean(%0) {dims=[2], keepdim=true} : f32[1,T,1]
  %2 = add(%1, 1e-05) : f32[1,T,1]
  %3 = rsqrt(%2) : f32[1,T,1]
  %4 = mul(%x, %3) : f32[1,T,8]
  %5 = rms_norm(%x, @w) {eps=1e-05} : f32[1,T,8]
  return %5
}
""")
    # mean over the wrong dimension is not an RMSNorm
    unchanged(raise_rms_norm, RMS.replace("dims=[2], keepdim=true} : f32[1,T,1]", "dims=[1], keepdim=true} : f32[1,1,8]")
              .replace("%2 = add(%1, 1e-05) : f32[1,T,1]", "%2 = add(%1, 1e-05) : f32[1,1,8]")
              .replace("%3 = rsqrt(%2) : f32[1,T,1]", "%3 = rsqrt(%2) : f32[1,1,8]"))


ROPE = """graph forward(%x : f32[1,2,T,4], %cos : f32[1,1,T,4], %sin : f32[1,1,T,4]) {
  %0 = mul(%x, %cos) : f32[1,2,T,4]
  %1 = slice(%x) {dim=3, end=2, start=0, step=1} : f32[1,2,T,2]
  %2 = slice(%x) {dim=3, end=null, start=2, step=1} : f32[1,2,T,2]
  %3 = neg(%2) : f32[1,2,T,2]
  %4 = concat(%3, %1) {dim=3} : f32[1,2,T,4]
  %5 = mul(%4, %sin) : f32[1,2,T,4]
  %6 = add(%0, %5) : f32[1,2,T,4]
  return %6
}
"""


def test_raise_rope():
    check(raise_rope, ROPE, """graph forward(%x : f32[1,2,T,4], %cos : f32[1,1,T,4], %sin : f32[1,1,T,4]) {
  %0 = mul(%x, %cos) : f32[1,2,T,4]
  %1 = slice(%x) {dim=3, end=2, start=0, step=1} : f32[1,2,T,2]
  %2 = slice(%x) {dim=3, end=null, start=2, step=1} : f32[1,2,T,2]
  %3 = neg(%2) : f32[1,2,T,2]
  %4 = concat(%3, %1) {dim=3} : f32[1,2,T,4]
  %5 = mul(%4, %sin) : f32[1,2,T,4]
  %6 = rope(%x, %cos, %sin) : f32[1,2,T,4]
  return %6
}
""")
    # halves swapped the other way round (x1 negated) is not rotate-half
    unchanged(raise_rope, ROPE.replace("%4 = concat(%3, %1)", "%4 = concat(%1, %3)"))


ATTN = """graph forward(%q : f32[1,4,T,8], %k : f32[1,2,T,8], %v : f32[1,2,T,8]) {
  %0 = unsqueeze(%k) {dim=2} : f32[1,2,1,T,8]
  %1 = expand(%0) {shape=[1,2,2,"T",8]} : f32[1,2,2,T,8]
  %2 = reshape(%1) {shape=[1,4,"T",8]} : f32[1,4,T,8]
  %3 = unsqueeze(%v) {dim=2} : f32[1,2,1,T,8]
  %4 = expand(%3) {shape=[1,2,2,"T",8]} : f32[1,2,2,T,8]
  %5 = reshape(%4) {shape=[1,4,"T",8]} : f32[1,4,T,8]
  %6 = sdpa(%q, %2, %5) {causal=true, scale=0.3} : f32[1,4,T,8]
  return %6
}
"""


def test_raise_attention_removes_repeat_kv():
    check(raise_attention, ATTN, """graph forward(%q : f32[1,4,T,8], %k : f32[1,2,T,8], %v : f32[1,2,T,8]) {
  %0 = unsqueeze(%k) {dim=2} : f32[1,2,1,T,8]
  %1 = expand(%0) {shape=[1,2,2,"T",8]} : f32[1,2,2,T,8]
  %2 = reshape(%1) {shape=[1,4,"T",8]} : f32[1,4,T,8]
  %3 = unsqueeze(%v) {dim=2} : f32[1,2,1,T,8]
  %4 = expand(%3) {shape=[1,2,2,"T",8]} : f32[1,2,2,T,8]
  %5 = reshape(%4) {shape=[1,4,"T",8]} : f32[1,4,T,8]
  %6 = attention(%q, %k, %v) {causal=true, scale=0.3, window=null} : f32[1,4,T,8]
  return %6
}
""")
    unchanged(raise_attention, """graph forward(%q : f32[1,4,T,8], %k : f32[1,4,T,8], %v : f32[1,4,T,8]) {
  %0 = matmul(%q, %k) {} : f32[1,4,T,T]
  return %0
}
""".replace(" {}", "").replace("%k) : f32[1,4,T,T]", "%k) : f32[1,4,T,T]").replace(
        "%k : f32[1,4,T,8], %v", "%k : f32[1,4,8,T], %v"))


GLU = """graph forward(%a : f32[1,T,8], %b : f32[1,T,8]) {
  %0 = silu(%a) : f32[1,T,8]
  %1 = mul(%0, %b) : f32[1,T,8]
  return %1
}
"""


def test_raise_glu():
    check(raise_glu, GLU, """graph forward(%a : f32[1,T,8], %b : f32[1,T,8]) {
  %0 = silu(%a) : f32[1,T,8]
  %1 = glu(%a, %b) {act="silu"} : f32[1,T,8]
  return %1
}
""")
    unchanged(raise_glu, GLU.replace("silu(%a)", "neg(%a)"))


QKV = """param @q.weight : f32[8,8]
param @k.weight : f32[4,8]
param @v.weight : f32[4,8]

graph forward(%x : f32[1,T,8]) {
  %0 = linear(%x, @q.weight) : f32[1,T,8]  # attn.q
  %1 = reshape(%0) {shape=[1,"T",2,4]} : f32[1,T,2,4]
  %2 = transpose(%1) {dim0=1, dim1=2} : f32[1,2,T,4]
  %3 = linear(%x, @k.weight) : f32[1,T,4]  # attn.k
  %4 = reshape(%3) {shape=[1,"T",1,4]} : f32[1,T,1,4]
  %5 = transpose(%4) {dim0=1, dim1=2} : f32[1,1,T,4]
  %6 = linear(%x, @v.weight) : f32[1,T,4]  # attn.v
  %7 = reshape(%6) {shape=[1,"T",1,4]} : f32[1,T,1,4]
  %8 = transpose(%7) {dim0=1, dim1=2} : f32[1,1,T,4]
  %9 = attention(%2, %5, %8) {causal=true, scale=0.5, window=null} : f32[1,2,T,4]
  return %9
}
"""


def test_fuse_qkv():
    check(fuse_qkv, QKV, """param @q.weight : f32[8,8]
param @k.weight : f32[4,8]
param @v.weight : f32[4,8]
param @q+k+v.weight : f32[16,8] = concat(@q.weight, @k.weight, @v.weight) {dim=0}

graph forward(%x : f32[1,T,8]) {
  %0 = linear(%x, @q+k+v.weight) : f32[1,T,16]  # attn
  %1 = slice(%0) {dim=2, end=8, start=0, step=1} : f32[1,T,8]  # attn.q
  %2 = slice(%0) {dim=2, end=12, start=8, step=1} : f32[1,T,4]  # attn.k
  %3 = slice(%0) {dim=2, end=16, start=12, step=1} : f32[1,T,4]  # attn.v
  %4 = reshape(%1) {shape=[1,"T",2,4]} : f32[1,T,2,4]
  %5 = transpose(%4) {dim0=1, dim1=2} : f32[1,2,T,4]
  %6 = reshape(%2) {shape=[1,"T",1,4]} : f32[1,T,1,4]
  %7 = transpose(%6) {dim0=1, dim1=2} : f32[1,1,T,4]
  %8 = reshape(%3) {shape=[1,"T",1,4]} : f32[1,T,1,4]
  %9 = transpose(%8) {dim0=1, dim1=2} : f32[1,1,T,4]
  %10 = attention(%5, %7, %9) {causal=true, scale=0.5, window=null} : f32[1,2,T,4]
  return %10
}
""")
    # linears sharing an input but not feeding one attention stay apart
    unchanged(fuse_qkv, """param @a : f32[4,8]
param @b : f32[4,8]

graph forward(%x : f32[1,T,8]) {
  %0 = linear(%x, @a) : f32[1,T,4]
  %1 = linear(%x, @b) : f32[1,T,4]
  %2 = add(%0, %1) : f32[1,T,4]
  return %2
}
""")


def test_fuse_gate_up():
    check(fuse_gate_up, """param @mlp.gate.weight : f32[6,4]
param @mlp.up.weight : f32[6,4]

graph forward(%x : f32[1,T,4]) {
  %0 = linear(%x, @mlp.gate.weight) : f32[1,T,6]  # mlp.gate
  %1 = linear(%x, @mlp.up.weight) : f32[1,T,6]  # mlp.up
  %2 = glu(%0, %1) {act="silu"} : f32[1,T,6]  # mlp
  return %2
}
""", """param @mlp.gate.weight : f32[6,4]
param @mlp.up.weight : f32[6,4]
param @mlp.gate+up.weight : f32[12,4] = concat(@mlp.gate.weight, @mlp.up.weight) {dim=0}

graph forward(%x : f32[1,T,4]) {
  %0 = linear(%x, @mlp.gate+up.weight) : f32[1,T,12]  # mlp
  %1 = slice(%0) {dim=2, end=6, start=0, step=1} : f32[1,T,6]  # mlp.gate
  %2 = slice(%0) {dim=2, end=12, start=6, step=1} : f32[1,T,6]  # mlp.up
  %3 = glu(%1, %2) {act="silu"} : f32[1,T,6]  # mlp
  return %3
}
""")
    unchanged(fuse_gate_up, GLU)


KV_BEFORE = """param @emb : f32[7,8]

graph forward(%input_ids : i64[1,T], %position_ids : i64[1,T]) {
  %0 = embedding(%input_ids, @emb) : f32[1,T,8]
  %1 = reshape(%0) {shape=[1,"T",2,4]} : f32[1,T,2,4]
  %2 = transpose(%1) {dim0=1, dim1=2} : f32[1,2,T,4]
  %3 = attention(%2, %2, %2) {causal=true, scale=0.5, window=null} : f32[1,2,T,4]
  return %3
}
"""


def _kv_graph(name, t, form):
    return f"""graph {name}(%input_ids : i64[1,{t}], %position_ids : i64[1,{t}], %seq_ids : i64[{t}], %block_tables : i64[N,4], %kv_cache : f32[1,2,S,2,4,4]) {{
  %0 = embedding(%input_ids, @emb) : f32[1,{t},8]
  %1 = reshape(%0) {{shape=[1,"{t}",2,4]}} : f32[1,{t},2,4]
  %2 = transpose(%1) {{dim0=1, dim1=2}} : f32[1,2,{t},4]
  %3 = cached_attention(%2, %2, %2, %position_ids, %seq_ids, %block_tables, %kv_cache) {{form="{form}", layer=0, scale=0.5, window=null}} : f32[1,2,{t},4]
  return %3
}}
"""


VERIFY_AFTER = """graph verify(%input_ids : i64[1,T], %position_ids : i64[1,T], %seq_ids : i64[T], %block_tables : i64[N,4], %kv_cache : f32[1,2,S,2,4,4], %tree_base : i64[T], %tree_mask : i64[T]) {
  %0 = embedding(%input_ids, @emb) : f32[1,T,8]
  %1 = reshape(%0) {shape=[1,"T",2,4]} : f32[1,T,2,4]
  %2 = transpose(%1) {dim0=1, dim1=2} : f32[1,2,T,4]
  %3 = cached_attention(%2, %2, %2, %position_ids, %seq_ids, %block_tables, %kv_cache, %tree_base, %tree_mask) {form="verify", layer=0, scale=0.5, window=null} : f32[1,2,T,4]
  return %3
}
"""
KV_AFTER = ("param @emb : f32[7,8]\n\n" + _kv_graph("prefill", "T", "prefill") + "\n" + _kv_graph("decode", "B", "decode")
            + "\n" + VERIFY_AFTER)


def test_insert_kv_cache_and_its_numbers():
    ctx = PassContext(max_seq_len=16, kv_block_size=4)
    m = check(insert_kv_cache, KV_BEFORE, KV_AFTER, ctx)
    unchanged(insert_kv_cache, KV_AFTER, ctx)
    # prefill of 5 tokens then decode of 1 equals the stateless graph on 6 tokens; the
    # sequence's blocks are scattered in the pool, and another sequence's blocks are left alone
    m0 = parse(full(KV_BEFORE))
    params = {"emb": torch.randn(7, 8)}
    ids = torch.randint(0, 7, (1, 6))
    ref, = run_graph(m0.graphs["forward"], params, {"input_ids": ids, "position_ids": torch.arange(6)[None]})
    cache = torch.zeros(1, 2, 5, 2, 4, 4)
    cache[:, :, 1] = 7.0  # block 1 belongs to another sequence
    pre, = run_graph(m.graphs["prefill"], params, {
        "input_ids": ids[:, :5], "position_ids": torch.arange(5)[None], "seq_ids": torch.full((5,), 2),
        "block_tables": torch.tensor([[9, 9, 9, 9], [9, 9, 9, 9], [4, 0, 9, 9]]), "kv_cache": cache})
    dec, = run_graph(m.graphs["decode"], params, {"input_ids": ids[:, 5:], "position_ids": torch.tensor([[5]]),
                                                  "seq_ids": torch.tensor([0]),
                                                  "block_tables": torch.tensor([[4, 0, 0, 0]]), "kv_cache": cache})
    torch.testing.assert_close(pre, ref[:, :, :5], atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(dec, ref[:, :, 5:], atol=1e-5, rtol=1.3e-6)
    assert (cache[:, :, 1] == 7.0).all() and (cache[:, :, 2:4] == 0).all()
    assert (cache[0, :, 4] != 0).any() and (cache[0, :, 0, :, :2] != 0).any()
    # the 6th token as a one-node tree on the 5 committed ones: what decode computed
    ver, = run_graph(m.graphs["verify"], params, {
        "input_ids": ids[:, 5:], "position_ids": torch.tensor([[5]]), "seq_ids": torch.tensor([0]),
        "block_tables": torch.tensor([[4, 0, 0, 0]]), "kv_cache": cache, "tree_base": torch.tensor([5]),
        "tree_mask": torch.tensor([1])})
    torch.testing.assert_close(ver, dec)


def test_select_logits():
    before = """param @w : f32[7,8]

graph prefill(%x : f32[1,T,8]) {
  %0 = linear(%x, @w) : f32[1,T,7]
  return %0
}
"""
    after = """param @w : f32[7,8]

graph prefill(%x : f32[1,T,8], %logits_index : i64[N]) {
  %0 = take(%x, %logits_index) {dim=1} : f32[1,N,8]
  %1 = linear(%0, @w) : f32[1,N,7]
  return %1
}
"""
    m = check(select_logits, before, after)
    unchanged(select_logits, after)
    params = {"w": torch.randn(7, 8)}
    x = torch.randn(1, 5, 8)
    out, = run_graph(m.graphs["prefill"], params, {"x": x, "logits_index": torch.tensor([1, 4])})
    torch.testing.assert_close(out[0], torch.nn.functional.linear(x[0, [1, 4]], params["w"]))


TP_BEFORE = """param @w1 : f32[8,4]
param @w2 : f32[4,8]

graph forward(%x : f32[1,T,4]) {
  %0 = linear(%x, @w1) : f32[1,T,8]
  %1 = silu(%0) : f32[1,T,8]
  %2 = linear(%1, @w2) : f32[1,T,4]
  %3 = add(%x, %2) : f32[1,T,4]
  return %3
}
"""
TP_AFTER = """param @w1 : f32[8,4]<R>
param @w2 : f32[4,8]<R>
param @w1.shard0of2 : f32[4,4]<S(0)> = local_shard(@w1) {dim=0, ranks=2}
param @w2.shard1of2 : f32[4,4]<S(1)> = local_shard(@w2) {dim=1, ranks=2}

graph forward(%x : f32[1,T,4]<R>) {
  %0 = linear(%x, @w1.shard0of2) : f32[1,T,4]<S(2)>
  %1 = silu(%0) : f32[1,T,4]<S(2)>
  %2 = linear(%1, @w2.shard1of2) : f32[1,T,4]<P>
  %3 = all_reduce(%2) {ranks=2} : f32[1,T,4]<R>
  %4 = add(%x, %3) : f32[1,T,4]<R>
  return %4
}
"""
# Megatron's MLP: column-parallel up, row-parallel down, one all-reduce before the residual add
TP_PLAN = (("0", ("R", "S(0)"), "S(2)"), ("1", ("S(2)",), "S(2)"), ("2", ("S(2)", "S(1)"), "P"),
           ("3", ("R", "R"), "R"))


def _strategy(plan, tp=2):
    """A hand-made strategy of the placements above (as text)."""
    return Strategy.manual(tp, {k: (tuple(Placement.parse(p) for p in ins), Placement.parse(o))
                                for k, ins, o in plan})


class _Ranks:
    """Ranks as threads of this process: collectives meet at a barrier (a test double of the
    torch.distributed calls the collective ops make)."""

    def __init__(self, n):
        import threading
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n
        self.local = threading.local()

    def exchange(self, t):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def get_rank(self):
        return self.local.rank

    def get_world_size(self):
        return self.n

    def all_reduce(self, t):
        t.copy_(sum(self.exchange(t)))

    def all_gather(self, out, t):
        for o, p in zip(out, self.exchange(t)):
            o.copy_(p)


def test_apply_tensor_parallel():
    import threading

    from ffc.passes.apply_tensor_parallel import apply_tensor_parallel
    ctx = PassContext(max_seq_len=16, tp=2, strategy=_strategy(TP_PLAN))
    m0 = parse(full(TP_BEFORE))
    m1 = apply_tensor_parallel(m0, ctx)
    assert print_module(m1) == H + 'meta {"tp": 2}\n' + TP_AFTER      # placements in the types
    assert print_module(m0) == full(TP_BEFORE)
    verify_module(m1)
    unchanged(apply_tensor_parallel, TP_BEFORE)                      # no plan: nothing to do
    # each rank's graph on its own weights, collectives between the ranks, equals the original
    ranks = _Ranks(2)
    raw = {"w1": torch.randn(8, 4), "w2": torch.randn(4, 8)}
    x = torch.randn(1, 5, 4)
    want, = run_graph(m0.graphs["forward"], raw, {"x": x})
    got = [None, None]

    def rank(r):
        ranks.local.rank = r
        got[r], = run_graph(m1.graphs["forward"], materialize_params(m1.params, raw, rank=r), {"x": x},
                            comm=Comm(ranks))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for g in got:
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1.3e-6)
    with pytest.raises(ValueError, match="no placement for %3"):
        apply_tensor_parallel(m0, PassContext(max_seq_len=16, tp=2, strategy=_strategy(TP_PLAN[:3])))
