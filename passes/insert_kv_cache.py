"""Turn the stateless ``forward`` graph into ``prefill`` and ``decode`` graphs over a
paged KV cache.

Tokens are packed: the graphs take ``input_ids``/``position_ids`` [1, T] for T tokens
of any number of sequences, ``seq_ids`` [T] (which row of the block table each token's
sequence owns), ``block_tables`` [N, MB] (per sequence, the pool blocks holding its
positions: position p lives in block ``block_tables[n, p // BS]`` at offset ``p % BS``)
and ``kv_cache`` [L, 2, S, Hkv, BS, D], a pool of S blocks of BS positions
(MB = ceil(max_seq_len / BS)), stored as ``--kv-dtype`` says: f32, bf16 or f16 rows of D,
or i8 rows of D values and their f32 scale (D + 4 bytes: a scale per position and head, so
writing a position never rescales another). Every causal ``attention`` becomes
``cached_attention``, which writes the step's K/V at each token's position and attends over
its sequence's blocks up to that position. ``prefill`` serves any mix of prompt chunks and single
tokens (T tokens); ``decode`` is the same graph specialised to one token per sequence
(T renamed B, attention form "decode"); ``verify`` is prefill over token trees (speculative
decoding: ``tree_base`` and ``tree_mask`` per token, see ffc.ir.attention._cached_attention), logits at
every token.
"""
from __future__ import annotations

from ffc.ir import Graph, Module, Node, Op, TensorType
from ffc.ir.attention import KV_SCALE_BYTES
from ffc.ir.ops import SHAPE_ATTRS
from ffc.ir.sharding import R, S
from ffc.ir.types import DType, rename_dim


def _rename(g: Graph, name: str, mapping: dict, form: str) -> Graph:
    out = g.clone()
    out.name = name
    for n in out.all_nodes():
        n.type = n.type.renamed(mapping)
        key = SHAPE_ATTRS.get(n.op)
        if key is not None:
            n.attrs[key] = tuple(rename_dim(d, mapping) for d in n.attrs[key])
        if n.op is Op.CACHED_ATTENTION:
            n.attrs["form"] = form
    return out


def insert_kv_cache(module: Module, ctx) -> Module:
    """Make prefill and decode graphs over a paged KV cache (no-op if present)."""
    if "forward" not in module.graphs:
        return module
    out = module.clone()
    g = out.graphs.pop("forward")
    attns = [n for n in g.nodes if n.op is Op.ATTENTION]
    if not attns:
        raise ValueError("no attention op to attach a KV cache to (did raise_attention run?)")
    kv_shapes = {(n.inputs[1].type.shape[1], n.inputs[1].type.shape[3]) for n in attns}
    if len(kv_shapes) != 1:
        raise ValueError(f"attention layers disagree on KV heads/head dim: {sorted(kv_shapes)}")
    hkv, d = kv_shapes.pop()
    try:
        positions = g.input("position_ids")
    except KeyError:
        raise ValueError("the graph has no %position_ids input; the KV cache needs token positions") from None
    tokens = positions.type.shape[1]
    bs = min(ctx.kv_block_size, ctx.max_seq_len)
    # on tensor-parallel ranks: bookkeeping is replicated; the cache holds this rank's KV heads
    tp = int(out.meta.get("tp", 1)) > 1
    heads = {n.inputs[1].type.placement for n in attns}
    book = R if tp else None
    cache_place = (S(3) if heads == {S(1)} else R) if tp else None
    seqs = Node(Op.INPUT, type=TensorType(DType.I64, (tokens,), book), name="seq_ids")
    tables = Node(Op.INPUT, type=TensorType(DType.I64, ("N", -(-ctx.max_seq_len // bs)), book),
                  name="block_tables")
    cdtype = ctx.kv_dtype
    row = d + KV_SCALE_BYTES if cdtype is DType.I8 else d     # int8 rows end with their f32 scale
    cache = Node(Op.INPUT, type=TensorType(cdtype, (len(attns), 2, "S", hkv, bs, row), cache_place), name="kv_cache")
    g.inputs += [seqs, tables, cache]
    for layer, a in enumerate(attns):
        (q, k, v), slopes = a.inputs[:3], tuple(a.inputs[3:])      # ALiBi's slopes stay the last input
        if not a.attrs["causal"] or k.type.shape[2] != q.type.shape[2]:
            raise ValueError(f"attention at {a.origin} is not causal self-attention; no KV cache rule for it")
        attrs = {"layer": layer, **{k: v for k, v in a.attrs.items() if k != "causal"}, "form": "prefill"}
        c = Node(Op.CACHED_ATTENTION, (q, k, v, positions, seqs, tables, cache) + slopes, attrs, a.type, a.origin)
        g.insert_before(a, [c])
        g.replace_uses(a, c)
        g.nodes.remove(a)
    out.graphs["prefill"] = _rename(g, "prefill", {}, "prefill")
    out.graphs["decode"] = _rename(g, "decode", {str(tokens): "B"} if isinstance(tokens, str) else {}, "decode")
    if all(a.attrs.get("window") is None for a in attns):      # trees and sliding windows do not mix
        out.graphs["verify"] = _verify(out.graphs["prefill"], tokens, book)
    return out


def _verify(prefill: Graph, tokens, book) -> Graph:
    """The prefill graph over token trees: each token also carries its sequence's committed
    length (tree_base) and which tree nodes it sees (tree_mask); logits at every token."""
    g = _rename(prefill, "verify", {}, "verify")
    base = Node(Op.INPUT, type=TensorType(DType.I64, (tokens,), book), name="tree_base")
    mask = Node(Op.INPUT, type=TensorType(DType.I64, (tokens,), book), name="tree_mask")
    g.inputs += [base, mask]
    for n in g.nodes:
        if n.op is Op.CACHED_ATTENTION:
            n.inputs = n.inputs[:7] + (base, mask) + n.inputs[7:]
    return g
