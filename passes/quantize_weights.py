"""Weights stored quantized (``--quant``): linear and embedding weights become blocks.

Each weight a linear or an embedding reads gets the format the policy gives its class: the
linears of the layers (``linear``), a linear outside them (``lm_head``), an embedding table
(``embed``). It becomes a derived parameter ``@w.q4_1 = quantize(@w) {format="q4_1"}`` (the
artifact stores its blocks) read through ``dequantize(@w.q4_1) {format="q4_1"} : f32[N,K]``:
the interpreter computes with exactly the weights the kernels read, and lowering folds the
dequantize into the kernel that reads it (integer dot products over the blocks). A weight
read by ops of several classes (a tied embedding and lm_head) is quantized only if the
classes agree on its format. With ``--quant gguf`` a weight's format is the one its GGUF
file holds (every source of a derived weight, e.g. the parts of a fused projection, must
agree; fuse_qkv and fuse_gate_up only fuse weights stored alike). Weights kept in float, and
why, are listed in ``meta.quant``.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ffc.ir import Module, Node, Op, Param, ParamRef, Recipe
from ffc.ir.quant import row_multiple
from ffc.ir.types import DType

from .manager import PassContext

# recipes that keep a weight's rows as they are (a part, a shard, a concatenation of rows)
_ROW_RECIPES = (Op.CONCAT, Op.LOCAL_SHARD, Op.SLICE)


def source_format(module: Module, name: str, formats: Mapping[str, DType]) -> Optional[DType]:
    """The block format every source of weight ``name`` has in the model file (through
    concatenations, shards and slices); None if any is float or they differ."""
    p = module.params[name]
    if p.recipe is None:
        return formats.get(name)
    if p.recipe.op not in _ROW_RECIPES:
        return None
    found = {source_format(module, a.name, formats) for a in p.recipe.args if isinstance(a, ParamRef)}
    return found.pop() if len(found) == 1 else None


def weight_class(n: Node) -> Optional[str]:
    """The tensor class of the weight ``n`` reads: linear (in a layer), lm_head, embed."""
    if not isinstance(n.inputs[1] if len(n.inputs) > 1 else None, ParamRef):
        return None
    if n.op is Op.LINEAR:
        return "linear" if n.origin.layer is not None else "lm_head"
    return "embed" if n.op is Op.EMBEDDING else None


def quantize_weights(module: Module, ctx: PassContext) -> Module:
    """Store linear / embedding weights in the policy's formats; no-op without --quant."""
    policy = ctx.quant
    if not policy.enabled:
        return module
    out = module.clone()
    classes: dict[str, set[str]] = {}
    for g in out.graphs.values():
        for n in g.nodes:
            cls = weight_class(n)
            if cls is not None:
                classes.setdefault(n.inputs[1].name, set()).add(cls)
    formats: dict[str, DType] = {}
    kept: dict[str, str] = {}
    for name, cls in sorted(classes.items()):
        p = out.params[name]
        src = source_format(out, name, ctx.source_formats)
        want = {policy.format_for(c, src) for c in cls}
        if len(want) != 1:
            kept[name] = f"read as {' and '.join(sorted(cls))}, whose formats differ"
            continue
        fmt = want.pop()
        if fmt is None:
            if policy.mode == "gguf":
                kept[name] = "float in the GGUF file" if src is None else "skipped"
            elif policy.skip and cls & set(policy.skip):
                kept[name] = "skipped"
            continue
        if p.type.dtype is not DType.F32 or p.type.rank != 2 or not isinstance(p.type.shape[1], int) \
                or p.type.shape[1] % row_multiple(fmt):
            kept[name] = f"rows of {p.type.shape[-1]} are not whole {fmt} blocks of {row_multiple(fmt)}"
            continue
        formats[name] = fmt
        out.params[f"{name}.{fmt}"] = Param(f"{name}.{fmt}", p.type.with_dtype(fmt),
                                            Recipe(Op.QUANTIZE, (ParamRef(name),), (("format", fmt.value),)))
    for g in out.graphs.values():
        for n in list(g.nodes):
            w = n.inputs[1] if weight_class(n) else None
            fmt = formats.get(w.name) if w is not None else None
            if fmt is None:
                continue
            read = Node(Op.DEQUANTIZE, (ParamRef(f"{w.name}.{fmt}"),), {"format": fmt.value},
                        out.params[w.name].type, n.origin, name=f"{n.name}_w")
            g.insert_before(n, [read])
            n.inputs = (n.inputs[0], read) + n.inputs[2:]
    out.meta["quant"] = {"mode": policy.mode, "skip": list(policy.skip), "float": kept}
    out.prune_params()
    return out
