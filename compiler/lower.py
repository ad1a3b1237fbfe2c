"""Lowering: the final IR graphs become a plan.

A plan is data (JSON in the artifact): per graph, an ordered list of kernel launches whose
arguments are buffers in one arena (placed by liveness), weights by name, graph inputs and
KV-cache layers; plus the unique kernels, each a family and a spec that a template fills in.

Fusion is decided here, by legality plus profit. Every candidate (an elementwise op into a
GEMM epilogue, a residual add into a norm prologue, rope and the KV write into attention,
a row selection into the final norm, a chain of elementwise ops into one loop) is scored by
the bytes it keeps out of memory, per token, from the ops' cost rules; candidates are taken
greedily in profit order while still legal. What was formed, and what was not and why, is
recorded in the plan and printed by ``ffc inspect --plan``.

Views (reshape, transpose, slice, unsqueeze, expand) cost nothing: a kernel reads its input
through the strides they imply, worked out on meta tensors.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ffc.ir import Graph, Module, Node, Op, ParamRef
from ffc.ir.ops import BINARY, COLLECTIVE, ELEMENTWISE, POINT_TO_POINT, UNARY
from ffc.ir.types import DTYPES, eval_dim
from ffc.ir.verify import bind_attrs

from .errors import FfcError

PLAN_VERSION = 2                      # 2: CPU linear weights packed in panels
DIMS = ("T", "N", "S")                # the dynamic dims every kernel receives, in this order
VIEW_OPS = {Op.RESHAPE, Op.TRANSPOSE, Op.PERMUTE, Op.UNSQUEEZE, Op.EXPAND, Op.SLICE}
POINTWISE_OPS = ELEMENTWISE | {Op.GLU, Op.CONCAT, Op.ROPE}
ACTIVATIONS = {Op.SILU: "silu", Op.GELU: "gelu", Op.RELU: "relu", Op.SIGMOID: "sigmoid", Op.TANH: "tanh"}
CTYPES = {"f32": "float", "bf16": "ffc_bf16", "f16": "ffc_f16", "i64": "int64_t", "i32": "int32_t",
          "bool": "bool", "f64": "double", "u8": "uint8_t", "i8": "int8_t"}
# Symbol bindings at which views are evaluated; strides and offsets are fitted as c + a*T + b*N.
_BINDINGS = [{"T": 5, "N": 3, "S": 2}, {"T": 9, "N": 3, "S": 2}, {"T": 5, "N": 7, "S": 2},
             {"T": 13, "N": 11, "S": 2}]
GEMV_MAX_M = 8                        # up to this many rows a linear is bound by weight reads (GEMV)
PANEL_ROWS = 48                       # CPU linear weights are packed in panels of this many rows


class LoweringError(FfcError):
    """An IR graph cannot be lowered to generated kernels."""


# ------------------------------------------------------------------ affine expressions in T, N

@dataclass(frozen=True)
class Affine:
    c: int = 0
    t: int = 0
    n: int = 0

    def is_const(self) -> bool:
        return self.t == 0 and self.n == 0

    def __str__(self) -> str:
        parts = []
        if self.t:
            parts.append("T" if self.t == 1 else f"{self.t}*T")
        if self.n:
            parts.append("N" if self.n == 1 else f"{self.n}*N")
        if self.c or not parts:
            parts.append(str(self.c))
        return parts[0] if len(parts) == 1 else "(" + " + ".join(parts) + ")"


def _fit(values: list[int]) -> Optional[Affine]:
    b0, b1, b2, b3 = _BINDINGS
    a_t = (values[1] - values[0]) // (b1["T"] - b0["T"])
    a_n = (values[2] - values[0]) // (b2["N"] - b0["N"])
    c = values[0] - a_t * b0["T"] - a_n * b0["N"]
    f = Affine(c, a_t, a_n)
    ok = all(c + a_t * b["T"] + a_n * b["N"] == v for b, v in zip(_BINDINGS, values))
    return f if ok else None


def cdim(d) -> str:
    """A dimension as a C expression (symbols are the kernel's int64 variables)."""
    return str(d) if isinstance(d, int) else f"({d})"


# ------------------------------------------------------------------ values and views

@dataclass
class View:
    """How a kernel reads a value: base storage plus element offset and strides."""
    base: str                  # "buf:<name>", "param:<name>", "input:<name>"
    dtype: str
    shape: tuple               # IR dims (int or expression)
    strides: tuple             # Affine per dim
    offset: Affine

    def row_access(self) -> Optional[tuple[str, str, int]]:
        """(rows expr, row stride expr, K) when the value is rows of K contiguous elements."""
        if not self.shape or self.strides[-1] != Affine(1):
            return None
        K = self.shape[-1]
        if not isinstance(K, int):
            return None
        lead = list(zip(self.shape[:-1], self.strides[:-1]))
        contiguous = True
        expect = Affine(K)
        for d, s in reversed(lead):
            if d != 1 and s != expect:
                contiguous = False
            if isinstance(d, int) and expect.is_const():
                expect = Affine(expect.c * d)
            else:
                expect = None
                break
        big = [(d, s) for d, s in lead if d != 1]
        if len(big) == 0:
            return "1", str(K), K
        if len(big) == 1:
            return cdim(big[0][0]), str(big[0][1]), K
        if contiguous:
            return "*".join(cdim(d) for d, _ in big), str(K), K
        return None


@dataclass
class Arg:
    kind: str                  # buf | param | packed | input | cache
    name: str
    offset: int = 0            # elements
    dtype: str = "f32"

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "offset": self.offset, "dtype": self.dtype}


@dataclass
class Group:
    family: str
    nodes: list[Node]
    outputs: dict[str, Node]               # role -> node whose value this kernel writes
    spec: dict = field(default_factory=dict)
    args: list[Arg] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> Node:
        return self.nodes[0]


@dataclass
class Decision:
    kind: str
    nodes: list[str]
    saved_bytes_per_token: float
    accepted: bool
    reason: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "nodes": self.nodes, "saved_bytes_per_token": self.saved_bytes_per_token,
                "accepted": self.accepted, "reason": self.reason}


