"""Weights stored in a narrower type (``--dtype bf16|fp16``), computed in fp32.

Every matrix a linear, an embedding or a mixture of experts reads becomes a derived parameter (a cast recipe, so
the artifact stores it narrow) and is read through ``cast(@w) {dtype="f32"}``: the
interpreter computes exactly what the generated kernels do (load narrow, accumulate fp32),
and the lowering folds the cast into the kernel's weight loads. Norm weights, biases and
tables stay fp32 (they are <0.1% of the bytes). No-op for fp32.
"""
from __future__ import annotations

from ffc.ir import Module, Node, Op, Param, ParamRef, Recipe
from ffc.ir.ops import WEIGHT_INPUTS
from ffc.ir.types import DType

from .manager import PassContext


def set_weight_dtype(module: Module, ctx: PassContext) -> Module:
    """Store linear, embedding and expert weights as ctx.dtype (bf16/fp16); no-op for f32."""
    dtype = DType(ctx.dtype)
    if dtype is DType.F32:
        return module
    out = module.clone()
    for g in out.graphs.values():
        for n in list(g.nodes):
            for k in WEIGHT_INPUTS.get(n.op, ()):
                w = n.inputs[k]
                if not isinstance(w, ParamRef) or out.params[w.name].type.dtype is not DType.F32:
                    continue
                name = f"{w.name}.{dtype}"
                if name not in out.params:
                    p = out.params[w.name]
                    out.params[name] = Param(name, p.type.with_dtype(dtype),
                                             Recipe(Op.CAST, (ParamRef(w.name),), (("dtype", dtype.value),)))
                cast = Node(Op.CAST, (ParamRef(name),), {"dtype": "f32"}, out.params[w.name].type, n.origin,
                            name=f"{n.name}_w" if k == 1 else f"{n.name}_w{k}")
                g.insert_before(n, [cast])
                n.inputs = n.inputs[:k] + (cast,) + n.inputs[k + 1:]
    out.prune_params()
    return out
