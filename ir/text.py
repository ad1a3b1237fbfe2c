"""Text form of the IR: one node per line, read back exactly by ``parse``.

    # ffc ir 1
    param @model.embed_tokens.weight : f32[49152,576]
    param @model.layers.0.self_attn.qkv_proj.weight : f32[960,576] = concat(@a, @b, @c) {dim=0}

    graph forward(%input_ids : i64[1,T], %position_ids : i64[1,T]) {
      %0 = embedding(%input_ids, @model.embed_tokens.weight) : f32[1,T,576]  # model.embed_tokens
      %1 = rms_norm(%0, @model.layers.0.input_layernorm.weight) {eps=1e-05} : f32[1,T,576]  # [layer 0] model.layers.0.input_layernorm
      return %1
    }

``print(parse(text)) == text`` for any printed module; nodes are renumbered in order.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .graph import Graph, Module, Node, Origin, Param, ParamRef, Recipe, freeze
from .ops import Op
from .types import parse_type

HEADER = "# ffc ir 1"


class IRParseError(ValueError):
    def __init__(self, msg: str, line_no: int, line: str):
        super().__init__(f"line {line_no}: {msg}\n    {line.strip()}")
        self.line_no = line_no


def _scalar(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, tuple) else "[" + ",".join(_scalar(x) for x in v) + "]"


def _attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={_scalar(v)}" for k, v in sorted(attrs.items())) + "}"


def print_module(module: Module) -> str:
    lines = [HEADER]
    if module.meta:
        lines.append("meta " + json.dumps(module.meta, sort_keys=True))
    for p in module.params.values():
        line = f"param @{p.name} : {p.type}"
        if p.recipe:
            args = ", ".join(str(a) if isinstance(a, ParamRef) else _scalar(a) for a in p.recipe.args)
            line += f" = {p.recipe.op.value}({args}){_attrs(dict(p.recipe.attrs))}"
        lines.append(line)
    for g in module.graphs.values():
        lines.append("")
        lines.extend(print_graph(g).splitlines())
    return "\n".join(lines) + "\n"


def node_names(g: Graph) -> dict[Node, str]:
    names = {n: n.name for n in g.inputs}
    for k, n in enumerate(g.nodes):
        names[n] = str(k)
    return names


def format_node(n: Node, names: dict[Node, str]) -> str:
    def arg(a):
        if isinstance(a, Node):
            return f"%{names[a]}"
        if isinstance(a, ParamRef):
            return str(a)
        return _scalar(a)
    line = f"%{names[n]} = {n.op.value}({', '.join(arg(a) for a in n.inputs)}){_attrs(n.attrs)} : {n.type}"
    return line + (f"  # {n.origin.text()}" if n.origin else "")


def print_graph(g: Graph) -> str:
    names = node_names(g)
    ins = ", ".join(f"%{n.name} : {n.type}" for n in g.inputs)
    lines = [f"graph {g.name}({ins}) {{"]
    lines += ["  " + format_node(n, names) for n in g.nodes]
    lines.append("  return " + ", ".join(f"%{names[o]}" for o in g.outputs))
    lines.append("}")
    return "\n".join(lines)


# ------------------------------------------------------------------ parser

def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, cur, quote = [], 0, [], False
    for ch in s:
        if ch == '"' and (not cur or cur[-1] != "\\"):
            quote = not quote
        elif not quote and ch in "[{(":
            depth += 1
        elif not quote and ch in "]})":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _parse_attrs(s: str) -> dict:
    out = {}
    for part in _split_top(s):
        k, eq, v = part.partition("=")
        if not eq:
            raise ValueError(f"bad attribute {part!r}; expected key=value")
        out[k.strip()] = freeze(json.loads(v))
    return out


def _op(name: str) -> Op:
    try:
        op = Op(name)
    except ValueError:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(o.value for o in Op)}") from None
    if op is Op.INPUT:
        raise ValueError("'input' is declared in the graph header, not as a node")
    return op


_CALL = re.compile(r"^(\w+)\((.*?)\)(?:\s*\{(.*)\})?$")
_NODE = re.compile(r"^%(\w+) = (.*)$")
_GRAPH = re.compile(r"^graph (\w+)\((.*)\) \{$")
_PARAM = re.compile(r"^param @(\S+) : (\S+)(?: = (.*))?$")


def parse(text: str) -> Module:
    """Parse a printed module; errors name the line."""
    params: list[Param] = []
    graphs: list[Graph] = []
    meta: dict = {}
    g = None
    env: dict[str, Node] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        try:
            if not line or (line.startswith("#") and g is None):
                continue
            if line.startswith("meta ") and g is None:
                meta = json.loads(line[5:])
            elif line.startswith("param ") and g is None:
                m = _PARAM.match(line)
                if not m:
                    raise ValueError("bad param line; expected: param @name : f32[4,4] [= op(@a, ...) {attrs}]")
                recipe = None
                if m.group(3):
                    op, args, attrs = _parse_call(m.group(3))
                    recipe = Recipe(op, tuple(args), tuple(sorted(attrs.items())))
                params.append(Param(m.group(1), parse_type(m.group(2)), recipe))
            elif line.startswith("graph ") and g is None:
                m = _GRAPH.match(line)
                if not m:
                    raise ValueError("bad graph header; expected: graph name(%x : i64[1,T], ...) {")
                env = {}
                inputs = []
                for part in _split_top(m.group(2)):
                    name, _, ty = part.partition(" : ")
                    if not name.startswith("%"):
                        raise ValueError(f"graph input {part!r} must look like %name : type")
                    node = Node(Op.INPUT, type=parse_type(ty), name=name[1:])
                    env[node.name] = node
                    inputs.append(node)
                g = Graph(m.group(1), inputs)
            elif line.startswith("return") and g is not None:
                names = [a.strip() for a in line[len("return"):].split(",") if a.strip()]
                g.outputs = [_lookup(env, a) for a in names]
            elif line == "}" and g is not None:
                graphs.append(g)
                g = None
            elif line.startswith("%") and g is not None:
                body, _, origin = line.partition("  # ")
                body, sep, ty = body.rpartition(" : ")
                if not sep:
                    raise ValueError("node has no type; expected ... : f32[T,576]")
                m = _NODE.match(body)
                if not m:
                    raise ValueError("bad node; expected %name = op(args) {attrs} : type")
                if m.group(1) in env:
                    raise ValueError(f"%{m.group(1)} is defined twice (the IR is SSA)")
                op, args, attrs = _parse_call(m.group(2), env)
                node = Node(op, tuple(args), attrs, parse_type(ty), Origin.parse(origin), m.group(1))
                env[node.name] = node
                g.nodes.append(node)
            else:
                raise ValueError("unexpected line")
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise IRParseError(str(e).strip("'\""), no, raw) from None
    if g is not None:
        raise IRParseError(f"graph {g.name} is not closed with '}}'", no, raw)
    return Module(graphs, params, meta)


def _lookup(env: dict, ref: str) -> Node:
    if not ref.startswith("%") or ref[1:] not in env:
        raise ValueError(f"{ref} is used before it is defined")
    return env[ref[1:]]


def _parse_call(s: str, env: dict | None = None):
    m = _CALL.match(s.strip())
    if not m:
        raise ValueError(f"bad call {s!r}; expected op(args) {{attrs}}")
    op = _op(m.group(1))
    args = []
    for a in _split_top(m.group(2)):
        if a.startswith("%"):
            if env is None:
                raise ValueError(f"a parameter recipe can only use parameters, not {a}")
            args.append(_lookup(env, a))
        elif a.startswith("@"):
            args.append(ParamRef(a[1:]))
        else:
            args.append(json.loads(a))
    return op, args, _parse_attrs(m.group(3)) if m.group(3) else {}