def _elem_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _bytes_per_token(node: Node) -> float:
    """Bytes of a value per token (per unit of its dynamic dim; the whole value if static)."""
    shape = node.type.shape
    env = {"T": 1, "N": 1, "S": 1, "B": 1}
    try:
        return float(math.prod(eval_dim(d, env) for d in shape)) * _elem_size(node.type.dtype)
    except KeyError:
        return 0.0


# ------------------------------------------------------------------ the lowering of one graph

class GraphLowering:
    def __init__(self, graph: Graph, module: Module, target: str = "cpu"):
        self.g = graph
        self.module = module
        self.target = target
        self.packed: dict[str, dict] = {}         # packed weight key -> {param, nr, rows: [[first, count]...]}
        self.users = graph.users()
        self.index = {n: k for k, n in enumerate(graph.all_nodes())}
        self.owner: dict[Node, Group] = {}
        self.groups: list[Group] = []
        self.decisions: list[Decision] = []
        self.layouts: dict[Node, tuple] = {}      # materialized node -> strides (Affine) override

    # ---------------------------------------------------------------- helpers
    def consumers(self, n: Node) -> list[Node]:
        """Users of ``n``, looking through view ops."""
        out = []
        for u in self.users.get(n, []):
            if u.op in VIEW_OPS and u in self.g.outputs:
                out.append(u)
            out.extend(self.consumers(u) if u.op in VIEW_OPS else [u])
        return out

    def strip_views(self, n) -> Node:
        while isinstance(n, Node) and n.op in VIEW_OPS:
            n = n.inputs[0]
        return n

    def only_user(self, n: Node) -> Optional[Node]:
        us = self.users.get(n, [])
        return us[0] if len(us) == 1 and n not in self.g.outputs else None

    def view(self, value) -> Optional[View]:
        """Strided access to ``value`` (a node or a param), or None if its views cannot be strided."""
        chain = []
        n = value
        while isinstance(n, Node) and n.op in VIEW_OPS and not self.is_materialized(n):
            chain.append(n)
            n = n.inputs[0]
        if isinstance(n, ParamRef):
            p = self.module.params[n.name]
            base, dtype, btype, layout = f"param:{n.name}", p.type.dtype, p.type, None
        elif n.op is Op.INPUT:
            base, dtype, btype, layout = f"input:{n.name}", n.type.dtype, n.type, None
        else:
            base, dtype, btype, layout = f"buf:{n.name}", n.type.dtype, n.type, self.layouts.get(n)
        results = []
        for env in _BINDINGS:
            shape = btype.concrete(env)
            if layout is not None:
                strides = tuple(s.c + s.t * env["T"] + s.n * env["N"] for s in layout)
            else:
                strides = torch.empty(shape, device="meta").stride()
            t = torch.empty_strided(shape, strides, device="meta")
            try:
                for v in reversed(chain):
                    attrs = bind_attrs(v, env)
                    if v.op is Op.RESHAPE:
                        t = t.view(attrs["shape"])
                    elif v.op is Op.TRANSPOSE:
                        t = t.transpose(attrs["dim0"], attrs["dim1"])
                    elif v.op is Op.PERMUTE:
                        t = t.permute(attrs["dims"])
                    elif v.op is Op.UNSQUEEZE:
                        t = t.unsqueeze(attrs["dim"])
                    elif v.op is Op.EXPAND:
                        t = t.expand(attrs["shape"])
                    elif v.op is Op.SLICE:
                        dim, start, step = attrs["dim"], attrs.get("start") or 0, attrs.get("step") or 1
                        end = attrs.get("end")
                        end = t.shape[dim] if end is None else min(end, t.shape[dim])
                        t = t[(slice(None),) * (dim % t.dim()) + (slice(start, end, step),)]
            except RuntimeError:
                return None
            results.append((t.stride(), t.storage_offset()))
        rank = len(results[0][0])
        strides = []
        for k in range(rank):
            f = _fit([r[0][k] for r in results])
            if f is None:
                return None
            strides.append(f)
        off = _fit([r[1] for r in results])
        if off is None:
            return None
        shape = value.type.shape if isinstance(value, Node) else self.module.params[value.name].type.shape
        return View(base, dtype, tuple(shape), tuple(strides), off)

    def is_materialized(self, n: Node) -> bool:
        if n.op is Op.INPUT:
            return True
        g = self.owner.get(n)
        return g is not None and any(o is n for o in g.outputs.values())

    def free(self, *nodes) -> bool:
        return all(isinstance(n, Node) and n not in self.owner for n in nodes)

    def decide(self, kind, nodes, saved, accepted, reason):
        self.decisions.append(Decision(kind, [f"%{n.name}" for n in nodes], saved, accepted, reason))

    # ---------------------------------------------------------------- fusion
    def candidates(self) -> list[tuple[float, int, str, Node]]:
        """(profit, order, kind, anchor) for every fusion a template could do."""
        out = []
        for k, n in enumerate(self.g.nodes):
            if n.op is Op.LINEAR:
                u = self.only_user(n)
                if u is not None and u.op in ACTIVATIONS:
                    out.append((2 * _bytes_per_token(n), k, "linear+activation", n))
                glu = self._glu_pattern(n)
                if glu is not None:
                    out.append((2 * _bytes_per_token(n), k, "linear+glu", n))
                tail = u if u is not None and u.op in ACTIVATIONS else n
                r = self.only_user(tail) if tail is not None else None
                if r is not None and r.op is Op.ADD:
                    out.append((2 * _bytes_per_token(tail), k, "linear+residual", n))
            elif n.op in (Op.RMS_NORM, Op.LAYER_NORM):
                x = n.inputs[0]
                if isinstance(x, Node) and x.op is Op.ADD:
                    saved = _bytes_per_token(x) * (1 if len(self.users[x]) > 1 else 2)
                    out.append((saved, k, "norm+residual", n))
                u = self.only_user(n)
                if u is not None and u.op is Op.TAKE:
                    out.append((_bytes_per_token(n), k, "norm+gather", n))
            elif n.op is Op.CACHED_ATTENTION:
                q, kk = n.inputs[0], n.inputs[1]
                if isinstance(q, Node) and q.op is Op.ROPE:
                    out.append((2 * (_bytes_per_token(q) + _bytes_per_token(kk)), k, "attention+rope", n))
        out.sort(key=lambda c: (-c[0], c[1]))
        return out

    def _glu_pattern(self, lin: Node):
        us = self.users.get(lin, [])
        if len(us) != 2 or lin in self.g.outputs or any(u.op is not Op.SLICE for u in us):
            return None
        glus = [self.only_user(u) for u in us]
        if glus[0] is None or glus[0] is not glus[1] or glus[0].op is not Op.GLU:
            return None
        glu = glus[0]
        a, b = glu.inputs[0], glu.inputs[1]
        last = lin.type.rank - 1
        for s in (a, b):
            if s.attrs.get("dim") % lin.type.rank != last or (s.attrs.get("step") or 1) != 1:
                return None
        wa, wb = (s.type.shape[-1] for s in (a, b))
        if wa != wb or not isinstance(wa, int):
            return None
        return glu, a, b

    def fuse(self) -> None:
        for profit, _, kind, n in self.candidates():
            if n in self.owner and self.owner[n].anchor is not n:
                self.decide(kind, [n], profit, False, f"%{n.name} already belongs to another kernel")
                continue
            getattr(self, "_fuse_" + kind.replace("+", "_"))(n, profit)

    def _group_of(self, anchor: Node, family: str) -> Group:
        g = self.owner.get(anchor)
        if g is None:
            g = Group(family, [anchor], {"out": anchor})
            self.owner[anchor] = g
            self.groups.append(g)
        return g

    def _tail(self, g: Group) -> Node:
        return g.outputs["out"]

    def _fuse_linear_activation(self, n, profit):
        g = self._group_of(n, "linear")
        u = self.only_user(n)
        if self._tail(g) is not n or not self.free(u):
            self.decide("linear+activation", [n, u], profit, False, "the linear already has an epilogue")
            return
        g.nodes.append(u)
        g.outputs["out"] = u
        self.owner[u] = g
        g.reasons.append(f"{u.op.value} fused as epilogue: saves {profit:.0f} B/token")
        self.decide("linear+activation", [n, u], profit, True, "activation applied in the GEMM epilogue")

    def _fuse_linear_glu(self, n, profit):
        g = self._group_of(n, "linear")
        glu, a, b = self._glu_pattern(n)
        if self._tail(g) is not n or not self.free(glu, a, b):
            self.decide("linear+glu", [n, glu], profit, False, "the linear already has an epilogue")
            return
        g.nodes += [a, b, glu]
        for x in (a, b, glu):
            self.owner[x] = g
        g.outputs["out"] = glu
        g.spec["glu"] = (glu.attrs["act"], a.attrs.get("start") or 0, b.attrs.get("start") or 0)
        g.reasons.append(f"split + {glu.attrs['act']}-GLU fused as epilogue: saves {profit:.0f} B/token")
        self.decide("linear+glu", [n, a, b, glu], profit, True,
                    "gate and up rows computed together; only act(gate)*up is written")

    def _fuse_linear_residual(self, n, profit):
        g = self._group_of(n, "linear")
        tail = self._tail(g)
        add = self.only_user(tail)
        if add is None or add.op is not Op.ADD or not self.free(add):
            self.decide("linear+residual", [n], profit, False, "the add is already fused elsewhere")
            return
        other = add.inputs[1] if add.inputs[0] is tail else add.inputs[0]
        if not isinstance(other, Node) or other.type.shape != tail.type.shape or other.type.dtype != "f32":
            self.decide("linear+residual", [n, add], profit, False, "the residual is not a same-shape f32 tensor")
            return
        g.nodes.append(add)
        g.outputs["out"] = add
        self.owner[add] = g
        g.spec["residual"] = other
        g.reasons.append(f"residual add %{add.name} fused as epilogue: saves {profit:.0f} B/token")
        self.decide("linear+residual", [n, add], profit, True, "residual added in the GEMM epilogue")

    def _fuse_norm_residual(self, n, profit):
        add = n.inputs[0]
        if not self.free(add):
            self.decide("norm+residual", [add, n], profit, False,
                        f"%{add.name} is already fused into {self.owner[add].family} "
                        f"%{self.owner[add].anchor.name}, which saves more")
            return
        if add.inputs[0].type.shape != add.type.shape or not isinstance(add.inputs[1], Node) or \
                add.inputs[1].type.shape != add.type.shape:
            self.decide("norm+residual", [add, n], profit, False, "the add broadcasts")
            return
        g = self._group_of(n, "norm")
        g.nodes.append(add)
        self.owner[add] = g
        if len(self.users[add]) > 1 or add in self.g.outputs:
            g.outputs["sum"] = add
        g.spec["residual"] = add
        g.reasons.append(f"residual add %{add.name} fused as prologue: saves {profit:.0f} B/token")
        self.decide("norm+residual", [add, n], profit, True, "add done in the norm prologue"
                    + (" (the sum is also written for later use)" if "sum" in g.outputs else ""))

    def _fuse_norm_gather(self, n, profit):
        take = self.only_user(n)
        if not self.free(take) or take.attrs["dim"] % take.type.rank != take.type.rank - 2:
            self.decide("norm+gather", [n, take], profit, False, "take is not a row selection")
            return
        g = self._group_of(n, "norm")
        g.nodes.append(take)
        self.owner[take] = g
        g.outputs["out"] = take
        g.spec["gather"] = take.inputs[1]
        g.reasons.append(f"row selection %{take.name} fused: only selected rows are normalized")
        self.decide("norm+gather", [n, take], profit, True, "the norm runs on the selected rows only")

    def _fuse_attention_rope(self, n, profit):
        q, k = n.inputs[0], n.inputs[1]
        ok = (isinstance(k, Node) and k.op is Op.ROPE and self.only_user(q) is n and self.only_user(k) is n
              and self.free(q, k) and q.inputs[1] is k.inputs[1] and q.inputs[2] is k.inputs[2]
              and isinstance(q.type.shape[-1], int) and q.type.shape[-1] % 2 == 0)
        if not ok:
            self.decide("attention+rope", [q, n], profit, False,
                        "q and k are not both rotated by the same tables, or are used elsewhere")
            return
        g = self._group_of(n, "attention")
        g.nodes += [q, k]
        self.owner[q] = self.owner[k] = g
        g.spec["rope"] = True
        g.reasons.append("rope on q and k, and the KV-cache write, fused into attention")
        self.decide("attention+rope", [q, k, n], profit, True,
                    "q/k rotated in registers; k written to the cache already rotated")

    # ---------------------------------------------------------------- grouping the rest
    def group_rest(self) -> None:
        anchors = {Op.LINEAR: "linear", Op.RMS_NORM: "norm", Op.LAYER_NORM: "norm",
                   Op.CACHED_ATTENTION: "attention", Op.EMBEDDING: "gather", Op.TAKE: "gather",
                   **{op: "collective" for op in COLLECTIVE | POINT_TO_POINT | {Op.LOCAL_SHARD}}}
        for n in self.g.nodes:
            if n in self.owner or n.op in VIEW_OPS:
                continue
            if n.op in anchors:
                self._group_of(n, anchors[n.op])
            elif n.op not in POINTWISE_OPS:
                raise LoweringError(
                    f"op {n.op.value} (%{n.name}, from {n.origin or 'the model'}) has no generated kernel; "
                    "run this model with the interpreter (ffc.load(..., backend='interpreter'))")
        # A weight read through a cast (bf16/fp16 storage) is converted inside the kernel's loads.
        for n in self.g.nodes:
            w = n.inputs[1] if n.op in (Op.LINEAR, Op.EMBEDDING) else None
            if isinstance(w, Node) and w.op is Op.CAST and isinstance(w.inputs[0], ParamRef) and w not in self.owner \
                    and all(u.op in (Op.LINEAR, Op.EMBEDDING) for u in self.users[w]):
                self.owner[w] = self.owner[n]
                self.owner[n].nodes.append(w)
        # Pointwise roots: values some non-pointwise kernel (or the graph output) needs.
        roots = []
        for n in self.g.nodes:
            if n in self.owner or n.op not in POINTWISE_OPS:
                continue
            cons = self.consumers(n)
            if n in self.g.outputs or not cons or \
                    any((c.op not in POINTWISE_OPS and c.op not in VIEW_OPS) or c in self.owner for c in cons):
                roots.append(n)
        # A graph output that is a view is written out contiguous by a pointwise kernel.
        roots += [o for o in self.g.outputs if o.op in VIEW_OPS and o not in roots]
        # Roots that share inlined work and have the same shape form one kernel.
        parent = {r: r for r in roots}

        def find(r):
            while parent[r] is not r:
                r = parent[r]
            return r
        seen: dict[Node, Node] = {}
        for r in roots:
            for m in self._inlined(r, set(roots)):
                if m in seen and seen[m].type.shape == r.type.shape:
                    parent[find(r)] = find(seen[m])
                seen.setdefault(m, r)
        buckets: dict[Node, list[Node]] = {}
        for r in roots:
            buckets.setdefault(find(r), []).append(r)
        for rs in buckets.values():
            nodes = []
            for r in rs:
                nodes += [m for m in self._inlined(r, set(roots)) if m not in nodes]
            g = Group("pointwise", nodes, {f"out{k}": r for k, r in enumerate(rs)})
            self.groups.append(g)
            for m in nodes:
                if m.op not in VIEW_OPS:
                    self.owner[m] = g
            for r in rs:
                self.owner[r] = g
            inner = [m for m in nodes if m.op in POINTWISE_OPS and m not in rs]
            if inner:
                saved = sum(2 * _bytes_per_token(m) for m in inner)
                self.decide("pointwise", [*rs, *inner], saved, True,
                            f"{len(inner) + len(rs)} elementwise ops in one loop")

    def _inlined(self, root: Node, roots: set) -> list[Node]:
        """Pointwise and view nodes evaluated inside the kernel that computes ``root``."""
        out, stack = [], [root]
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.append(n)
            for i in n.node_inputs:
                if i in roots or i.op is Op.INPUT or (i in self.owner and self.is_materialized(i)):
                    continue
                if i.op in POINTWISE_OPS or i.op in VIEW_OPS:
                    if i.op in VIEW_OPS and self.strip_views(i) in self.owner:
                        continue
                    stack.append(i)
        return out

    # ---------------------------------------------------------------- order
    def order(self) -> list[Group]:
        deps: dict[int, set[int]] = {id(g): set() for g in self.groups}
        by_id = {id(g): g for g in self.groups}
        for g in self.groups:
            for n in g.nodes:
                for i in n.node_inputs:
                    src = self.strip_views(i)
                    og = self.owner.get(src)
                    if og is not None and og is not g:
                        deps[id(g)].add(id(og))
        indeg = {k: len(v) for k, v in deps.items()}
        rev: dict[int, list[int]] = {k: [] for k in deps}
        for k, v in deps.items():
            for d in v:
                rev[d].append(k)
        heap = [(min(self.index[n] for n in by_id[k].nodes), k) for k, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out = []
        while heap:
            _, k = heapq.heappop(heap)
            out.append(by_id[k])
            for u in rev[k]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, (min(self.index[n] for n in by_id[u].nodes), u))
        if len(out) != len(self.groups):
            raise LoweringError(f"graph {self.g.name}: fused kernels form a cycle; this is a bug in fusion")
        return out

    # ---------------------------------------------------------------- kernel specs
    def arg(self, value, what: str, need_const=True) -> tuple[Arg, View]:
        v = self.view(value)
        if v is None:
            raise LoweringError(f"graph {self.g.name}: {what} (%{getattr(value, 'name', value)}) is a view "
                                "that no stride pattern describes; this is a missing copy kernel")
        if need_const and not v.offset.is_const():
            raise LoweringError(f"graph {self.g.name}: {what} starts at an offset that depends on T")
        kind, name = v.base.split(":", 1)
        return Arg(kind, name, v.offset.c, v.dtype), v

    def rows(self, value, what: str):
        a, v = self.arg(value, what)
        ra = v.row_access()
        if ra is None:
            raise LoweringError(f"graph {self.g.name}: {what} (%{value.name}) is not rows of contiguous elements")
        return a, ra

    def weight(self, value) -> Arg:
        if isinstance(value, Node) and value.op is Op.CAST and isinstance(value.inputs[0], ParamRef):
            value = value.inputs[0]
        if not isinstance(value, ParamRef):
            raise LoweringError(f"graph {self.g.name}: a linear's weight is computed at run time (%{value.name}); "
                                "only parameters are supported as weights")
        p = self.module.params[value.name]
        return Arg("param", value.name, 0, p.type.dtype)

    def out_arg(self, node: Node) -> Arg:
        return Arg("buf", node.name, 0, node.type.dtype)

    def spec_collective(self, g: Group):
        """Not a kernel: the executor stops here and the runtime calls torch.distributed on the
        arena. The input may be any view (its strides, affine in T and N, are in the spec: the
        runtime reads it with as_strided); the output is written contiguous."""
        n = g.anchor
        if n.op is Op.RECV:     # from the previous pipeline stage, into its arena buffer
            return {"family": "collective", "op": "recv", "peer": n.attrs["peer"],
                    "out_shape": list(n.type.shape)}, [self.out_arg(g.outputs["out"])]
        a, v = self.arg(n.inputs[0], f"{n.op.value} input")
        s = {"family": "collective", "op": n.op.value, "dim": n.attrs.get("dim"), "ranks": n.attrs.get("ranks"),
             "peer": n.attrs.get("peer"),
             "in_shape": list(n.inputs[0].type.shape), "out_shape": list(n.type.shape),
             "in_strides": [[st.c, st.t, st.n] for st in v.strides]}
        return s, [self.out_arg(g.outputs["out"]), a]

    def pack(self, w: Arg, rows: list[tuple[int, int]]) -> Arg:
        """The CPU kernels' view of weight ``w``: its row ranges ``rows`` packed in panels of
        PANEL_ROWS rows (csrc/ffc_cpu.h), made once when the plan is bound."""
        key = w.name if rows == [(0, self.module.params[w.name].type.shape[0])] else \
            w.name + "#" + ",".join(f"{a}:{n}" for a, n in rows)
        self.packed[key] = {"param": w.name, "nr": PANEL_ROWS, "rows": [list(r) for r in rows]}
        return Arg("packed", key, 0, w.dtype)

    def spec_linear(self, g: Group):
        lin = g.anchor
        out = g.outputs["out"]
        x, (M, x_ld, K) = self.rows(lin.inputs[0], "the linear's input")
        w = self.weight(lin.inputs[1])
        N = out.type.shape[-1]
        s = {"family": "linear", "wtype": CTYPES[w.dtype], "K": K, "M": M, "x_ld": x_ld,
             "out_ld": str(N), "N": N, "gemv_max_m": GEMV_MAX_M, "bias": False, "residual": False, "glu": None,
             "act": None, "gate_off": 0, "up_off": 0, "res_ld": "0"}
        if g.spec.get("glu"):
            act, s["gate_off"], s["up_off"] = g.spec["glu"]
            s["glu"] = act
            s["glu_expr"] = _act_expr(act, "v")
        if self.target == "cpu":
            panels = -(-N // PANEL_ROWS)
            segs = [(s["gate_off"], N), (s["up_off"], N)] if s["glu"] else [(0, N)]
            w = self.pack(w, segs)
            s.update(nr=PANEL_ROWS, panels=panels, up_panel=panels)
        args = [self.out_arg(out), x, w]
        if len(lin.inputs) > 2 and lin.inputs[2] is not None:
            args.append(self.weight(lin.inputs[2]))
            s["bias"] = True
        for n in g.nodes:
            if n.op in ACTIVATIONS:
                s["act"] = ACTIVATIONS[n.op]
                s["act_expr"] = _act_expr(_act_name(n), "v")
        if g.spec.get("residual") is not None:
            r, (_, r_ld, _) = self.rows(g.spec["residual"], "the residual")
            args.append(r)
            s["residual"], s["res_ld"] = True, r_ld
        s["arg"] = {"out": 0, "x": 1, "w": 2, "bias": 3 if s["bias"] else None,
                    "res": len(args) - 1 if s["residual"] else None}
        return s, args

    def spec_norm(self, g: Group):
        n = g.anchor
        out = g.outputs["out"]
        s = {"family": "norm", "kind": n.op.value, "eps": repr(float(n.attrs["eps"])), "residual": False,
             "write_sum": False, "gather": False, "weight": False, "bias": False}
        args = [self.out_arg(out)]
        if g.spec.get("residual") is not None:
            add = g.spec["residual"]
            a, (M, a_ld, K) = self.rows(add.inputs[0], "the norm's residual input")
            b, (_, b_ld, _) = self.rows(add.inputs[1], "the norm's residual input")
            args += [a, b]
            s.update(residual=True, a_ld=a_ld, b_ld=b_ld)
            if "sum" in g.outputs:
                args.append(self.out_arg(g.outputs["sum"]))
                s.update(write_sum=True, sum_ld=str(K))
        else:
            a, (M, a_ld, K) = self.rows(n.inputs[0], "the norm's input")
            args.append(a)
            s.update(a_ld=a_ld)
        if g.spec.get("gather") is not None:
            idx, _ = self.arg(g.spec["gather"], "the row indices")
            args.append(idx)
            s["gather"] = True
            M = cdim(out.type.shape[-2])
        names = ["out", "a"] + (["b"] if s["residual"] else []) + (["sum"] if s["write_sum"] else []) + \
            (["idx"] if s["gather"] else [])
        for k, p in (("weight", 1), ("bias", 2)):
            if len(n.inputs) > p and n.inputs[p] is not None:
                args.append(self.weight(n.inputs[p]))
                names.append(k)
                s[k] = True
        s.update(K=K, M=M, out_ld=str(K), arg={nm: k for k, nm in enumerate(names)})
        return s, args

    def spec_attention(self, g: Group):
        n = g.anchor
        q, k, v, pos, seqs, tables, cache = n.inputs[:7]
        H, D = q.type.shape[1], q.type.shape[3]
        ctype = cache.type
        Hkv, BS, MB = ctype.shape[3], ctype.shape[4], tables.type.shape[1]
        if tables.type.shape[0] != "N" or not isinstance(MB, int):
            raise LoweringError(f"block tables %{tables.name} must be [N, blocks per sequence], got {tables.type}")
        s = {"family": "attention", "H": H, "Hkv": Hkv, "D": D, "BS": BS, "MB": MB, "ctype": CTYPES[ctype.dtype],
             "scale": repr(float(n.attrs.get("scale") or 1.0 / math.sqrt(D))),
             "window": n.attrs.get("window"), "rope": bool(g.spec.get("rope"))}
        if ctype.dtype != "f32":
            raise LoweringError(f"a {ctype.dtype} KV cache has no CPU attention kernel yet")
        if s["rope"]:
            cos, sin = q.inputs[1], q.inputs[2]
            q, k = q.inputs[0], k.inputs[0]
        args = [Arg("buf", n.name, 0, "f32")]
        for role, val in (("q", q), ("k", k), ("v", v)):
            a, vw = self.arg(val, f"attention {role}")
            # strides may depend on T (an all_gather's output over heads); one head: its stride is unused
            hs = Affine(0) if vw.shape[1] == 1 else vw.strides[1]
            if vw.strides[3] != Affine(1) or vw.shape[0] != 1:
                raise LoweringError(f"attention {role} (%{val.name}) is not [1, heads, tokens, D] with unit D stride")
            s[f"{role}_hs"], s[f"{role}_ts"] = str(hs), str(vw.strides[2])
            args.append(a)
        args.append(self.arg(pos, "positions")[0])
        args.append(self.arg(seqs, "sequence ids")[0])
        args.append(self.arg(tables, "block tables")[0])
        args.append(Arg("cache", cache.name, int(n.attrs["layer"]), ctype.dtype))
        names = ["out", "q", "k", "v", "pos", "seq", "table", "cache"]
        if s["rope"]:
            for role, val in (("cos", cos), ("sin", sin)):
                a, vw = self.arg(val, f"rope {role}")
                if vw.strides[-1] != Affine(1) or not vw.strides[-2].is_const():
                    raise LoweringError(f"rope table {role} (%{val.name}) is not [tokens, D] rows")
                s[f"{role}_ts"] = str(vw.strides[-2])
                args.append(a)
                names.append(role)
        s["arg"] = {nm: k for k, nm in enumerate(names)}
        self.layouts[n] = (Affine(0, H * D), Affine(D), Affine(H * D), Affine(1))
        return s, args

    def tied(self, param: str) -> bool:
        """Whether ``param`` is also the weight of a plain linear (an lm_head tied to the embedding)."""
        for grp in self.groups:
            if grp.family == "linear" and not grp.spec.get("glu"):
                w = grp.anchor.inputs[1]
                w = w.inputs[0] if isinstance(w, Node) and w.op is Op.CAST else w
                if isinstance(w, ParamRef) and w.name == param:
                    return True
        return False

    def spec_gather(self, g: Group):
        n = g.anchor
        out = g.outputs["out"]
        if n.op is Op.EMBEDDING:
            ids, table = n.inputs[0], n.inputs[1]
            tab = self.weight(table)
            p = self.module.params[tab.name]
            rows, K = p.type.shape
            idx, iv = self.arg(ids, "token ids")
            M = "*".join(cdim(d) for d in ids.type.shape if d != 1) or "1"
            s = {"family": "gather", "wtype": CTYPES[tab.dtype], "rows": rows, "K": K, "M": M,
                 "tab_ld": str(K), "out_ld": str(K), "nr": 0}
            if self.target == "cpu" and self.tied(tab.name):   # read the lm_head's panels: no second copy
                tab = self.pack(tab, [(0, rows)])
                s["nr"] = PANEL_ROWS
            args = [self.out_arg(out), tab, idx]
        else:  # take rows along the token dim
            x, idxv = n.inputs
            if n.attrs["dim"] % n.type.rank != n.type.rank - 2:
                raise LoweringError(f"take along dim {n.attrs['dim']} (%{n.name}) has no kernel")
            a, (rows, ld, K) = self.rows(x, "the take input")
            args = [self.out_arg(out), a, self.arg(idxv, "indices")[0]]
            s = {"family": "gather", "wtype": "float", "rows": rows, "K": K, "M": cdim(out.type.shape[-2]),
                 "tab_ld": ld, "out_ld": str(K), "nr": 0}
        s["arg"] = {"out": 0, "table": 1, "idx": 2}
        return s, args

    def spec_pointwise(self, g: Group):
        outs = list(g.outputs.values())
        shape = outs[0].type.shape
        pw = _Pointwise(self, set(g.nodes))
        idx = [f"i{k}" for k in range(len(shape))]
        exprs = [pw.expr(o, idx) for o in outs]
        args = [self.out_arg(o) for o in outs] + pw.args
        s = {"family": "pointwise", "shape": [cdim(d) for d in shape],
             "numel": "*".join(cdim(d) for d in shape) or "1",
             "ops": sorted({n.op.value for n in g.nodes if n.op not in VIEW_OPS}), "body": [],
             "outputs": [{"var": f"o{k}", "ctype": CTYPES[o.type.dtype], "index": k, "expr": e}
                         for k, (o, e) in enumerate(zip(outs, exprs))],
             "loads": [{"var": f"in{k}", "ctype": CTYPES[a.dtype], "index": len(outs) + k}
                       for k, a in enumerate(pw.args)]}
        return s, args


def _act_name(n: Node) -> str:
    if n.op is Op.GELU and n.attrs.get("approximate") == "tanh":
        return "gelu_tanh"
    return ACTIVATIONS[n.op]


def _act_expr(act: str, v: str) -> str:
    return {"silu": f"ffc_silu({v})", "gelu": f"ffc_gelu({v})", "gelu_tanh": f"ffc_gelu_tanh({v})",
            "relu": f"ffc_relu({v})", "sigmoid": f"ffc_sigmoid({v})", "tanh": f"std::tanh({v})"}[act]


_C_UNARY = {Op.NEG: "(-{})", Op.RSQRT: "(1.0f / std::sqrt({}))", Op.SQRT: "std::sqrt({})",
            Op.EXP: "std::exp({})", Op.TANH: "std::tanh({})", Op.COS: "std::cos({})", Op.SIN: "std::sin({})",
            Op.SILU: "ffc_silu({})", Op.RELU: "ffc_relu({})", Op.SIGMOID: "ffc_sigmoid({})"}
_C_BINARY = {Op.ADD: "({} + {})", Op.SUB: "({} - {})", Op.MUL: "({} * {})", Op.DIV: "({} / {})",
             Op.POW: "std::pow({}, {})"}


class _Pointwise:
    """Renders a tree of pointwise and view nodes as one C expression over output indices."""

    def __init__(self, low: GraphLowering, nodes: set):
        self.low = low
        self.nodes = nodes
        self.args: list[Arg] = []
        self.vars: dict[tuple, str] = {}

    def load(self, value, idx: list[str]) -> str:
        a, v = self.low.arg(value, "a pointwise input")
        key = (a.kind, a.name, a.offset)
        if key not in self.vars:
            self.vars[key] = f"in{len(self.args)}"
            self.args.append(a)
        terms = [f"{i} * {s}" for i, s, d in zip(idx, v.strides, v.shape) if s != Affine(0) and d != 1]
        lin = " + ".join(terms) or "0"
        ref = f"{self.vars[key]}[{lin}]"
        return f"ffc_to_f32({ref})" if v.dtype in ("bf16", "f16") else ref

    def expr(self, n, idx: list[str]) -> str:
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            return f"{float(n)!r}f" if isinstance(n, float) else str(n)
        if isinstance(n, ParamRef) or n.op is Op.INPUT or n not in self.nodes:
            return self.load(n, idx)
        shape = n.type.shape
        if n.op in VIEW_OPS:
            return self.expr(n.inputs[0], self.view_index(n, idx))
        ins = n.inputs
        if n.op in UNARY:
            if n.op is Op.CAST:
                return f"(({CTYPES[n.attrs['dtype']]})({self.expr(ins[0], self.bcast(ins[0], shape, idx))}))"
            if n.op is Op.GELU:
                return _act_expr(_act_name(n), self.expr(ins[0], idx))
            return _C_UNARY[n.op].format(self.expr(ins[0], self.bcast(ins[0], shape, idx)))
        if n.op in BINARY:
            a, b = (self.expr(x, self.bcast(x, shape, idx)) for x in ins[:2])
            return _C_BINARY[n.op].format(a, b)
        if n.op is Op.GLU:
            a, b = (self.expr(x, self.bcast(x, shape, idx)) for x in ins[:2])
            return f"({_act_expr(n.attrs['act'], a)} * {b})"
        if n.op is Op.ROPE:
            x, c, s = ins
            D = shape[-1]
            half = D // 2
            j = idx[-1]
            lo, hi = idx[:-1] + [f"({j} + {half})"], idx[:-1] + [f"({j} - {half})"]
            rot = f"({j} < {half} ? -{self.expr(x, lo)} : {self.expr(x, hi)})"
            return (f"({self.expr(x, idx)} * {self.expr(c, self.bcast(c, shape, idx))} + "
                    f"{rot} * {self.expr(s, self.bcast(s, shape, idx))})")
        if n.op is Op.CONCAT:
            dim = n.attrs["dim"] % len(shape)
            start, out = "0", None
            parts = []
            for x in ins:
                size = cdim(x.type.shape[dim])
                sub = list(idx)
                sub[dim] = f"({idx[dim]} - ({start}))"
                parts.append((f"{start} + {size}", self.expr(x, sub)))
                start = f"{start} + {size}"
            out = parts[-1][1]
            for bound, e in reversed(parts[:-1]):
                out = f"({idx[dim]} < {bound} ? {e} : {out})"
            return out
        raise LoweringError(f"op {n.op.value} cannot be rendered as a pointwise expression")

    def bcast(self, x, shape, idx):
        if not isinstance(x, Node) and not isinstance(x, ParamRef):
            return idx
        xs = x.type.shape if isinstance(x, Node) else self.low.module.params[x.name].type.shape
        lead = len(shape) - len(xs)
        return [("0" if d == 1 and shape[lead + k] != 1 else idx[lead + k]) for k, d in enumerate(xs)]

    def view_index(self, n: Node, idx: list[str]) -> list[str]:
        src = n.inputs[0].type.shape
        a = n.attrs
        if n.op is Op.TRANSPOSE:
            out = list(idx)
            d0, d1 = a["dim0"] % len(idx), a["dim1"] % len(idx)
            out[d0], out[d1] = idx[d1], idx[d0]
            return out
        if n.op is Op.PERMUTE:
            out = [""] * len(idx)
            for k, d in enumerate(a["dims"]):
                out[d % len(idx)] = idx[k]
            return out
        if n.op is Op.UNSQUEEZE:
            d = a["dim"] % len(idx)
            return idx[:d] + idx[d + 1:]
        if n.op is Op.EXPAND:
            lead = len(idx) - len(src)
            return [("0" if s == 1 and n.type.shape[lead + k] != 1 else idx[lead + k]) for k, s in enumerate(src)]
        if n.op is Op.SLICE:
            d = a["dim"] % len(idx)
            out = list(idx)
            out[d] = f"({a.get('start') or 0} + {a.get('step') or 1} * {idx[d]})"
            return out
        # reshape: flatten over the output shape, unflatten over the input shape
        lin = "0"
        for i, dsz in zip(idx, n.type.shape):
            lin = f"({lin} * {cdim(dsz)} + {i})"
        out, rest = [], lin
        for dsz in reversed(src):
            out.append(f"({rest} % {cdim(dsz)})")
            rest = f"({rest} / {cdim(dsz)})"
        return list(reversed(out))


# ------------------------------------------------------------------ module -> plan

def _canonical(graph: Graph) -> Graph:
    """A copy whose token dim is named T in every graph (decode's B), so kernels are shared."""
    from ffc.ir.ops import SHAPE_ATTRS
    from ffc.ir.types import rename_dim
    from ffc.ir.text import node_names
    g = graph.clone()
    for n, name in node_names(g).items():
        n.name = name
    for n in g.all_nodes():
        n.type = n.type.renamed({"B": "T"})
        key = SHAPE_ATTRS.get(n.op)
        if key is not None:
            n.attrs[key] = tuple(rename_dim(d, {"B": "T"}) for d in n.attrs[key])
    return g


def _place(buffers: dict[str, dict]) -> int:
    """Offsets in one arena: largest first, lowest offset that no live-overlapping buffer uses."""
    placed: list[tuple[int, int, int, int]] = []      # offset, end, live start, live end
    for name in sorted(buffers, key=lambda b: (-buffers[b]["bytes"], b)):
        b = buffers[name]
        size = (b["bytes"] + 63) // 64 * 64
        s, e = b["live"]
        clashes = sorted((o, oe) for o, oe, ls, le in placed if not (le < s or e < ls))
        off = 0
        for o, oe in clashes:
            if off + size <= o:
                break
            off = max(off, oe)
        b["offset"] = off
        placed.append((off, off + size, s, e))
    return max((oe for _, oe, _, _ in placed), default=0)


def lower_graph(graph: Graph, module: Module, max_tokens: int, max_rows: int, target: str = "cpu"):
    g = _canonical(graph)
    low = GraphLowering(g, module, target)
    low.fuse()
    low.group_rest()
    steps = []
    for grp in low.order():
        spec, args = getattr(low, "spec_" + grp.family)(grp)
        steps.append((grp, spec, args))
    env = {"T": max_tokens, "N": min(max_rows, max_tokens), "S": 1}
    buffers: dict[str, dict] = {}
    caches = {n.inputs[6].name for n in g.nodes if n.op is Op.CACHED_ATTENTION}
    for n in g.inputs:
        if n.name not in caches:
            buffers[n.name] = {"dtype": n.type.dtype, "shape": list(n.type.shape), "live": [0, 0],
                               "bytes": math.prod(n.type.concrete(env)) * _elem_size(n.type.dtype)}
    for k, (grp, _, _) in enumerate(steps):
        for o in grp.outputs.values():
            buffers[o.name] = {"dtype": o.type.dtype, "shape": list(o.type.shape), "live": [k, k],
                               "bytes": math.prod(o.type.concrete(env)) * _elem_size(o.type.dtype)}
    for k, (_, _, args) in enumerate(steps):
        for a in args:
            if a.kind in ("buf", "input"):
                a.kind = "buf"
                if a.name not in buffers:
                    raise LoweringError(f"graph {g.name}: %{a.name} is read but never written")
                buffers[a.name]["live"][1] = max(buffers[a.name]["live"][1], k)
    outs = []
    for o in g.outputs:
        if o.name not in buffers:
            raise LoweringError(f"graph {g.name}: output %{o.name} must be a kernel's result")
        buffers[o.name]["live"][1] = len(steps)
        outs.append({"buffer": o.name, "dtype": o.type.dtype, "shape": list(o.type.shape)})
    arena = _place(buffers)
    plan_steps = [{
        "family": grp.family, "spec": spec, "args": [a.to_json() for a in args],
        "nodes": [f"%{n.name}" for n in grp.nodes if n.op not in VIEW_OPS],
        "origin": grp.anchor.origin, "why": grp.reasons,
    } for grp, spec, args in steps]
    return {
        "max_tokens": max_tokens,
        "max_rows": min(max_rows, max_tokens),
        "inputs": {n.name: {"buffer": n.name if n.name in buffers else None, "dtype": n.type.dtype,
                            "shape": list(n.type.shape)} for n in g.inputs},
        "outputs": outs,
        "buffers": buffers,
        "arena_bytes": arena,
        "steps": plan_steps,
        "fusion": [d.to_json() for d in low.decisions],
        "packed": low.packed,
    }


def lower_module(module: Module, *, target: str = "cpu", prefill_tokens: int = 2048,
                 max_batch: int = 128) -> dict:
    """The plan for every graph of ``module``: steps refer to kernels by name; kernels are unique."""
    graphs = {}
    for name, g in module.graphs.items():
        tmax = max_batch if name.startswith("decode") else prefill_tokens   # decode, decode_stage1, ...
        graphs[name] = lower_graph(g, module, tmax, max_batch, target)
    kernels: dict[str, dict] = {}
    by_spec: dict[str, str] = {}
    for gp in graphs.values():
        for st in gp["steps"]:
            if st["family"] == "collective":      # run by the runtime between executor segments
                st["collective"], st["kernel"] = st.pop("spec"), None
                continue
            key = json.dumps(st["spec"], sort_keys=True)
            if key not in by_spec:
                by_spec[key] = f"k{len(by_spec)}_{st['family']}"
                kernels[by_spec[key]] = {"family": st["family"], "spec": st.pop("spec")}
            else:
                st.pop("spec")
            st["kernel"] = by_spec[key]
    packed = {k: v for gp in graphs.values() for k, v in gp.pop("packed").items()}
    return {"version": PLAN_VERSION, "target": target, "dims": list(DIMS), "kernels": kernels, "graphs": graphs,
            "packed": packed,
            "arena_bytes": max(gp["arena_bytes"] for gp in graphs.values()),
            "params": {n: {"dtype": p.type.dtype, "shape": list(p.type.shape)} for n, p in module.params.items()}}


def describe_plan(plan: dict) -> str:
    """Human-readable plan: kernels per graph, fusion groups formed and rejected, arena."""
    lines = [f"plan v{plan['version']} target={plan['target']}: {len(plan['kernels'])} unique kernels, "
             f"arena {plan['arena_bytes'] / 2**20:.1f} MiB"]
    for name, k in plan["kernels"].items():
        s = k["spec"]
        extra = ", ".join(f"{f}={s[f]}" for f in ("K", "N", "wtype", "glu", "act", "residual", "rope", "kind",
                                                   "gather", "ops") if s.get(f) not in (None, False))
        lines.append(f"  {name}: {extra}")
    for gname, gp in plan["graphs"].items():
        lines.append(f"graph {gname} (max {gp['max_tokens']} tokens, arena {gp['arena_bytes'] / 2**20:.1f} MiB, "
                     f"{len(gp['steps'])} kernel launches):")
        for k, st in enumerate(gp["steps"]):
            args = " ".join(f"{a['kind']}:{a['name']}" + (f"+{a['offset']}" if a["offset"] else "")
                            for a in st["args"])
            what = st["kernel"] or f"{st['collective']['op']} (torch.distributed)"
            lines.append(f"  [{k:3d}] {what:<18} {' '.join(st['nodes']):<28} <- {args}  # {st['origin']}")
            for w in st["why"]:
                lines.append(f"        fused: {w}")
        acc = [d for d in gp["fusion"] if d["accepted"]]
        rej = [d for d in gp["fusion"] if not d["accepted"]]
        lines.append(f"  fusion: {len(acc)} groups formed, {len(rej)} candidates rejected")
        for d in rej:
            lines.append(f"    not fused {d['kind']} {' '.join(d['nodes'])} "
                         f"({d['saved_bytes_per_token']:.0f} B/token): {d['reason']}")
    return "\n".join(lines)
