import os
from pathlib import Path

import pytest
import torch

# One cache for converted models across test runs (CI runs twice as fast the second time).
os.environ.setdefault("FFC_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".ffc-cache"))
torch.manual_seed(0)

# IR of a test attention layer's front: q/k/v sliced from %qkv [1,T,48] (4 query heads, 2 KV
# heads of 6), rotated by rope at %position_ids (@inv_freq f32[3]); %17 = q, %18 = k, %14 = v
QKV_ROPE_IR = """\
  %0 = unsqueeze(%position_ids) {dim=2} : i64[1,T,1]
  %1 = cast(%0) {dtype="f32"} : f32[1,T,1]
  %2 = mul(%1, @inv_freq) : f32[1,T,3]
  %3 = concat(%2, %2) {dim=2} : f32[1,T,6]
  %4 = cos(%3) : f32[1,T,6]
  %5 = sin(%3) : f32[1,T,6]
  %6 = slice(%qkv) {dim=2, end=24, start=0, step=1} : f32[1,T,24]
  %7 = slice(%qkv) {dim=2, end=36, start=24, step=1} : f32[1,T,12]
  %8 = slice(%qkv) {dim=2, end=48, start=36, step=1} : f32[1,T,12]
  %9 = reshape(%6) {shape=[1,"T",4,6]} : f32[1,T,4,6]
  %10 = transpose(%9) {dim0=1, dim1=2} : f32[1,4,T,6]
  %11 = reshape(%7) {shape=[1,"T",2,6]} : f32[1,T,2,6]
  %12 = transpose(%11) {dim0=1, dim1=2} : f32[1,2,T,6]
  %13 = reshape(%8) {shape=[1,"T",2,6]} : f32[1,T,2,6]
  %14 = transpose(%13) {dim0=1, dim1=2} : f32[1,2,T,6]
  %15 = unsqueeze(%4) {dim=1} : f32[1,1,T,6]
  %16 = unsqueeze(%5) {dim=1} : f32[1,1,T,6]
  %17 = rope(%10, %15, %16) : f32[1,4,T,6]
  %18 = rope(%12, %15, %16) : f32[1,2,T,6]
"""

CALIBRATION = (
    "A bicycle turns the push of the rider's legs into motion. The pedals turn a crank, the crank turns a "
    "toothed wheel, and a chain carries that turning to the back wheel. Gears of different sizes let the "
    "rider trade speed for force: a small front gear and a large back gear make hills easy, the opposite "
    "makes the bicycle fast on flat roads. The frame holds everything together, the handlebars steer the "
    "front wheel, and the brakes press pads against the rims or discs to slow the wheels down.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="session")
def smol_source():
    from ffc import sources
    return sources.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smol_hf(smol_source):
    from ffc import sources
    return sources.load_model(smol_source)


@pytest.fixture(scope="session")
def smol_tok(smol_source):
    from ffc import sources
    return sources.load_tokenizer(smol_source)


@pytest.fixture(scope="session")
def smol_artifact(tmp_path_factory):
    import ffc
    out = tmp_path_factory.mktemp("art") / "smol.ffc"
    # with a self-draft (speculative decoding), its layers chosen on a calibration text (--calibration:
    # one sequence, not the model's own answers to four prompts, which take a minute to generate
    # and score); the rest of the artifact is as without one
    calibration = out.parent / "calibration.txt"
    calibration.write_text(CALIBRATION)
    return ffc.compile("smollm2-135m", str(out), max_seq_len=512, self_draft="auto", calibration=str(calibration))


@pytest.fixture(scope="session")
def smol_llm(smol_artifact):
    import ffc
    return ffc.load(smol_artifact)


def tiny_model_folder(path: Path, family: str, smol_source) -> Path:
    """A random-weight tiny model of ``family`` made by transformers, with SmolLM2's tokenizer."""
    import transformers as tf
    from ffc import sources
    torch.manual_seed(0)
    common = dict(vocab_size=49152, max_position_embeddings=256)
    # the seeds' and newer families: odd sizes (6 heads, head_dim 12 or 20, one KV head where the
    # family has grouped/multi-query attention, MLP width 136)
    odd = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=49152,
                            bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=72, ffn_dim=136, num_hidden_layers=2, num_attention_heads=6,
                                               max_position_embeddings=256, word_embed_proj_dim=72, pad_token_id=0,
                                               **odd))
    elif family == "gpt_bigcode":
        model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=72, n_inner=136, n_layer=2, n_head=6,
                                                             n_positions=256, multi_query=True, **odd))
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                                                       num_attention_heads=6, rotary_pct=0.5,
                                                       max_position_embeddings=256, **odd))
    elif family in ("phi3", "phi3_longrope"):     # _longrope: the 128k models' scaling, original context 32
        rope = dict(original_max_position_embeddings=32, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [2.0 + 0.3 * i for i in range(6)]}) if family == "phi3_longrope" else {}
        model = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                                                 num_attention_heads=6, num_key_value_heads=2,
                                                 max_position_embeddings=256, pad_token_id=0, **rope, **odd))
    elif family in ("falcon", "falcon_mq"):   # Falcon-40B/180B's grouped layout; Falcon-7B's multi-query
        arch = (dict(new_decoder_architecture=True, num_kv_heads=2) if family == "falcon" else
                dict(new_decoder_architecture=False, multi_query=True))
        model = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=72, num_hidden_layers=2, num_attention_heads=6,
                                                     parallel_attn=True, bias=False, alibi=False,
                                                     max_position_embeddings=256, **arch, **odd))
    elif family == "falcon_rw":     # Falcon-RW: ALiBi, sequential block, biases, heads with their own K/V; 12
        # heads: slopes 2^-1 .. 2^-8 and 2^-0.5 .. 2^-5.5, whose products with positions bf16 rounds
        model = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                                                     alibi=True, new_decoder_architecture=False, multi_query=False,
                                                     parallel_attn=False, bias=True, max_position_embeddings=256,
                                                     **odd))
    elif family == "gemma3":    # a sliding window of 8 on the first layer (prompts and generation go past it)
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            hidden_size=72, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            head_dim=12, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=256, pad_token_id=0, **odd))
    elif family == "gemma2":    # soft-capped attention and final logits (small caps, so they bite), windows
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            hidden_size=72, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            head_dim=12, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
            max_position_embeddings=256, pad_token_id=0, **odd))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                                                   num_attention_heads=6, num_key_value_heads=1, head_dim=20,
                                                   max_position_embeddings=256, **odd))
    elif family == "mixtral":    # 6 experts, 2 per token (3 per rank on two ranks)
        model = tf.MixtralForCausalLM(tf.MixtralConfig(
            hidden_size=72, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=256, **odd))
    elif family == "qwen3_moe":  # 6 experts, 3 per token, not renormalized; q/k norms
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            hidden_size=72, intermediate_size=136, moe_intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=1, head_dim=20, num_experts=6, num_experts_per_tok=3,
            norm_topk_prob=False, max_position_embeddings=256, **odd))
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
        if family == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
        elif family in ("mistral", "mistral_sw"):      # _sw: every layer a sliding window of 8
            model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=8 if family == "mistral_sw" else None, **kw))
        elif family == "qwen2":
            model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **kw))
        else:
            raise ValueError(family)
    # random weights big enough that errors would show
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval().save_pretrained(path)
    sources.load_tokenizer(smol_source).save_pretrained(path)
    return path


class Sequences:
    """Sequences run straight through an LLM's model runner (no scheduler), each owning
    scattered blocks of a private pool: for tests that compare logits step by step."""

    def __init__(self, llm, prompts):
        from ffc.runtime.model_runner import Chunk
        self.Chunk, self.runner = Chunk, llm.runner
        mb, n = llm.runner.blocks_per_seq, len(prompts)
        self.cache = torch.zeros(llm.cache_type.concrete({"S": n * mb}), dtype=llm.cache_type.torch_dtype)
        self.blocks = [list(range(n * mb))[k::n][::-1] for k in range(n)]  # interleaved, descending
        self.tokens = [list(p) for p in prompts]
        self.done = [0] * n

    def step(self) -> torch.Tensor:
        """Run every token not yet in the cache; the logits of each sequence's last token."""
        chunks = [self.Chunk(t[d:], d, b) for t, d, b in zip(self.tokens, self.done, self.blocks)]
        self.done = [len(t) for t in self.tokens]
        return self.runner.forward(chunks, self.cache)

    def append(self, tokens) -> None:
        for t, x in zip(self.tokens, tokens):
            t.append(int(x))
