"""Attention's reference implementations: causal (windowed, soft-capped, ALiBi-biased)
attention over a sequence, and over the paged KV cache in prefill, decode and verify steps;
the int8 KV row format; ``ffc::alibi_sdpa``, the torch op an ALiBi model's attention exports as.

ALiBi (Press et al.; BLOOM, Falcon-RW) adds a per-head linear bias ``slope_h * key position``
to head h's scores (the same as ``* (key - query position)`` after the softmax). The slopes are
an input of the op (a weight [H]), so tensor-parallel ranks hold their heads' slopes like any
sharded weight; the attribute ``alibi`` is the factor applied to the product, which is rounded
to bf16 first, as Falcon computes its bias (``alibi_bias``): that rounding is what the
checkpoints were trained with and what transformers runs, and it moves scores by up to 2^-9 of
the bias (more than fp32 noise once slope * position needs more than 8 significant bits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _visible(q_pos, k_pos, causal, window):
    """Boolean mask [Tq, Tk]: may query at q_pos see key at k_pos."""
    m = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
    if causal:
        m &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        m &= (q_pos[:, None] - k_pos[None, :]) < window
    return m


def _sdpa(q, k, v, mask, scale=None, softcap=None, bias=None):
    """softmax(q k^T * scale, over the keys ``mask`` shows) v; with ``softcap`` the scores are
    squashed first, tanh(s / cap) * cap (Gemma 2), which torch's SDPA has no argument for;
    ``bias`` [H, Tq, Tk] is added to the scores after that (ALiBi)."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.to(s.dtype)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def alibi_bias(slopes: torch.Tensor, k_pos: torch.Tensor, factor: float) -> torch.Tensor:
    """[H, Tq or 1, Tk]: bf16(slopes[h] * k_pos) * factor, the product rounded to bf16 as
    Falcon's build_alibi_tensor does; k_pos [Tk], or [Tq, Tk] (each query's keys' positions: a
    verify step's tree nodes sit at other slots than their positions)."""
    k_pos = k_pos if k_pos.dim() == 2 else k_pos[None, :]
    return (slopes.float()[:, None, None] * k_pos.float()[None]).bfloat16().float() * factor


def _attention(q, k, v, slopes=None, *, causal=True, scale=None, window=None, softcap=None, alibi=None):
    # q: [B, H, T, D]; k, v: [B, Hkv, S, D]; heads h uses kv head h // (H // Hkv); slopes [H] when alibi.
    gqa = q.shape[1] != k.shape[1]
    if window is None and softcap is None and slopes is None and causal and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    s = k.shape[2]
    pos = torch.arange(s, device=q.device)
    q_pos = pos[s - q.shape[2]:]
    bias = alibi_bias(slopes, pos, alibi) if slopes is not None else None
    return _sdpa(q, k, v, _visible(q_pos, pos, causal, window), scale, softcap, bias)


KV_SCALE_BYTES = 4   # an int8 KV-cache row: D int8 values, then their f32 scale


def kv_quantize(x: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] of f32 -> int8 rows [..., D + 4]: symmetric, x * (127 / amax) rounded to
    nearest even, then the row's scale amax / 127 as f32 bytes (what the kernels compute)."""
    amax = x.float().abs().amax(-1, keepdim=True)
    q = torch.round(x * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, (amax / 127.0).contiguous().view(torch.int8)], dim=-1)


def kv_dequantize(r: torch.Tensor) -> torch.Tensor:
    """int8 rows [..., D + 4] -> f32 [..., D]."""
    return r[..., :-KV_SCALE_BYTES].float() * r[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)


TREE_NODES = 64      # nodes of a verify step's token tree per sequence (a bit each in tree_mask)


