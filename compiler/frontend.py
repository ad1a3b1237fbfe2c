"""Frontend: HuggingFace model -> torch.export -> ffc IR.

The model is exported once with a symbolic sequence length ``T`` (batch 1, tokens
packed), attention routed through HF's attention interface to plain SDPA with
repeat_kv (so GQA shows up as the usual expand/reshape pattern that
``raise_attention`` recognises). Each ATen op of the exported graph becomes ffc
nodes through the ``ATEN`` table (aten_ir.py); every node keeps the HF module path it
came from. Raising to LLM ops (rms_norm, rope, attention, ...) is the passes' work.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.nn.functional as F

from ffc.ir import Module
from ffc.ir import moe  # noqa: F401 - defines torch.ops.ffc.moe_experts, the experts' export

from .aten_ir import ATEN, Converter, decoder_layers, unmapped_ops  # noqa: F401 - ATEN: where tests look
from .errors import UnsupportedModelError
ATTN_IMPL = "ffc"


# ------------------------------------------------------------------ attention hook

def _ffc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, **kwargs):
    """HF attention-interface function used while exporting: causal SDPA over repeated K/V. A
    sliding window and a logit soft-cap (the layer's own, as HF passes them to every attention
    backend) are noted on the module: trace() gives them to the attention ops of that module."""
    noted = {k: v for k, v in (("window", sliding_window), ("softcap", kwargs.get("softcap"))) if v is not None}
    if noted:
        module._ffc_attention = noted
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        b, h, s, d = key.shape
        key = key[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
        value = value[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    slopes = getattr(module, "_ffc_alibi_slopes", None)
    if slopes is not None:        # an ALiBi model (_alibi): its bias as the slopes of ffc's op
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        out = torch.ops.ffc.alibi_sdpa(query, key, value, slopes, scale, module._ffc_alibi_factor)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# an HF experts module's activation (config.hidden_act) -> ffc's name for it (ir/moe.ACTS)
_EXPERT_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def _ffc_experts(module, hidden_states, top_k_index, top_k_weights):
    """HF experts-interface function used while exporting (mixture-of-experts blocks): one
    ``ffc::moe_experts`` op over the stacked expert weights instead of a loop over experts.
    Layouts ffc's kernels do not cover are refused by name."""
    from transformers import integrations
    default_gate = integrations.moe._default_apply_gate
    name = type(module).__name__
    odd = [k for k in ("has_bias", "is_transposed", "has_post_expert_norm") if getattr(module, k, False)]
    odd += [k for k in ("has_gate", "is_concatenated") if not getattr(module, k, True)]
    if getattr(type(module), "_apply_gate", default_gate) is not default_gate:
        odd.append("its own gating function")
    act = _EXPERT_ACTS.get(str(getattr(module.config, "hidden_act", "")))
    if odd or act is None:
        what = ", ".join(odd) or f"activation {getattr(module.config, 'hidden_act', None)!r}"
        raise UnsupportedModelError(f"{name}: mixture-of-experts layers with {what} are not supported yet; ffc's "
                                    "grouped experts are [gate; up] then down, without biases")
    return torch.ops.ffc.moe_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj,
                                     module.down_proj, act)


def _no_mask(*args, **kwargs):
    return None  # causality is the attention op's own attribute; no mask tensor is built


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface, integrations
    AttentionInterface.register(ATTN_IMPL, _ffc_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _no_mask)
    integrations.moe.ALL_EXPERTS_FUNCTIONS.register(ATTN_IMPL, _ffc_experts)


@contextlib.contextmanager
def _ffc_experts_of(model):
    """Mixture-of-experts models (HF's experts interface) export their experts as one ffc op."""
    if not model._can_set_experts_implementation():
        yield
        return
    previous = model.config._experts_implementation
    model.set_experts_implementation(ATTN_IMPL)
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


