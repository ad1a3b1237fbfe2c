"""Generated kernels against the reference interpreter on random inputs with odd sizes, the
structure of the default model's plan, the build cache and build errors."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from ffc import build
from ffc.codegen import render_sources
from ffc.errors import FfcError
from ffc.ir import DType, materialize_params, parse, run_graph, verify_module
from ffc.lower import lower_module
from ffc.lower.describe import describe_plan
from ffc.plan.schema import Packed
from ffc.runtime.compiled import CompiledPlan

from conftest import QKV_ROPE_IR

KERNEL_IR = """# ffc ir 1
meta {}
param @w1 : f32[13,37]
param @b1 : f32[13]
param @wgu : f32[26,37]
param @w16 : f32[19,37]
param @w16.bf16 : bf16[19,37] = cast(@w16) {dtype="bf16"}
param @wh : f32[21,37]
param @wh.f16 : f16[21,37] = cast(@wh) {dtype="f16"}
param @g : f32[37]
param @b : f32[37]
param @v : f32[7]
param @inv_freq : f32[3]
param @emb : f32[50,37]
param @tok : f32[100,37]
param @rw : f32[7,37]
param @egu : f32[7,26,37]
param @edn : f32[7,37,13]
param @egu.bf16 : bf16[7,26,37] = cast(@egu) {dtype="bf16"}
param @edn.bf16 : bf16[7,37,13] = cast(@edn) {dtype="bf16"}
param @slopes : f32[4]
graph lin(%x : f32[1,T,37], %r : f32[1,T,13]) {
  %0 = linear(%x, @w1, @b1) : f32[1,T,13]
  %1 = gelu(%0) {approximate="tanh"} : f32[1,T,13]
  %2 = add(%1, %r) : f32[1,T,13]
  %3 = linear(%x, @wgu) : f32[1,T,26]
  %4 = slice(%3) {dim=2, end=13, start=0, step=1} : f32[1,T,13]
  %5 = slice(%3) {dim=2, end=26, start=13, step=1} : f32[1,T,13]
  %6 = glu(%4, %5) {act="silu"} : f32[1,T,13]
  return %2, %6
}
graph narrow(%x : f32[1,T,37]) {
  %0 = cast(@w16.bf16) {dtype="f32"} : f32[19,37]
  %1 = linear(%x, %0) : f32[1,T,19]
  %2 = cast(@wh.f16) {dtype="f32"} : f32[21,37]
  %3 = linear(%x, %2) : f32[1,T,21]
  return %1, %3
}
graph tied(%ids : i64[1,T]) {
  %0 = embedding(%ids, @tok) : f32[1,T,37]
  %1 = linear(%0, @tok) : f32[1,T,100]
  return %1
}
graph norm(%x : f32[1,T,37], %r : f32[1,T,37], %idx : i64[N], %ids : i64[1,T]) {
  %0 = add(%x, %r) : f32[1,T,37]
  %1 = rms_norm(%0, @g) {eps=1e-05} : f32[1,T,37]
  %2 = layer_norm(%0, @g, @b) {eps=1e-05} : f32[1,T,37]
  %3 = rms_norm(%x, @g) {eps=1e-06} : f32[1,T,37]
  %4 = take(%3, %idx) {dim=1} : f32[1,N,37]
  %5 = embedding(%ids, @emb) : f32[1,T,37]
  %6 = add(%1, %5) : f32[1,T,37]
  return %6, %2, %4
}
graph pw(%x : f32[1,T,7]) {
  %0 = silu(%x) : f32[1,T,7]
  %1 = mul(%0, @v) : f32[1,T,7]
  %2 = mul(%x, %x) : f32[1,T,7]
  %3 = add(%2, 1.0) : f32[1,T,7]
  %4 = rsqrt(%3) : f32[1,T,7]
  %5 = add(%1, %4) : f32[1,T,7]
  %6 = transpose(%5) {dim0=1, dim1=2} : f32[1,7,T]
  %7 = exp(%6) : f32[1,7,T]
  return %7
}
graph moe(%x : f32[T,37]) {
  %0 = linear(%x, @rw) : f32[T,7]
  %1 = moe_route(%0) {normalize=true, top_k=2} : f32[T,7]
  %2 = moe_experts(%x, %1, @egu, @edn) {act="silu", top_k=2} : f32[T,37]
  %3 = moe_route(%0) {normalize=false, top_k=3} : f32[T,7]
  %4 = moe_experts(%x, %3, @egu, @edn) {act="gelu_tanh", top_k=3} : f32[T,37]
  return %2, %4, %1
}
graph moe16(%x : f32[T,37]) {
  %0 = linear(%x, @rw) : f32[T,7]
  %1 = moe_route(%0) {normalize=true, top_k=2} : f32[T,7]
  %2 = cast(@egu.bf16) {dtype="f32"} : f32[7,26,37]
  %3 = cast(@edn.bf16) {dtype="f32"} : f32[7,37,13]
  %4 = moe_experts(%x, %1, %2, %3) {act="silu", top_k=2} : f32[T,37]
  return %4
}
graph attn(%qkv : f32[1,T,48], %position_ids : i64[1,T], %seq_ids : i64[T], %block_tables : i64[N,5], %kv_cache : f32[2,2,S,2,8,6]) {
""" + QKV_ROPE_IR + """  %19 = cached_attention(%17, %18, %14, %position_ids, %seq_ids, %block_tables, %kv_cache) {form="prefill", layer=1, scale=0.4, window=null} : f32[1,4,T,6]
  %20 = cached_attention(%10, %12, %14, %position_ids, %seq_ids, %block_tables, %kv_cache) {form="prefill", layer=0, scale=null, window=3} : f32[1,4,T,6]
  %21 = cached_attention(%10, %12, %14, %position_ids, %seq_ids, %block_tables, %kv_cache, @slopes) {alibi=0.3, form="prefill", layer=0, scale=null, window=null} : f32[1,4,T,6]
  %22 = add(%19, %20) : f32[1,4,T,6]
  %23 = add(%22, %21) : f32[1,4,T,6]
  %24 = transpose(%23) {dim0=1, dim1=2} : f32[1,T,4,6]
  %25 = reshape(%24) {shape=[1,"T",24]} : f32[1,T,24]
  return %25
}
"""

TOL = {"f32": dict(atol=1e-5, rtol=1.3e-6), "bf16": dict(atol=1e-3, rtol=1.6e-2)}


@pytest.fixture(scope="module")
def kernel_lib(tmp_path_factory):
    module = parse(KERNEL_IR)
    verify_module(module)
    plan = lower_module(module, prefill_tokens=40, max_batch=8)
    kdir = tmp_path_factory.mktemp("kernels")
    (kdir / "src").mkdir()
    sources, spans = render_sources(plan)
    for name, text in sources.items():
        (kdir / "src" / name).write_text(text)
    lib = build.load_library(build.build(kdir, "cpu", spans))
    g = torch.Generator().manual_seed(0)
    raw = {n: torch.randn(p.type.concrete({}), generator=g) * 0.5 for n, p in module.params.items()
           if p.recipe is None}
    raw["inv_freq"] = torch.tensor([1.0, 0.1, 0.01])
    weights = materialize_params(module.params, raw)
    return module, plan, CompiledPlan(plan, lib, weights, threads=2), weights, kdir, spans


def _inputs(name, T, N=3, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "lin" or name == "narrow":
        d = {"x": torch.randn(1, T, 37, generator=g)}
        if name == "lin":
            d["r"] = torch.randn(1, T, 13, generator=g)
        return d
    if name == "norm":
        return {"x": torch.randn(1, T, 37, generator=g), "r": torch.randn(1, T, 37, generator=g),
                "idx": torch.randint(0, T, (N,), generator=g), "ids": torch.randint(0, 50, (1, T), generator=g)}
    if name == "tied":
        return {"ids": torch.randint(0, 100, (1, T), generator=g)}
    if name == "pw":
        return {"x": torch.randn(1, T, 7, generator=g)}
    if name in ("moe", "moe16"):
        return {"x": torch.randn(T, 37, generator=g)}
    # attn: two sequences packed (block-table rows 2 and 0, blocks scattered over a pool of 8
    # blocks of 8 positions), positions continuing an earlier chunk
    a = T // 2
    pos = torch.cat([torch.arange(3, 3 + a), torch.arange(T - a)])
    tables = torch.tensor([[5, 1, 7, 0, 0], [0, 0, 0, 0, 0], [2, 6, 3, 4, 0]])
    return {"qkv": torch.randn(1, T, 48, generator=g), "position_ids": pos[None],
            "seq_ids": torch.tensor([2] * a + [0] * (T - a)), "block_tables": tables,
            "kv_cache": torch.randn(2, 2, 8, 2, 8, 6, generator=g)}


@pytest.mark.parametrize("graph", ["lin", "narrow", "tied", "norm", "pw", "attn", "moe", "moe16"])
@pytest.mark.parametrize("T", [1, 3, 9, 31])   # 9 and 31: full 8-row micro-tiles of linears plus a tail
def test_kernels_match_interpreter(kernel_lib, graph, T):
    module, plan, cp, weights, _, _ = kernel_lib
    inputs = _inputs(graph, T)
    ref_inputs = {k: v.clone() for k, v in inputs.items()}
    got = cp.run(graph, inputs)
    ref = run_graph(module.graphs[graph], weights, ref_inputs)
    tol = TOL["bf16"] if graph in ("narrow", "moe16") else TOL["f32"]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **tol)
    if graph == "attn":  # the cache writes (rotated K, V) match too
        torch.testing.assert_close(inputs["kv_cache"], ref_inputs["kv_cache"], **tol)


@pytest.mark.parametrize("arch,isa", [("haswell", "avx2"), ("x86-64", "scalar")])
def test_kernels_built_for_other_isas_match(kernel_lib, arch, isa, tmp_path, monkeypatch):
    """The AVX2 (6x16 micro-tiles) and plain C++ paths, built with FFC_CPU_ARCH on this machine."""
    module, plan, _, weights, _, _ = kernel_lib
    monkeypatch.setenv("FFC_CPU_ARCH", arch)
    (tmp_path / "src").mkdir()
    sources, spans = render_sources(plan)
    for name, text in sources.items():
        (tmp_path / "src" / name).write_text(text)
    lib = build.load_library(build.build(tmp_path, "cpu", spans))
    assert lib.isa() == isa
    cp = CompiledPlan(plan, lib, weights, threads=2)
    for graph in ("lin", "narrow", "tied", "norm", "attn"):
        for T in (1, 9, 31):
            inputs = _inputs(graph, T)
            ref = run_graph(module.graphs[graph], weights, {k: v.clone() for k, v in inputs.items()})
            for g, r in zip(cp.run(graph, inputs), ref):
                torch.testing.assert_close(g, r, **(TOL["bf16"] if graph == "narrow" else TOL["f32"]))


def test_kernel_plan_fuses_what_it_should(kernel_lib):
    _, plan, _, _, kdir, _ = kernel_lib
    fams = {g: [plan.kernels[s.kernel].family.value for s in gp.steps] for g, gp in plan.graphs.items()}
    assert fams["lin"] == ["linear", "linear"]            # gelu+residual and glu are epilogues
    assert fams["attn"].count("attention") == 3 and fams["attn"].count("pointwise") == 2
    text = describe_plan(plan)
    assert "rope on q and k, and the KV-cache write, fused into attention" in text
    # the add feeds two norms: one takes it as a prologue (and writes the sum), the other is refused
    assert "not fused norm+residual" in text and "already fused into norm" in text
    src = (kdir / "src" / "linear.cpp").read_text()
    assert "ffc_gelu_tanh(v)" in src and "ffc_silu(v) * w" in src and "v += res[j]" in src
    # linear weights are read as packed panels; the GLU's gate and up halves are packed apart;
    # the tied table is gathered from the lm_head's panels, so no unpacked copy is kept
    assert plan.packed["wgu#0:13,13:13"] == Packed("wgu", 48, ((0, 13), (13, 13)))
    tied = [a for st in plan.graphs["tied"].steps for a in st.args if a.name.startswith("tok")]
    assert [a.kind.value for a in tied] == ["packed", "packed"]
    assert "ffc_panel_rows<FFC_MR>" in src and "packed in panels of 48" in (kdir / "src" / "gather.cpp").read_text()


def test_default_model_plan_structure(smol_artifact):
    plan = json.loads((smol_artifact / "kernels" / "plan.json").read_text())
    dec = plan["graphs"]["decode"]["steps"]
    layer0 = [s for s in dec if s["origin"].startswith("model.layers.0.") or s["origin"] == "model.layers.0"]
    fams = [plan["kernels"][s["kernel"]]["family"] for s in layer0]
    # norm, qkv, attention(+rope+kv write), o_proj(+residual), norm, gate_up(+silu glu), down(+residual)
    assert fams == ["norm", "linear", "attention", "linear", "norm", "linear", "linear"], fams
    # + embedding, rotary tables, final norm, and the lm_head (113 MB, 8x a layer) in eight row chunks
    # of one kernel (compiler/lower/split.py), each writing its columns of the logits
    assert len(dec) == 7 * 30 + 3 + 8
    head = [s for s in dec if s["origin"] == dec[-1]["origin"]]
    assert len({s["kernel"] for s in head}) == 1 and [s["args"][0]["offset"] for s in head] == \
        [k * 6144 for k in range(8)]
    src = {p.name: p.read_text() for p in (smol_artifact / "kernels" / "src").iterdir()}
    assert "_rope(kc + off" in src["attention.cpp"]       # K rotated on its way into the cache
    assert "ffc_silu(v) * w" in src["linear.cpp"]         # SwiGLU is the gate_up epilogue
    assert "v += res[j]" in src["linear.cpp"]             # residual add is the o_proj/down epilogue
    rejected = [d for d in plan["graphs"]["decode"]["fusion"] if not d["accepted"]]
    assert rejected and all("already fused into linear" in d["reason"] for d in rejected)
    manifest = json.loads((smol_artifact / "manifest.json").read_text())
    assert manifest["kernels"]["isa"] in ("avx512", "avx2", "scalar")


def test_sources_regenerate_from_the_plan(smol_llm, smol_artifact):
    """What ffc.load builds when it does not trust a shipped library: the plan read back from
    the artifact renders exactly the sources the compile wrote (so the build cache has it)."""
    src = {p.name: p.read_text() for p in (smol_artifact / "kernels" / "src").iterdir() if p.is_file()}
    assert render_sources(smol_llm.artifact.plan)[0] == src


def test_build_is_cached_by_content(kernel_lib, tmp_path):
    _, _, _, _, kdir, spans = kernel_lib
    copy = tmp_path / "k"
    shutil.copytree(kdir, copy)
    logs = []
    build.build(copy, "cpu", spans, log=logs.append)
    assert any("cached build" in m for m in logs), logs


def test_compile_error_names_file_kernel_and_command(kernel_lib, tmp_path):
    _, _, _, _, kdir, spans = kernel_lib
    copy = tmp_path / "k"
    shutil.copytree(kdir, copy)
    src = copy / "src" / "norm.cpp"
    text = src.read_text()
    src.write_text(text.replace("float ss = ffc_dot(h, h, K);", "float ss = ffc_dot(h, h, K) +;", 1))
    with pytest.raises(build.BuildError) as e:
        build.build(copy, "cpu", spans)
    msg = str(e.value)
    assert "norm.cpp:" in msg and "in kernel k" in msg and "reproduce with:" in msg and "build.ninja" in msg


def test_interpreter_backend_matches_compiled(smol_artifact):
    import ffc
    a = ffc.load(smol_artifact, backend="interpreter")
    b = ffc.load(smol_artifact)
    assert a.backend == "interpreter" and b.backend == "compiled"
    prompts = ["The capital of France is", "def fib(n):"]
    assert a.generate(prompts, 8).token_ids == b.generate(prompts, 8).token_ids


def test_long_prompt_runs_in_chunks(smol_artifact):
    import ffc
    llm = ffc.load(smol_artifact)
    ref = ffc.load(smol_artifact, backend="interpreter")
    llm.compiled.graphs["prefill"] = replace(llm.compiled.graphs["prefill"], max_tokens=7)   # several chunks
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen"
    assert llm.generate([prompt, "hi"], 6).token_ids == ref.generate([prompt, "hi"], 6).token_ids


def test_bad_backend_is_refused(smol_artifact):
    import ffc
    with pytest.raises(FfcError, match="backend"):
        ffc.load(smol_artifact, backend="gpu")


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_narrow_weights_end_to_end(dtype, torch_dtype, tmp_path, smol_source):
    """--dtype stores linear/embedding weights narrow; kernels and interpreter agree on the logits."""
    import ffc
    from safetensors import safe_open
    from conftest import Sequences, tiny_model_folder
    folder = tiny_model_folder(tmp_path / "m", "llama", smol_source)
    art = ffc.compile(str(folder), str(tmp_path / f"{dtype}.ffc"), max_seq_len=64, dtype=dtype)
    with safe_open(str(art / "weights" / "rank0.safetensors"), "pt") as f:
        kinds = {f.get_slice(k).get_dtype() for k in f.keys() if "proj" in k or "lm_head" in k}
    assert kinds == {{"bf16": "BF16", "fp16": "F16"}[dtype]}, kinds
    manifest = json.loads((art / "manifest.json").read_text())
    assert DType(manifest["options"]["dtype"]) == DType(dtype)
    got, ref = ffc.load(art), ffc.load(art, backend="interpreter")
    prompts = [[5, 9, 200, 31, 7], [44, 3]]
    outs = []
    for llm in (got, ref):
        seqs = Sequences(llm, prompts)
        first = seqs.step()
        seqs.append(first.argmax(-1).tolist())
        outs.append((first, seqs.step()))
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, **TOL["bf16"])


def test_interleaved_streams_do_not_share_a_cache(smol_llm):
    """Two generations in flight at once (interleaved streams) each get their own KV cache."""
    a_ref = "".join(smol_llm.stream("The capital of France is", 8))
    b_ref = "".join(smol_llm.stream("def fib(n):", 8))
    a, b = smol_llm.stream("The capital of France is", 8), smol_llm.stream("def fib(n):", 8)
    got_a, got_b = [], []
    for x, y in zip(a, b):
        got_a.append(x)
        got_b.append(y)
    got_a += list(a)
    got_b += list(b)
    assert "".join(got_a) == a_ref and "".join(got_b) == b_ref
