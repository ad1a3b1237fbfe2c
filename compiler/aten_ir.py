"""ATen -> ffc IR: each ATen op of an exported graph becomes ffc nodes through the ``ATEN``
table; every node keeps the HF module path (and decoder layer) it came from. Ops without an
entry are refused by name, with that module (frontend.py exports the model)."""
from __future__ import annotations

import operator
import re
from typing import Any, Callable

import torch

from ffc.ir import Graph, Module, Node, Op, Origin, Param, ParamRef, TensorType
from ffc.ir.types import DType

from .aten_moe import INDEX_READERS, MOE_ATEN, TopKIndices, dense_topk_type
from .errors import UnsupportedOpError

aten = torch.ops.aten

_PATH_INDEX = re.compile(r"\[(\d+)\]")


def _hf_path(fx_path: str) -> str:
    path = fx_path.replace("L['self'].", "")
    path = _PATH_INDEX.sub(r".\1", path)
    return path[2:] if path.startswith("m.") else ("" if path == "m" else path)


def decoder_layers(model) -> dict[str, int]:
    """HF module path -> index of each transformer layer of ``model``, in module order: the
    modules of the classes the model names in ``_no_split_modules`` (HF's own list of its
    decoder-layer classes), else the children of its longest ModuleList of one class. Node
    origins carry this index; nothing reads a layer out of a module path's spelling."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [path for path, m in model.named_modules() if path and type(m).__name__ in classes]
    if not found:
        lists = [(path, m) for path, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
        if lists:
            path, ml = max(lists, key=lambda pm: len(pm[1]))
            found = [f"{path}.{k}" for k in range(len(ml))]
    return {path: k for k, path in enumerate(found)}


class Converter:
    def __init__(self, ep, arch: str, layers: dict[str, int] | None = None, attention: dict | None = None):
        self.ep = ep
        self.arch = arch
        self.layers = layers or {}
        self.attention = attention or {}     # HF attention module path -> its window / softcap
        self.values: dict[Any, Any] = {}
        self.nodes: list[Node] = []
        self.dense_topk: set[Node] = set()     # top-k values held dense (aten_moe.py) and their scalings
        self.symbols: dict[str, str] = {}
        for sym in ep.range_constraints:
            self.symbols[str(sym)] = "T"

    # -- helpers
    def dim(self, d) -> Any:
        if isinstance(d, int):
            return d
        expr = str(d.node.expr if hasattr(d, "node") else d)
        return re.sub(r"[A-Za-z_]\w*", lambda m: self.symbols.get(m.group(0), m.group(0)), expr)

    def type_of(self, fx_node) -> TensorType:
        val = fx_node.meta["val"]
        return TensorType(DType.of(val.dtype), tuple(self.dim(d) for d in val.shape))

    def origin(self, fx_node) -> Origin:
        stack = fx_node.meta.get("nn_module_stack") or {}
        paths = [_hf_path(p) for p, _ in stack.values()]
        layer = next((self.layers[p] for p in paths if p in self.layers), None)
        return Origin(paths[-1] if paths else "", layer)

    def arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        return a

    def emit(self, fx_node, op: Op, inputs, attrs=None, type: TensorType | None = None) -> Node:
        type, dense = type or self.type_of(fx_node), False
        wide = [v for v in inputs if isinstance(v, Node) and v in self.dense_topk]
        if wide:
            type, dense = dense_topk_type(self, fx_node, op, inputs, attrs or {}, type, wide[0])
        n = Node(op, tuple(inputs), attrs or {}, type, self.origin(fx_node))
        self.nodes.append(n)
        if dense:
            self.dense_topk.add(n)
        return n

    def constant(self, fx_arg) -> torch.Tensor | None:
        """The value of a constant tensor the model made in its forward (lifted by torch.export)."""
        while isinstance(fx_arg, torch.fx.Node) and fx_arg.target == aten.lift_fresh_copy.default:
            fx_arg = fx_arg.args[0]
        if not isinstance(fx_arg, torch.fx.Node) or fx_arg.op != "placeholder":
            return None
        spec = next((s for s in self.ep.graph_signature.input_specs if s.arg.name == fx_arg.name), None)
        return self.ep.constants.get(spec.target) if spec is not None and spec.target else None

    def rank(self, fx_arg) -> int:
        return len(fx_arg.meta["val"].shape)

    def unsupported(self, fx_node, why: str = "has no ffc mapping"):
        origin = self.origin(fx_node).module or "<model root>"
        raise UnsupportedOpError(
            f"ATen op {fx_node.target} {why}; it comes from HF module {origin!r} of a {self.arch} model. "
            "Supported ATen ops: " + ", ".join(sorted(str(k) for k in ATEN)))

    # -- the graph
    def convert(self) -> Module:
        sig = self.ep.graph_signature
        targets = {s.arg.name: s.target for s in sig.input_specs if s.target is not None}
        graph_inputs, params = [], {}
        live = _live_nodes(self.ep.graph)
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                if n.name in targets:
                    name = _hf_path(targets[n.name])
                    params[name] = Param(name, self.type_of(n))
                    self.values[n] = ParamRef(name)
                else:
                    node = Node(Op.INPUT, type=self.type_of(n), name=n.name)
                    graph_inputs.append(node)
                    self.values[n] = node
            elif n.op == "call_function":
                if n not in live:
                    continue
                fn = ATEN.get(n.target)
                if fn is None:
                    self.unsupported(n)
                if fn is not _getitem and fn not in INDEX_READERS and any(
                        isinstance(self.values.get(a), TopKIndices) for a in n.all_input_nodes):
                    self.unsupported(n, "reads top-k indices (ffc keeps them only as a mixture of experts' routing)")
                self.values[n] = fn(self, n, *n.args, **n.kwargs)
            elif n.op == "output":
                outs = [self.values[a] for a in n.args[0]]
        g = Graph("forward", graph_inputs, self.nodes, outs)
        return Module([g], params.values(), {"arch": self.arch})


def _live_nodes(graph) -> set:
    out = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


# Each converter gets (converter, fx_node, *aten_args, **aten_kwargs) and returns the value.
def _simple(op: Op, nargs: int | None = None, **fixed):
    def conv(c: Converter, n, *args, **kwargs):
        ins = [c.arg(a) for a in (args if nargs is None else args[:nargs])]
        return c.emit(n, op, ins, dict(fixed))
    return conv


def _binary(op: Op, inplace: bool = False):
    def conv(c: Converter, n, a, b, alpha=1):
        if alpha != 1:
            c.unsupported(n, "with alpha != 1")
        if inplace:   # x += y (Falcon's residual): the graph's later uses of x read this node instead
            order = {m: k for k, m in enumerate(n.graph.nodes)}
            if any(order[u] > order[n] for u in a.users if u is not n):
                c.unsupported(n, "whose input is read again after it is modified in place")
        return c.emit(n, op, [c.arg(a), c.arg(b)])
    return conv


def _identity(c: Converter, n, x, *args, **kwargs):
    return c.arg(x)


def _pos(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _reshape(c: Converter, n, x, *args, **kwargs):
    return c.emit(n, Op.RESHAPE, [c.arg(x)], {"shape": list(c.type_of(n).shape)})


def _expand(c: Converter, n, x, *args, **kwargs):
    return c.emit(n, Op.EXPAND, [c.arg(x)], {"shape": list(c.type_of(n).shape)})


def _cast(c: Converter, n, x, *args, **kwargs):
    return c.emit(n, Op.CAST, [c.arg(x)], {"dtype": c.type_of(n).dtype})


def _transpose(c: Converter, n, x, d0, d1):
    r = c.rank(x)
    return c.emit(n, Op.TRANSPOSE, [c.arg(x)], {"dim0": _pos(d0, r), "dim1": _pos(d1, r)})


def _t(c: Converter, n, x):
    return c.emit(n, Op.TRANSPOSE, [c.arg(x)], {"dim0": 0, "dim1": 1})


def _numpy_t(c: Converter, n, x):
    """``x.T``: the dimensions reversed (Falcon's linear layers multiply by ``weight.T``)."""
    r = c.rank(x)
    if r < 2:
        return c.arg(x)
    return c.emit(n, Op.PERMUTE, [c.arg(x)], {"dims": list(range(r))[::-1]}) if r > 2 else _t(c, n, x)


def _permute(c: Converter, n, x, dims):
    r = c.rank(x)
    return c.emit(n, Op.PERMUTE, [c.arg(x)], {"dims": [_pos(d, r) for d in dims]})


def _unsqueeze(c: Converter, n, x, dim):
    return c.emit(n, Op.UNSQUEEZE, [c.arg(x)], {"dim": _pos(dim, c.rank(x) + 1)})


def _squeeze(c: Converter, n, x, *args):
    return _reshape(c, n, x)


def _slice(c: Converter, n, x, dim=0, start=None, end=None, step=1):
    size = x.meta["val"].shape[_pos(dim, c.rank(x))]
    start = 0 if start is None else start
    if isinstance(size, int):        # negative bounds count from the end of a static dimension
        start = max(start + size, 0) if isinstance(start, int) and start < 0 else start
        end = max(end + size, 0) if isinstance(end, int) and end < 0 else end
    if not isinstance(start, int) or not isinstance(end, (int, type(None))) or start < 0:
        c.unsupported(n, "with a symbolic or negative start")
    if end is not None and (end >= 2 ** 62 or (isinstance(size, int) and end >= size)):
        end = None
    if end is not None and end < 0:
        c.unsupported(n, "with a negative end")
    if start == 0 and end is None and step == 1:
        return c.arg(x)
    return c.emit(n, Op.SLICE, [c.arg(x)], {"dim": _pos(dim, c.rank(x)), "start": start, "end": end,
                                            "step": step})


def _select(c: Converter, n, x, dim, index):
    """``x[..., i, ...]``: a slice of one position, its dimension then dropped."""
    d = _pos(dim, c.rank(x))
    size = x.meta["val"].shape[d]
    if not isinstance(index, int) or not isinstance(size, int) or not -size <= index < size:
        c.unsupported(n, "with a symbolic index or one on a symbolic dimension")
    return _position(c, n, x, d, index % size, c.type_of(n))


def _position(c: Converter, n, x, d: int, index: int, out: TensorType) -> Node:
    """Position ``index`` of dimension ``d`` of x, that dimension dropped (``out``)."""
    val = x.meta["val"]
    kept = TensorType(DType.of(val.dtype), tuple(c.dim(v) for v in val.shape[:d]) + (1,) +
                      tuple(c.dim(v) for v in val.shape[d + 1:]))
    one = Node(Op.SLICE, (c.arg(x),), {"dim": d, "start": index, "end": index + 1, "step": 1}, kept, c.origin(n))
    c.nodes.append(one)
    return c.emit(n, Op.RESHAPE, [one], {"shape": list(out.shape)}, type=out)


def _unbind(c: Converter, n, x, dim=0):
    """unbind: every position of a static dimension on its own (picked apart by getitem); Falcon's
    heads-interleaved fused QKV ([.., heads, 3, D]) is unbound into Q, K and V."""
    d = _pos(dim, c.rank(x))
    if not isinstance(x.meta["val"].shape[d], int):
        c.unsupported(n, "over a symbolic dimension")
    return [_position(c, n, x, d, i, TensorType(DType.of(v.dtype), tuple(c.dim(s) for s in v.shape)))
            for i, v in enumerate(n.meta["val"])]


def _split(c: Converter, n, x, sizes, dim=0):
    """split / split_with_sizes: a list of slices (picked apart by getitem)."""
    d = _pos(dim, c.rank(x))
    total = x.meta["val"].shape[d]
    sizes = [sizes] * -(-total // sizes) if isinstance(sizes, int) else sizes
    outs, start = [], 0
    for k, (s, val) in enumerate(zip(sizes, n.meta["val"])):
        ty = TensorType(DType.of(val.dtype), tuple(c.dim(v) for v in val.shape))
        outs.append(c.emit(n, Op.SLICE, [c.arg(x)], {"dim": d, "start": start, "end": start + s, "step": 1},
                           type=ty))
        start += s
    return outs


def _chunk(c: Converter, n, x, chunks, dim=0):
    """chunk: slices of ceil(size / chunks) each, the last shorter (as torch.chunk)."""
    total = x.meta["val"].shape[_pos(dim, c.rank(x))]
    return _split(c, n, x, -(-total // chunks), dim)


def _index(c: Converter, n, x, indices):
    """``x[..., [i, i+1, ...], ...]`` with one constant index list of consecutive positions (Falcon
    picks K and V out of its fused QKV with ``[-2]`` and ``[-1]``): a slice."""
    axes = [k for k, ix in enumerate(indices) if ix is not None]
    if len(axes) != 1:
        c.unsupported(n, "with more than one tensor index")
    dim = axes[0]
    idx = c.constant(indices[dim])
    size = x.meta["val"].shape[dim]
    if idx is None or idx.dim() != 1 or idx.numel() == 0 or idx.dtype not in (torch.int64, torch.int32):
        c.unsupported(n, "with an index that is not a constant list of positions")
    pos = [int(v) + (size if int(v) < 0 and isinstance(size, int) else 0) for v in idx.tolist()]
    if min(pos) < 0 or pos != list(range(pos[0], pos[0] + len(pos))):
        c.unsupported(n, f"with index positions {pos} (only consecutive positions become a slice)")
    return c.emit(n, Op.SLICE, [c.arg(x)], {"dim": dim, "start": pos[0], "end": pos[-1] + 1, "step": 1})


def _getitem(c: Converter, n, xs, k):
    return c.arg(xs)[k]


def _cat(c: Converter, n, xs, dim=0):
    return c.emit(n, Op.CONCAT, [c.arg(x) for x in xs], {"dim": _pos(dim, c.rank(xs[0]))})


def _mean(c: Converter, n, x, dims, keepdim=False, dtype=None):
    r = c.rank(x)
    return c.emit(n, Op.MEAN, [c.arg(x)], {"dims": [_pos(d, r) for d in dims], "keepdim": keepdim})


def _sum(c: Converter, n, x, dims, keepdim=False, dtype=None):
    r = c.rank(x)
    return c.emit(n, Op.SUM, [c.arg(x)], {"dims": [_pos(d, r) for d in dims], "keepdim": keepdim})


def _softmax(c: Converter, n, x, dim, *args):
    return c.emit(n, Op.SOFTMAX, [c.arg(x)], {"dim": _pos(dim, c.rank(x))})


def _embedding(c: Converter, n, w, ids, *args):
    return c.emit(n, Op.EMBEDDING, [c.arg(ids), c.arg(w)])


def _linear(c: Converter, n, x, w, b=None):
    return c.emit(n, Op.LINEAR, [c.arg(x), c.arg(w)] + ([c.arg(b)] if b is not None else []))


def _matmul(c: Converter, n, a, b):
    """``a @ W`` with W a weight matrix (Falcon's ``x @ weight.T``): a linear over W transposed
    (so the passes, sharding and kernels see it as every other projection); else a matmul."""
    w = c.arg(b)
    if c.rank(b) == 2 and c.rank(a) >= 2 and (isinstance(w, ParamRef) or (
            isinstance(w, Node) and w.op is Op.TRANSPOSE and isinstance(w.inputs[0], ParamRef))):
        if isinstance(w, Node):
            w = w.inputs[0]                      # (W.T).T
        else:
            val = b.meta["val"]
            w = Node(Op.TRANSPOSE, (w,), {"dim0": 0, "dim1": 1},
                     TensorType(DType.of(val.dtype), (val.shape[1], val.shape[0])), c.origin(n))
            c.nodes.append(w)
        return c.emit(n, Op.LINEAR, [c.arg(a), w])
    return c.emit(n, Op.MATMUL, [c.arg(a), w])


def _addmm(c: Converter, n, b, x, w, beta=1, alpha=1):
    """GPT-2's Conv1D: x @ W + b with W stored [in, out] -> linear over W transposed."""
    if beta != 1 or alpha != 1:
        c.unsupported(n, "with alpha/beta != 1")
    wt_val = w.meta["val"]
    wt = Node(Op.TRANSPOSE, (c.arg(w),), {"dim0": 0, "dim1": 1},
              TensorType(DType.of(wt_val.dtype), (wt_val.shape[1], wt_val.shape[0])), c.origin(n))
    c.nodes.append(wt)
    return c.emit(n, Op.LINEAR, [c.arg(x), wt, c.arg(b)])


def _layer_norm(c: Converter, n, x, shape, w=None, b=None, eps=1e-5, *args):
    if len(shape) != 1:
        c.unsupported(n, "over more than the last dimension")
    ins = [c.arg(x)] + ([c.arg(w)] if w is not None else []) + ([c.arg(b)] if b is not None else [])
    if w is None and b is not None:
        c.unsupported(n, "with a bias but no weight")
    return c.emit(n, Op.LAYER_NORM, ins, {"eps": float(eps)})


def _gelu(c: Converter, n, x, approximate="none"):
    return c.emit(n, Op.GELU, [c.arg(x)], {"approximate": approximate})


def _sdpa(c: Converter, n, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if attn_mask is not None:
        c.unsupported(n, "with an explicit attention mask")
    if scale is None:
        scale = 1.0 / float(q.meta["val"].shape[-1]) ** 0.5
    attrs = {"causal": bool(is_causal), "scale": float(scale), **c.attention.get(c.origin(n).module, {})}
    return c.emit(n, Op.SDPA, [c.arg(q), c.arg(k), c.arg(v)], attrs)


def _alibi_sdpa(c: Converter, n, q, k, v, slopes, scale, factor):
    """An ALiBi model's causal attention (ffc::alibi_sdpa): the heads' slopes are its 4th input."""
    attrs = {"causal": True, "scale": float(scale), **c.attention.get(c.origin(n).module, {}), "alibi": float(factor)}
    return c.emit(n, Op.SDPA, [c.arg(q), c.arg(k), c.arg(v), c.arg(slopes)], attrs)


def _sym_size(c: Converter, n, x, dim):
    return c.dim(x.meta["val"].shape[dim])


def _skip(c: Converter, n, *args, **kwargs):
    return None


ATEN: dict[Any, Callable] = {
    aten.embedding.default: _embedding,
    aten.linear.default: _linear,
    aten.addmm.default: _addmm,
    aten.mm.default: _simple(Op.MATMUL),
    aten.bmm.default: _simple(Op.MATMUL),
    aten.matmul.default: _matmul,
    aten.layer_norm.default: _layer_norm,
    aten.scaled_dot_product_attention.default: _sdpa,
    torch.ops.ffc.alibi_sdpa.default: _alibi_sdpa,
    aten.add.Tensor: _binary(Op.ADD),
    aten.add_.Tensor: _binary(Op.ADD, inplace=True),
    aten.mul_.Tensor: _binary(Op.MUL, inplace=True),
    aten.div_.Tensor: _binary(Op.DIV, inplace=True),
    aten.sub.Tensor: _binary(Op.SUB),
    aten.mul.Tensor: _binary(Op.MUL),
    aten.div.Tensor: _binary(Op.DIV),
    aten.pow.Tensor_Scalar: _binary(Op.POW),
    aten.pow.Tensor_Tensor: _binary(Op.POW),
    aten.neg.default: _simple(Op.NEG),
    aten.rsqrt.default: _simple(Op.RSQRT),
    aten.sqrt.default: _simple(Op.SQRT),
    aten.exp.default: _simple(Op.EXP),
    aten.tanh.default: _simple(Op.TANH),
    aten.cos.default: _simple(Op.COS),
    aten.sin.default: _simple(Op.SIN),
    aten.silu.default: _simple(Op.SILU),
    aten.relu.default: _simple(Op.RELU),
    aten.sigmoid.default: _simple(Op.SIGMOID),
    aten.gelu.default: _gelu,
    aten.mean.dim: _mean,
    aten.sum.dim_IntList: _sum,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.to.dtype: _cast,
    aten.to.device: _cast,
    aten.to.dtype_layout: _cast,
    aten._to_copy.default: _cast,
    aten.type_as.default: _cast,
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.flatten.using_ints: _reshape,
    aten.unflatten.int: _reshape,
    aten.unbind.int: _unbind,
    aten.expand.default: _expand,
    aten.broadcast_to.default: _expand,
    aten.transpose.int: _transpose,
    aten.t.default: _t,
    aten.numpy_T.default: _numpy_t,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.chunk.default: _chunk,
    aten.cat.default: _cat,
    aten.index.Tensor: _index,
    aten.lift_fresh_copy.default: _identity,
    aten.contiguous.default: _identity,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.dropout.default: _identity,
    aten.sym_size.int: _sym_size,
    aten._assert_tensor_metadata.default: _skip,
}
ATEN[operator.getitem] = _getitem
ATEN.update(MOE_ATEN)


def unmapped_ops(ep) -> dict[str, list[str]]:
    """ATen ops of an exported graph that have no ``ATEN`` entry -> the HF modules they come from."""
    out: dict[str, list[str]] = {}
    for n in _live_nodes(ep.graph):
        if n.op == "call_function" and n.target not in ATEN:
            stack = n.meta.get("nn_module_stack") or {}
            module = _hf_path(list(stack.values())[-1][0]) if stack else ""
            where = out.setdefault(str(n.target), [])
            if (module or "<model root>") not in where:
                where.append(module or "<model root>")
    return out