@contextlib.contextmanager
def _direct_sdpa(model):
    """For a model whose attention calls SDPA itself rather than through HF's attention interface
    (Falcon): no causal mask is built (ffc's attention is causal by construction, as with the
    interface's ``_no_mask``), so the model asks SDPA for causal attention, and SDPA's
    ``is_causal`` (a symbolic bool under export, ``T > 1``) is made concrete."""
    if model._can_set_attn_implementation():
        yield
        return
    if model.config._attn_implementation != "sdpa":
        raise UnsupportedModelError(
            f"{type(model).__name__} was loaded with attn_implementation={model.config._attn_implementation!r}; "
            "ffc traces its attention through SDPA: load it with attn_implementation='sdpa'")
    modeling = sys.modules[type(model).__module__]
    saved = {name: getattr(modeling, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask")
             if hasattr(modeling, name)}
    sdpa = F.scaled_dot_product_attention

    def causal_sdpa(*args, is_causal=False, **kwargs):
        return sdpa(*args, is_causal=bool(is_causal), **kwargs)
    try:
        for name in saved:
            setattr(modeling, name, _no_mask)
        F.scaled_dot_product_attention = causal_sdpa
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for name, fn in saved.items():
            setattr(modeling, name, fn)


def _longrope_forward(module):
    """A LongRoPE rotary embedding's forward with its factor set chosen per token: the long
    factors for positions past the original context (``original_max_position_embeddings``),
    the short ones before. HF picks one set per forward call by the call's largest position:
    the same for every decode step and for every prompt no longer than the original context
    (all of them when max_seq_len <= it), the long set for all of a longer prompt."""
    orig = _longrope_buffers(module)

    def forward(x, position_ids):
        pos = position_ids[..., None].float()
        past = torch.relu(pos + (1 - orig)) - torch.relu(pos - orig)     # 1 from position orig on, else 0
        freqs = pos * (module._ffc_short_inv_freq + past * module._ffc_long_minus_short)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * module.attention_scaling).to(x.dtype), (emb.sin() * module.attention_scaling).to(x.dtype))
    return forward


def _longrope_modules(model) -> list:
    return [m for m in model.modules()
            if getattr(m, "rope_type", None) == "longrope" and hasattr(m, "original_inv_freq")]


def _longrope_buffers(module) -> int:
    """The short factors' frequencies and long minus short as buffers of ``module`` (so they are
    weights, found by name); the original context length."""
    from transformers import modeling_rope_utils
    orig = int(module.config.rope_parameters["original_max_position_embeddings"])
    if "_ffc_short_inv_freq" not in module._buffers:
        short = module.original_inv_freq.float()
        long, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](module.config, short.device, seq_len=orig + 1)
        module.register_buffer("_ffc_short_inv_freq", short.clone(), persistent=False)
        module.register_buffer("_ffc_long_minus_short", long.float() - short, persistent=False)
    return orig


@contextlib.contextmanager
def _static_rope(model):
    """Rotary embeddings whose frequencies HF updates during the forward (LongRoPE: Phi-3) traced
    as a function of each token's position instead."""
    patched = _longrope_modules(model)
    try:
        for m in patched:
            m.forward = _longrope_forward(m)
        yield
    finally:
        for m in patched:
            del m.forward


