"""Quantized weights: the formats' blocks against the gguf package, every quantized kernel
against the interpreter (dequantize, then fp32) on odd shapes and on every ISA path, and the
default model compiled with --quant gguf running the file's own blocks."""
import json
import os
import shutil
import statistics
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from ffc import build
from ffc.codegen import render_sources
from ffc.errors import FfcError
from ffc.ir import materialize_params, parse, run_graph, verify_module
from ffc.ir.quant import QUANT, QuantPolicy, dequantize, quantize
from ffc.ir.types import DType
from ffc.lower import lower_module
from ffc.runtime.compiled import CompiledPlan

GGUF_FMTS = [f for f, q in QUANT.items() if q.gguf]
# (format, rows N, K): N never a multiple of the 16-row panels; K two or more blocks
SHAPES = [(DType.Q4_0, 37, 96), (DType.Q4_1, 19, 64), (DType.Q8_0, 37, 96), (DType.Q4_K, 21, 512),
          (DType.Q6_K, 19, 256), (DType.I4G64, 37, 128), (DType.I8R, 19, 96)]


def random_blocks(fmt: DType, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Valid random blocks of a GGUF format: random bytes, with finite f16 scales."""
    block, size = QUANT[fmt].block, QUANT[fmt].block_bytes
    raw = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=g)

    def put(off, lo, hi):
        v = (torch.rand(n, k // block, generator=g) * (hi - lo) + lo).half()
        raw[..., off:off + 2] = v.view(torch.uint8).reshape(n, k // block, 2)
    {DType.Q4_0: lambda: put(0, 0.001, 0.05), DType.Q8_0: lambda: put(0, 0.001, 0.05),
     DType.Q4_1: lambda: (put(0, 0.001, 0.05), put(2, -0.3, 0.0)),
     DType.Q4_K: lambda: (put(0, 0.0005, 0.01), put(2, 0.0005, 0.01)),
     DType.Q6_K: lambda: put(208, 0.0005, 0.01)}[fmt]()
    return raw.reshape(n, -1)


def test_a_gguf_file_is_parsed_once_per_process(tmp_path):
    """transformers' conversion (the reader swapped in by sources._one_gguf_reader) and ffc's block
    reader share one parse of a file; a rewritten file is parsed again."""
    from ffc import gguf_blocks, sources
    path = tmp_path / "t.gguf"

    def write(n):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_array("tokenizer.ggml.tokens", [f"t{k}" for k in range(n)])
        w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    write(50)
    gguf_blocks._parsed.cache_clear()
    with sources._one_gguf_reader():
        first = gguf.GGUFReader(str(path))           # what transformers calls (it imports the name then)
        assert gguf.GGUFReader(path) is first
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf_blocks.reader(path) is first and gguf_blocks._parsed.cache_info().misses == 1
    write(60)                                       # rewritten: another size and mtime
    assert len(gguf_blocks.reader(path).fields["tokenizer.ggml.tokens"].data) == 60


@pytest.mark.parametrize("fmt", GGUF_FMTS, ids=str)
def test_gguf_blocks_decode_bit_for_bit(fmt):
    g = torch.Generator().manual_seed(1)
    storage = random_blocks(fmt, 7, 512, g)
    ref = quants.dequantize(storage.numpy(), gguf.GGMLQuantizationType[QUANT[fmt].gguf])
    mine = dequantize(storage, fmt, 512).numpy()
    assert np.array_equal(ref.view(np.uint32), mine.view(np.uint32))


@pytest.mark.parametrize("fmt", [DType.Q4_0, DType.Q4_1, DType.Q8_0, DType.I4G64, DType.I8R], ids=str)
def test_quantize_from_float(fmt):
    w = torch.randn(9, 128, generator=torch.Generator().manual_seed(2))
    s = quantize(w, fmt)
    assert s.dtype == torch.uint8 and tuple(s.shape) == (9, fmt.storage_cols(128))
    if QUANT[fmt].gguf:    # the gguf package's reference quantizer (llama.cpp's rounding)
        assert torch.equal(s, torch.from_numpy(quants.quantize(w.numpy(), gguf.GGMLQuantizationType[QUANT[fmt].gguf])))
    # each value within half a step of its block: (max - min) / 15 asymmetric 4-bit, amax / 127
    # for 8 bits; q4_0 (-8..7 steps of amax / 8) clamps the far side: a whole step
    d = dequantize(s, fmt, 128)
    group = QUANT[fmt].block or 128
    wb = w.reshape(9, -1, group)
    step = {DType.Q4_0: wb.abs().amax(-1) / 4, DType.Q4_1: (wb.amax(-1) - wb.amin(-1)) / 15,
            DType.I4G64: (wb.amax(-1) - wb.amin(-1)) / 15}.get(fmt, wb.abs().amax(-1) / 127)
    assert ((d - w).abs().reshape(9, -1, group) <= step[..., None] * 0.5 + 2e-3 * wb.abs().amax(-1)[..., None]).all()


KV_DTYPES = {"bf16": 6, "f16": 6, "i8": 10}       # cache storage -> elements of a cached row (D = 6)


def _attn_graph(dtype: str, row: int) -> str:
    return f"""graph attn_{dtype}(%qkv : f32[1,T,48], %position_ids : i64[1,T], %seq_ids : i64[T], %block_tables : i64[N,5], %kv_cache : {dtype}[2,2,S,2,8,{row}]) {{
  %0 = unsqueeze(%position_ids) {{dim=2}} : i64[1,T,1]
  %1 = cast(%0) {{dtype="f32"}} : f32[1,T,1]
  %2 = mul(%1, @inv_freq) : f32[1,T,3]
  %3 = concat(%2, %2) {{dim=2}} : f32[1,T,6]
  %4 = cos(%3) : f32[1,T,6]
  %5 = sin(%3) : f32[1,T,6]
  %6 = slice(%qkv) {{dim=2, end=24, start=0, step=1}} : f32[1,T,24]
  %7 = slice(%qkv) {{dim=2, end=36, start=24, step=1}} : f32[1,T,12]
  %8 = slice(%qkv) {{dim=2, end=48, start=36, step=1}} : f32[1,T,12]
  %9 = reshape(%6) {{shape=[1,"T",4,6]}} : f32[1,T,4,6]
  %10 = transpose(%9) {{dim0=1, dim1=2}} : f32[1,4,T,6]
  %11 = reshape(%7) {{shape=[1,"T",2,6]}} : f32[1,T,2,6]
  %12 = transpose(%11) {{dim0=1, dim1=2}} : f32[1,2,T,6]
  %13 = reshape(%8) {{shape=[1,"T",2,6]}} : f32[1,T,2,6]
  %14 = transpose(%13) {{dim0=1, dim1=2}} : f32[1,2,T,6]
  %15 = unsqueeze(%4) {{dim=1}} : f32[1,1,T,6]
  %16 = unsqueeze(%5) {{dim=1}} : f32[1,1,T,6]
  %17 = rope(%10, %15, %16) : f32[1,4,T,6]
  %18 = rope(%12, %15, %16) : f32[1,2,T,6]
  %19 = cached_attention(%17, %18, %14, %position_ids, %seq_ids, %block_tables, %kv_cache) {{form="prefill", layer=1, scale=0.4, window=null}} : f32[1,4,T,6]
  %20 = cached_attention(%10, %12, %14, %position_ids, %seq_ids, %block_tables, %kv_cache) {{form="prefill", layer=0, scale=null, window=3}} : f32[1,4,T,6]
  %21 = add(%19, %20) : f32[1,4,T,6]
  %22 = transpose(%21) {{dim0=1, dim1=2}} : f32[1,T,4,6]
  %23 = reshape(%22) {{shape=[1,"T",24]}} : f32[1,T,24]
  return %23
}}
"""


def _kernel_ir() -> str:
    """Every quantized format's linears (bias + residual, GLU) and embedding, and attention
    over a KV cache of each narrow type: one module, so one library per ISA and target."""
    lines = ["# ffc ir 1", "meta {}", "param @inv_freq : f32[3]"]
    for fmt, n, k in SHAPES:
        f = fmt.value
        lines += [f"param @w_{f} : f32[{n},{k}]", f"param @w_{f}.q : {f}[{n},{k}] = quantize(@w_{f}) {{format=\"{f}\"}}",
                  f"param @gu_{f} : f32[{2 * n},{k}]",
                  f"param @gu_{f}.q : {f}[{2 * n},{k}] = quantize(@gu_{f}) {{format=\"{f}\"}}",
                  f"param @b_{f} : f32[{n}]"]
    for fmt, n, k in SHAPES:
        f = fmt.value
        lines += [f"graph {f}(%x : f32[1,T,{k}], %r : f32[1,T,{n}], %ids : i64[1,T]) {{",
                  f"  %0 = dequantize(@w_{f}.q) {{format=\"{f}\"}} : f32[{n},{k}]",
                  f"  %1 = linear(%x, %0, @b_{f}) : f32[1,T,{n}]",
                  f"  %2 = add(%1, %r) : f32[1,T,{n}]",
                  f"  %3 = dequantize(@gu_{f}.q) {{format=\"{f}\"}} : f32[{2 * n},{k}]",
                  f"  %4 = linear(%x, %3) : f32[1,T,{2 * n}]",
                  f"  %5 = slice(%4) {{dim=2, end={n}, start=0, step=1}} : f32[1,T,{n}]",
                  f"  %6 = slice(%4) {{dim=2, end={2 * n}, start={n}, step=1}} : f32[1,T,{n}]",
                  f"  %7 = glu(%5, %6) {{act=\"silu\"}} : f32[1,T,{n}]",
                  f"  %8 = dequantize(@w_{f}.q) {{format=\"{f}\"}} : f32[{n},{k}]",
                  f"  %9 = embedding(%ids, %8) : f32[1,T,{k}]",
                  "  return %2, %7, %9", "}"]
    return "\n".join(lines) + "\n" + "".join(_attn_graph(d, r) for d, r in KV_DTYPES.items())


def _build(plan, kdir: Path):
    (kdir / "src").mkdir(parents=True, exist_ok=True)
    sources, spans = render_sources(plan)
    for name, text in sources.items():
        (kdir / "src" / name).write_text(text)
    return build.load_library(build.build(kdir, "cpu", spans))


@pytest.fixture(scope="module")
def qkernels(tmp_path_factory):
    module = parse(_kernel_ir())
    verify_module(module)
    plan = lower_module(module, prefill_tokens=40, max_batch=8)
    g = torch.Generator().manual_seed(0)
    raw = {n: torch.randn(p.type.shape, generator=g) for n, p in module.params.items() if p.recipe is None}
    raw["inv_freq"] = torch.tensor([1.0, 0.1, 0.01])
    # the GGUF formats from random blocks as a file would hold them (K-quants cannot be made from floats)
    blocks = {f"{w}_{fmt.value}": (fmt, random_blocks(fmt, r * n, k, g))
              for fmt, n, k in SHAPES if QUANT[fmt].gguf for w, r in (("w", 1), ("gu", 2))}
    weights = materialize_params(module.params, raw, blocks=blocks)
    lib = _build(plan, tmp_path_factory.mktemp("qkernels"))
    return module, plan, weights, CompiledPlan(plan, lib, weights, threads=2)


def _act_quantized(x: torch.Tensor):
    """The kernels' int8 activations per block of 32: (x-hat, dx per block)."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).reshape(m, k), amax / 127.0


def _check(module, weights, cp, fmt, n, k, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(1, T, k, generator=g), "r": torch.randn(1, T, n, generator=g),
              "ids": torch.randint(0, n, (1, T), generator=g)}
    got = cp.run(fmt.value, dict(inputs))
    ref = run_graph(module.graphs[fmt.value], weights, dict(inputs))
    W = dequantize(weights[f"w_{fmt.value}.q"], fmt, k)
    xh, dx = _act_quantized(inputs["x"][0])
    # 1. against the interpreter (dequantize, then fp32): the only difference is the int8
    #    activations, |x - xhat| <= dx / 2 per value, so |y - y_ref| <= sum_k |w_k| dx_k / 2
    bound = (dx.expand(-1, -1, 32).reshape(T, k) / 2) @ W.abs().T
    err = (got[0][0] - ref[0][0]).abs()
    assert (err <= bound * 1.001 + 1e-5).all(), f"{fmt} T={T}: error {err.max():.3g} over the bound"
    # 2. against the same arithmetic on xhat: fp32 rounding only (relative to sum |w x|)
    emu = xh @ W.T + weights[f"b_{fmt.value}"] + inputs["r"][0]
    scale = inputs["x"][0].abs() @ W.abs().T + inputs["r"][0].abs() + 1.0
    assert ((got[0][0] - emu).abs() / scale).max() < 2e-6
    GU = dequantize(weights[f"gu_{fmt.value}.q"], fmt, k)
    h = xh @ GU.T
    glu = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
    torch.testing.assert_close(got[1][0], glu, atol=1e-4 * float(glu.abs().max()), rtol=1e-5)
    # 3. the embedding rows are dequantized from the panels exactly
    torch.testing.assert_close(got[2], ref[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt,n,k", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("T", [1, 3, 9, 31])     # 9, 31: full 8-row micro-tiles and a tail
def test_quantized_kernels_match_interpreter(qkernels, fmt, n, k, T):
    module, _, weights, cp = qkernels
    _check(module, weights, cp, fmt, n, k, T)


AVX_VNNI = "avx_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.mark.parametrize("arch,isa", [("haswell", "avx2"), ("x86-64", "scalar"), ("skylake-avx512", "avx512"),
                                      ("alderlake", "avx2")])
def test_quantized_kernels_on_other_isas(qkernels, arch, isa, tmp_path, monkeypatch):
    """AVX2 (maddubs), plain C++, AVX-512 without VNNI (maddubs with the top bit split off),
    and AVX2 with AVX-VNNI (256-bit vpdpbusd, Alder Lake's); the narrow KV caches' attention too."""
    if arch == "alderlake" and not AVX_VNNI:
        pytest.skip("this CPU has no AVX-VNNI")
    module, plan, weights, _ = qkernels
    monkeypatch.setenv("FFC_CPU_ARCH", arch)
    lib = _build(plan, tmp_path)
    assert lib.isa() == isa
    cp = CompiledPlan(plan, lib, weights, threads=2)
    for fmt, n, k in SHAPES:
        for T in (1, 9):
            _check(module, weights, cp, fmt, n, k, T, seed=T)
    for dtype in KV_DTYPES:
        _check_attention(module, weights, cp, dtype, 9)


def test_quantized_plan_structure(qkernels):
    _, plan, _, _ = qkernels
    steps = plan.graphs["q4_k"].steps
    kinds = [(plan.kernels[s.kernel].family.value, plan.kernels[s.kernel].spec.wformat) for s in steps]
    assert kinds.count(("linear", "q4_k")) == 2 and ("gather", "q4_k") in kinds
    # the embedding reads the same packed panels as the linear (one copy), the GLU halves apart
    assert plan.packed["w_q4_k.q"].nr == 16
    assert plan.packed["gu_q4_k.q#0:21,21:21"].rows == ((0, 21), (21, 21))


# ---------------------------------------------------------------- the default model, --quant gguf

@pytest.fixture(scope="module")
def smol_q(tmp_path_factory):
    import ffc
    return ffc.compile("smollm2-135m", str(tmp_path_factory.mktemp("q") / "q.ffc"), max_seq_len=256, quant="gguf")


def test_gguf_artifact_holds_the_files_blocks(smol_q, smol_hf):
    from safetensors.torch import load_file
    m = json.loads((smol_q / "manifest.json").read_text())
    per = m["weights"]["bytes_per_format"]
    assert per["q4_1"]["tensors"] == 120 and per["q8_0"]["tensors"] == 1    # 4 linears x 30 layers; tied table
    assert m["options"]["quant"] == {"mode": "gguf", "skip": []}
    w = load_file(str(smol_q / "weights" / "rank0.safetensors"))
    # the file's own bytes: stored blocks decode to exactly transformers' weights (which
    # transformers dequantized from the same file)
    hf = dict(smol_hf.named_parameters(remove_duplicate=False))
    layer = "model.layers.7.self_attn."
    qkv = torch.cat([hf[layer + f"{p}_proj.weight"] for p in "qkv"]).detach()
    stored = w[layer + "q_proj+k_proj+v_proj.weight.q4_1"]
    assert stored.dtype == torch.uint8 and stored.numel() == qkv.numel() * 20 // 32
    assert torch.equal(dequantize(stored, DType.Q4_1, 576), qkv)
    assert torch.equal(dequantize(w["lm_head.weight.q8_0"], DType.Q8_0, 576), hf["lm_head.weight"].detach())
    assert sum(t.numel() * t.element_size() for t in w.values()) < 100e6          # vs 540 MB in fp32


def test_gguf_artifact_logits_against_the_interpreter(smol_q):
    """Kernels (int8 activations per block) against the interpreter (fp32 activations, the same
    weights), at the last position of 5 prompts: the same top token, and the distributions
    within KL 0.02 nats (measured 0.0015-0.0042). Logits themselves move by up to ~4% of the
    largest one: an int8 activation is within 1/254 of its block's largest, and a value near a
    rounding boundary flips either way, through 30 layers (an emulation of the int8
    activations in torch differs from both by as much); the per-kernel tests bound each step."""
    import ffc
    from conftest import PROMPTS, Sequences
    llm, ref = ffc.load(smol_q), ffc.load(smol_q, backend="interpreter")
    ids = [llm.encode(p) for p in PROMPTS]
    a, b = Sequences(llm, ids).step(), Sequences(ref, ids).step()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (lb.exp() * (lb - la)).sum(-1)
    assert float(kl.max()) < 0.02, kl


def test_quant_options_are_checked(tmp_path):
    import ffc
    with pytest.raises(FfcError, match="not a quantization mode"):
        ffc.compile("smollm2-135m", str(tmp_path / "x.ffc"), quant="q3")
    with pytest.raises(FfcError, match="names no tensor class"):
        ffc.compile("smollm2-135m", str(tmp_path / "x.ffc"), quant="q8_0", quant_skip="attention")
    assert QuantPolicy.parse("q4_0").format_for("lm_head") is DType.Q8_0
    assert QuantPolicy.parse("q4_0", "lm_head,embed").format_for("embed") is None
    assert QuantPolicy.parse("int8").format_for("embed") is DType.I8R
    assert not (tmp_path / "x.ffc").exists()


def test_quant_gguf_needs_a_gguf_source(tmp_path, smol_source):
    from conftest import tiny_model_folder
    import ffc
    folder = tiny_model_folder(tmp_path / "tiny", "llama", smol_source)
    with pytest.raises(FfcError, match="not one; give a .gguf file"):
        ffc.compile(str(folder), str(tmp_path / "t.ffc"), quant="gguf")


def test_tiny_llama_quantized_by_ffc(tmp_path, smol_source):
    """--quant q4_0 from float weights: K = 64 (whole blocks) quantized, the lm_head kept float
    with --quant-skip; the kernels' next-token distributions are the interpreter's (same
    weights, fp32 activations) within KL 1e-3 (measured ~1e-5), and the artifact says which weights are which."""
    from conftest import tiny_model_folder
    import ffc
    folder = tiny_model_folder(tmp_path / "tiny", "llama", smol_source)
    art = ffc.compile(str(folder), str(tmp_path / "t.ffc"), quant="q4_0", quant_skip="lm_head", max_seq_len=64)
    m = json.loads((art / "manifest.json").read_text())
    fmts = m["weights"]["formats"]
    assert fmts["model.layers.0.mlp.down_proj.weight.q4_0"] == "q4_0"
    assert fmts["lm_head.weight"] == "f32" and fmts["model.embed_tokens.weight.q8_0"] == "q8_0"
    assert m["weights"]["quant"]["float"] == {"lm_head.weight": "skipped"}
    from conftest import Sequences
    llm, ref = ffc.load(art), ffc.load(art, backend="interpreter")
    ids = [llm.encode(p) for p in ("Hello there", "One two three four", "x")]
    la, lb = Sequences(llm, ids).step().log_softmax(-1), Sequences(ref, ids).step().log_softmax(-1)
    kl = (lb.exp() * (lb - la)).sum(-1)
    assert float(kl.max()) < 1e-3, kl


@pytest.mark.parametrize("mode,fmt", [("q8_0", "q8_0"), ("int8", "i8r")])
def test_weights_rows_not_whole_blocks_stay_float(mode, fmt):
    """A weight whose K is not a whole number of blocks is kept float, and meta says why (int8,
    one scale per row: K must be whole chunks of the kernels' 32-value integer steps; a K of 72
    used to be quantized and then fail to pack at load)."""
    from ffc.passes.manager import PassContext
    from ffc.passes.quantize_weights import quantize_weights
    m = parse("""# ffc ir 1
meta {}
param @a : f32[8,40]
param @b : f32[8,64]
graph forward(%x : f32[1,T,40], %y : f32[1,T,64]) {
  %0 = linear(%x, @a) : f32[1,T,8]  # [layer 0] model.layers.0.a
  %1 = linear(%y, @b) : f32[1,T,8]  # [layer 0] model.layers.0.b
  return %0, %1
}
""")
    out = quantize_weights(m, PassContext(quant=QuantPolicy(mode)))
    verify_module(out)
    assert out.params[f"b.{fmt}"].type.dtype is DType(fmt) and f"a.{fmt}" not in out.params
    assert out.meta["quant"]["float"] == {"a": f"rows of 40 are not whole {fmt} blocks of 32"}
    assert [n.op.value for n in out.graphs["forward"].nodes] == ["linear", "dequantize", "linear"]


# ---------------------------------------------------------------- KV cache storage types

def _check_attention(module, weights, cp, dtype, T, seed=3):
    """Attention over a bf16, f16 or int8 (a scale per position and head) KV cache: what the
    kernel writes into the cache is the interpreter's value (the same rounding; a rotated K
    may differ in its last f32 bit before rounding, as the kernel fuses the rotation's
    multiply-add, so a stored value may be one step apart), and the attention output equals
    the interpreter's, which reads the stored values."""
    from ffc.ir.attention import kv_dequantize, kv_quantize
    g = torch.Generator().manual_seed(seed)
    a = T // 2
    pos = torch.cat([torch.arange(3, 3 + a), torch.arange(T - a)])
    cache = torch.randn(2, 2, 8, 2, 8, 6, generator=g)
    cache = kv_quantize(cache) if dtype == "i8" else cache.to(DType(dtype).torch)
    inputs = {"qkv": torch.randn(1, T, 48, generator=g), "position_ids": pos[None],
              "seq_ids": torch.tensor([2] * a + [0] * (T - a)),
              "block_tables": torch.tensor([[5, 1, 7, 0, 0], [0, 0, 0, 0, 0], [2, 6, 3, 4, 0]]), "kv_cache": cache}
    ref_inputs = {k: v.clone() for k, v in inputs.items()}
    got = cp.run(f"attn_{dtype}", inputs)[0]
    ref = run_graph(module.graphs[f"attn_{dtype}"], weights, ref_inputs)[0]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    decode = kv_dequantize if dtype == "i8" else (lambda c: c.float())
    x, y = decode(inputs["kv_cache"]), decode(ref_inputs["kv_cache"])
    step = y.abs().amax(-1, keepdim=True) / 127 if dtype == "i8" else y.abs() * (2 ** -8 if dtype == "bf16" else 2 ** -11)
    assert ((x - y).abs() <= step * 1.01 + 1e-7).all()
    # all but a few near-ties equal (a scale one f32 bit apart moves a row by ~1e-7)
    assert ((x - y).abs() > 1e-5 * y.abs().amax(-1, keepdim=True)).float().mean() < 0.01


@pytest.mark.parametrize("dtype", list(KV_DTYPES))
@pytest.mark.parametrize("T", [1, 9, 31])
def test_attention_reads_narrow_kv_caches(qkernels, dtype, T):
    module, _, weights, cp = qkernels
    _check_attention(module, weights, cp, dtype, T)


def test_kv_pool_holds_more_tokens_in_narrow_types():
    """The engine's pool in the same memory: 2x the blocks in bf16, ~3.8x in int8 (D + 4 bytes a
    row against 4 D) for the default model's 3 KV heads of 64."""
    from ffc.ir.types import TensorType
    from ffc.runtime.kv_cache import BlockPool
    blocks = {d: BlockPool.for_budget(TensorType(d, (30, 2, "S", 3, 16, 68 if d == "i8" else 64)), 4, 64 << 20,
                                      1 << 30, memory=None).num_blocks for d in ("f32", "bf16", "i8")}
    assert blocks["bf16"] == 2 * blocks["f32"] and blocks["i8"] >= 3.7 * blocks["f32"]
