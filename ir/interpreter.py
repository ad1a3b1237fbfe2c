"""Reference interpreter: runs any IR graph with the registry's torch implementations.

It is the oracle for every pass and, later, for every generated kernel.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from .graph import Graph, Node, Param, ParamRef
from .ops import COMMUNICATING, REGISTRY, Comm, Op
from .types import QUANT, DType
from .verify import bind_attrs


def materialize_params(params: Mapping[str, Param], raw: Mapping[str, torch.Tensor],
                       names: Optional[set[str]] = None, rank: int = 0,
                       blocks: Mapping[str, tuple[DType, torch.Tensor]] = {}) -> dict[str, torch.Tensor]:
    """Tensors for ``names`` (default: all), computing derived params from their recipes
    (``rank``: whose slices ``local_shard`` recipes take). ``blocks``: source weights as a model
    file stores them quantized (format, uint8 rows of blocks); a ``quantize`` recipe whose
    sources all have blocks of its format takes those rows (concatenated, sharded, sliced as
    its recipe says) instead of quantizing floats again, so the file's weights stay exact."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name in out:
            return out[name]
        p = params[name]
        if p.recipe is None:
            if name not in raw:
                raise KeyError(f"weight {name!r} is not in the model's state dict")
            t = raw[name]
        elif p.recipe.op is Op.QUANTIZE and (t := stored_rows(p.recipe.args[0].name, p.type.dtype)) is not None:
            t = t.clone()           # its own storage: parts of one block tensor cannot alias in a weights file
        else:
            args = [get(a.name) if isinstance(a, ParamRef) else a for a in p.recipe.args]
            extra = {"rank": rank} if p.recipe.op is Op.LOCAL_SHARD else {}
            t = REGISTRY[p.recipe.op].ref(*args, **p.recipe.attr_dict, **extra).contiguous()
        if tuple(t.shape) != p.type.storage_shape() or t.dtype != p.type.torch_dtype:
            raise ValueError(f"weight {name!r} is {t.dtype}{list(t.shape)}, the IR declares {p.type}")
        out[name] = t
        return t

    def stored_rows(name: str, fmt: DType) -> Optional[torch.Tensor]:
        """Weight ``name`` in ``fmt`` from the file's blocks, if its recipe only moves whole rows
        (or splits K at block boundaries)."""
        p = params[name]
        if p.recipe is None:
            have = blocks.get(name)
            return have[1] if have is not None and have[0] is fmt else None
        a = p.recipe.attr_dict
        if p.recipe.op is Op.CONCAT and a["dim"] % 2 == 0:
            parts = [stored_rows(x.name, fmt) for x in p.recipe.args]
            return None if any(x is None for x in parts) else torch.cat(parts)
        src = stored_rows(p.recipe.args[0].name, fmt)
        if src is None:
            return None
        if p.recipe.op is Op.LOCAL_SHARD and a["dim"] % 2 == 0:
            return src.chunk(a["ranks"], 0)[rank]
        if p.recipe.op is Op.LOCAL_SHARD and QUANT[fmt].block and p.type.shape[1] % QUANT[fmt].block == 0:  # K at blocks
            cols = fmt.storage_cols(p.type.shape[1])
            return src[:, rank * cols:(rank + 1) * cols]
        if p.recipe.op is Op.SLICE and a["dim"] % 2 == 0 and (a.get("step") or 1) == 1:
            return src[a.get("start") or 0:a.get("end")]
        return None

    for name in (names if names is not None else params):
        get(name)
    return out


def bind_symbols(g: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    env: dict[str, int] = {}
    for n in g.inputs:
        t = inputs[n.name]
        if t.dim() != n.type.rank:
            raise ValueError(f"input %{n.name} has rank {t.dim()}, graph {g.name} expects {n.type}")
        for d, size in zip(n.type.shape, t.shape):
            if isinstance(d, str) and d.isidentifier():
                if env.setdefault(d, size) != size:
                    raise ValueError(f"input %{n.name}: {d}={size} but {d}={env[d]} elsewhere")
    for n in g.inputs:
        if inputs[n.name].shape != n.type.concrete(env):
            raise ValueError(f"input %{n.name} has shape {list(inputs[n.name].shape)}, "
                             f"graph {g.name} expects {n.type} with {env}")
    return env


def run_graph(g: Graph, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
              hook: Optional[Callable[[Node, torch.Tensor], None]] = None,
              comm: Optional[Comm] = None) -> list[torch.Tensor]:
    """Evaluate ``g``; ``hook(node, value)`` sees every node's output (for debugging); ``comm``:
    whom collectives and send/recv talk to (a tensor-parallel or pipeline rank's graph)."""
    missing = [n.name for n in g.inputs if n.name not in inputs]
    if missing:
        raise ValueError(f"graph {g.name} needs inputs {missing}")
    env = bind_symbols(g, inputs)
    values: dict[Node, torch.Tensor] = {n: inputs[n.name] for n in g.inputs}
    last_use: dict[Node, int] = {}
    for k, n in enumerate(g.nodes):
        for i in n.node_inputs:
            last_use[i] = k
    keep = set(g.outputs)
    with torch.no_grad():
        for k, n in enumerate(g.nodes):
            args = [values[i] if isinstance(i, Node) else params[i.name] if isinstance(i, ParamRef) else i
                    for i in n.inputs]
            extra = {"comm": comm} if n.op in COMMUNICATING else {}
            out = REGISTRY[n.op].ref(*args, **bind_attrs(n, env), **extra)
            values[n] = out
            if hook is not None:
                hook(n, out)
            for i in n.node_inputs:  # free intermediates as soon as they are dead
                if last_use.get(i) == k and i not in keep and i.op is not Op.INPUT:
                    values.pop(i, None)
    return [values[o] for o in g.outputs]