def _alibi_modules(model) -> list:
    """An ALiBi model's (config.alibi: Falcon-RW) attention modules, each with its heads' slopes
    as a buffer (a weight, found by name; split with the heads on tensor-parallel ranks): the
    model's own build_alibi_tensor's (bf16) slopes, and the factor 1 / sqrt(head_dim) by which
    FalconModel.forward scales their products with the key positions."""
    if not getattr(model.config, "alibi", False):
        return []
    build = getattr(sys.modules[type(model).__module__], "build_alibi_tensor", None)
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "num_heads")]
    if build is None or not mods:
        raise UnsupportedModelError(f"{type(model).__name__} with ALiBi position biases (config.alibi): ffc finds "
                                    "no build_alibi_tensor or attention modules with num_heads in its HF code")
    for m in mods:
        if "_ffc_alibi_slopes" not in m._buffers:
            h = m.num_heads
            slopes = build(torch.ones(1, 2, dtype=torch.long), h, torch.float32).reshape(h, 2)[:, 1]
            m.register_buffer("_ffc_alibi_slopes", slopes.clone(), persistent=False)
            m._ffc_alibi_factor = 1.0 / (model.config.hidden_size // h) ** 0.5
    return mods


@contextlib.contextmanager
def _alibi(model):
    """ALiBi models export their bias as ffc::alibi_sdpa over each attention's slopes: the model
    builds no bias tensor to add to its (absent) mask."""
    owners = [m for m in model.modules() if getattr(m, "use_alibi", False)] if _alibi_modules(model) else []
    try:
        for m in owners:
            m.use_alibi = False
        yield
    finally:
        for m in owners:
            m.use_alibi = True


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, position_ids):
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export(model, max_seq_len: int, device: str = "cpu"):
    """torch.export of ``model`` on (input_ids[1,T], position_ids[1,T]) -> logits[1,T,V]."""
    _register_attention()
    cfg = model.config
    previous = cfg._attn_implementation
    if model._can_set_attn_implementation():
        model.set_attn_implementation(ATTN_IMPL)
    try:
        t = torch.export.Dim("T", min=2, max=max_seq_len)
        ids = torch.zeros(1, 8, dtype=torch.long, device=device)
        pos = torch.arange(8, device=device)[None]
        with torch.no_grad(), _direct_sdpa(model), _static_rope(model), _ffc_experts_of(model), _alibi(model):
            return torch.export.export(_LogitsOnly(model), (ids, pos), strict=False,
                                       dynamic_shapes={"input_ids": {1: t}, "position_ids": {1: t}})
    finally:
        if cfg._attn_implementation != previous:
            model.set_attn_implementation(previous)


def diagnose(config) -> str:
    """Why an architecture outside the tested families would not compile: its model built from
    ``config`` on the meta device (no weights, one or two layers), exported as ffc exports, and
    the ATen ops ffc has no mapping for, with the HF modules they come from."""
    from transformers import AutoModelForCausalLM
    try:
        cfg = copy.deepcopy(config)
        layers = min(int(getattr(cfg, "num_hidden_layers", 2) or 2), 2)
        cfg.num_hidden_layers = layers
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) > layers:
            cfg.layer_types = cfg.layer_types[:layers]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False).eval()
        found = unmapped_ops(export(model, 64, device="meta"))
    except Exception as e:  # noqa: BLE001 - a diagnosis: whatever stops it is the answer
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return f"tracing it stops at {type(e).__name__}: {first[:300]}"
    if not found:
        return "every ATen op of its graph has an ffc mapping, but the family is not tested"
    ops = [f"{op} (from {', '.join(mods[:2])}{', ...' if len(mods) > 2 else ''})" for op, mods in sorted(found.items())]
    return "ATen ops with no ffc mapping: " + "; ".join(ops[:12]) + ("; ..." if len(ops) > 12 else "")


def trace(model, max_seq_len: int) -> Module:
    """The model's forward pass as an ffc Module with one graph, ``forward``."""
    arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    ep = export(model, max_seq_len)
    attention = {}
    for path, m in model.named_modules():            # windows and soft-caps the attention hook saw
        if "_ffc_attention" in vars(m):
            noted = vars(m).pop("_ffc_attention")
            if noted.get("window", 0) >= max_seq_len:
                del noted["window"]                   # it never hides a key
            attention[path] = noted
    return Converter(ep, arch, decoder_layers(model), attention).convert()


def raw_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model by its HF name (tied ones under each name)."""
    for m in _longrope_modules(model):
        _longrope_buffers(m)
    _alibi_modules(model)
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return {k: v.detach() for k, v in out.items()}