def tree_slots(tree_base: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    """The cache slot of each token of a verify step: node j of a sequence's tree (its highest
    mask bit: a node sees its ancestors, whose indices are lower) lies at tree_base + j."""
    bits = (tree_mask[:, None] >> torch.arange(TREE_NODES, device=tree_mask.device)) & 1
    return tree_base + (TREE_NODES - 1 - bits.flip(-1).argmax(-1))


def _cached_attention(q, k, v, positions, seq_ids, block_tables, kv_cache, *extra,
                      layer, scale=None, window=None, softcap=None, form="prefill", alibi=None):
    """Write this step's K/V into the paged cache, then attend over each token's sequence.

    q: [1, H, T, D]; k, v: [1, Hkv, T, D]; positions: [1, T]; seq_ids: [T] (row of
    block_tables); block_tables: [N, MB]; kv_cache: [L, 2, S, Hkv, BS, D] (S blocks of BS
    positions; an int8 cache: rows of D + 4, see kv_quantize). Token t of sequence n writes
    slot s of its sequence, block block_tables[n, s // BS], offset s % BS: s is its position,
    and it attends to slots 0..s (causal by construction, across chunks and steps). A verify
    step (form "verify") carries each sequence's token tree in ``extra``: tree_base [T] (the
    sequence's committed length) and tree_mask [T] (bit j: tree node j, at slot tree_base + j,
    is visible; a node sees its ancestors and itself); token t writes slot tree_base + (its own
    node) and attends to slots 0..tree_base - 1 and the tree slots its mask names. Its position
    (rope, ALiBi) is tree_base + its depth, and a visible node's is tree_base + the number of
    visible nodes before it (they are its ancestors, one per depth). With ``alibi`` the last
    input is the heads' slopes [H] (``alibi_bias``).
    """
    tree_base, tree_mask = extra[:2] if form == "verify" else (None, None)
    slopes = extra[-1] if alibi is not None else None
    pos = positions[0]
    slot = pos if tree_base is None else tree_slots(tree_base, tree_mask)
    bs = kv_cache.shape[4]
    kc, vc = kv_cache[layer, 0], kv_cache[layer, 1]               # [S, Hkv, BS, D]
    blocks, offs = block_tables[seq_ids, slot // bs], slot % bs   # [T], [T]
    store = kv_quantize if kv_cache.dtype == torch.int8 else (lambda x: x.to(kc.dtype))
    load = kv_dequantize if kv_cache.dtype == torch.int8 else (lambda x: x.to(q.dtype))
    kc[blocks, :, offs] = store(k[0].transpose(0, 1))
    vc[blocks, :, offs] = store(v[0].transpose(0, 1))
    out = torch.empty_like(q)
    t, n = 0, seq_ids.shape[0]

    def gather(c, table, length):  # the sequence's first `length` slots: [1, Hkv, length, D]
        b = c[table[:-(-length // bs)]]                            # [nb, Hkv, BS, row]
        return load(b.transpose(0, 1).reshape(1, c.shape[1], -1, c.shape[3])[:, :, :length])

    while t < n:  # runs of consecutive tokens that belong to one sequence
        e = t + 1
        while e < n and seq_ids[e] == seq_ids[t]:
            e += 1
        table = block_tables[int(seq_ids[t])]
        length = int(slot[t:e].max()) + 1
        keys = torch.arange(length, device=q.device)
        k_pos = keys
        if tree_base is None:
            mask = _visible(pos[t:e], keys, True, window)
        else:                                   # committed slots, and the tree nodes each token's mask names
            base = tree_base[t:e, None]
            rel = (keys[None, :] - base).clamp(0, TREE_NODES - 1)
            tree = (keys[None, :] >= base) & (((tree_mask[t:e, None] >> rel) & 1) == 1)
            mask = (keys[None, :] < base) | tree
            k_pos = torch.where(tree, base + tree.long().cumsum(-1) - 1, keys[None, :])
        bias = alibi_bias(slopes, k_pos, alibi) if slopes is not None else None
        kv = gather(kc, table, length), gather(vc, table, length)
        out[:, :, t:e] = _sdpa(q[:, :, t:e], *kv, mask, scale, softcap, bias)
        t = e
    return out


def _alibi_sdpa_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                      scale: float, factor: float) -> torch.Tensor:
    return _attention(q, k, v, slopes, causal=True, scale=scale, alibi=factor)


# An ALiBi model's attention as torch.export sees it (frontend._ffc_attention): one op over
# q [B, H, T, D], k, v [B, H, T, D] (K/V already repeated per query head), the slopes [H] and
# the factor of their (bf16-rounded) products with the key positions.
alibi_sdpa = torch.library.custom_op("ffc::alibi_sdpa", mutates_args=())(_alibi_sdpa_eager)


@alibi_sdpa.register_fake
def _(q, k, v, slopes, scale, factor):
    return torch.empty_like(q)

