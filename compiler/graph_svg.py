"""Pictures of the IR: one graph as an SVG (``ffc inspect ART --graph [PASS] -o g.svg``).

Nodes are laid out in layers (a node one below its lowest input; networkx orders them), top to
bottom, each layer ordered by its inputs' positions. By default one transformer layer is drawn
node by node and the others fold into one box; ``layers="all"`` unfolds them. After lowering,
a node's colour is the kernel family of the plan step that computes it (its label names the
step); before it, the op's kind. Edges carry the value's type (shape and, on tensor-parallel
ranks, placement); collectives and send/recv are drawn with a thick red border. A diff
(``--graph --diff A B``) draws B with the nodes A lacks in green and lists what B dropped.

Plain SVG written here (no graphviz binary needed): each node is a ``<g class="node">`` with its
IR name and layer as data attributes, so tools (and the tests) can find them.
"""
from __future__ import annotations

from collections import Counter
from html import escape
from typing import Optional

import networkx as nx

from ffc.ir import Graph, Node, Op
from ffc.ir.ops import COLLECTIVE, ELEMENTWISE, LAYOUT, POINT_TO_POINT

FONT, CHAR_W, LINE_H = 12, 7.2, 15         # monospace text metrics (px)
GAP_X, GAP_Y, PAD = 28, 46, 8
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f"]
# a kernel family's colour, the same in every picture (plan.kernels.Family values)
FAMILY_COLOURS = {"linear": "#80b1d3", "attention": "#fb8072", "norm": "#b3de69", "pointwise": "#ffffb3",
                  "gather": "#bebada", "moe": "#fdb462", "collective": "#fccde5"}
ADDED = "#4fc35b"          # a diff's new nodes
KINDS = {"input": "#eeeeee", "layout": "#f4f4f4", "elementwise": "#ffffb3", "matmul": "#80b1d3",
         "attention": "#fb8072", "norm": "#b3de69", "communication": "#fccde5", "other": "#d9d9d9"}


def _kind(n: Node) -> str:
    """An op's kind (the colour before lowering)."""
    op = n.op
    if op is Op.INPUT:
        return "input"
    if op in COLLECTIVE or op in POINT_TO_POINT or op is Op.LOCAL_SHARD:
        return "communication"
    if op in (Op.LINEAR, Op.MATMUL, Op.EMBEDDING, Op.MOE_EXPERTS, Op.GLU):
        return "matmul"
    if op in (Op.ATTENTION, Op.CACHED_ATTENTION, Op.SDPA):
        return "attention"
    if op in (Op.RMS_NORM, Op.LAYER_NORM, Op.SOFTMAX, Op.MOE_ROUTE):
        return "norm"
    return "layout" if op in LAYOUT else "elementwise" if op in ELEMENTWISE else "other"


def _short(name: str) -> str:
    """A weight's module name: model.layers.0.self_attn.q_proj.weight.shard0of2 -> q_proj."""
    parts = [x for x in name.split(".") if x not in ("weight", "bias") and not x.startswith("shard")
             and not x.isdigit()]
    return parts[-1] if parts else name


def _label(n: Node) -> list[str]:
    if n.op is Op.INPUT:
        return [f"%{n.name}", f"input {n.type}"]
    weights = [_short(p.name) for p in n.param_inputs]
    attrs = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in n.attrs.items()
             if v is not None and k not in ("shape",)][:2]
    second = " ".join(["@" + w for w in weights[:1]] + attrs)
    return [f"%{n.name} = {n.op.value}", second[:44]] if second else [f"%{n.name} = {n.op.value}"]


class _Box:
    def __init__(self, key: str, lines: list[str], fill: str, node: Optional[Node] = None, hot: bool = False,
                 layer: Optional[int] = None, dashed: bool = False):
        self.key, self.lines, self.fill, self.node, self.hot, self.layer, self.dashed = \
            key, lines, fill, node, hot, layer, dashed
        self.w = max(len(t) for t in lines) * CHAR_W + 2 * PAD
        self.h = len(lines) * LINE_H + 2 * PAD - 4
        self.x = self.y = 0.0


def render_graph(graph: Graph, *, layers: str = "one", steps: Optional[dict] = None,
                 added: Optional[set] = None, removed: Optional[list[str]] = None, title: str = "") -> str:
    """The SVG text of ``graph``. ``steps``: IR node name -> (step index, kernel family) from the
    plan (colours by family); ``added``: node names to draw as new; ``removed``: lines listing
    nodes a diff's other side had."""
    layer_of = {n: n.origin.layer for n in graph.all_nodes()}
    seen_layers = sorted({v for v in layer_of.values() if v is not None})
    shown = seen_layers[:1] if layers == "one" else seen_layers
    folded = [x for x in seen_layers if x not in shown]
    fams = sorted({f for _, f in (steps or {}).values()})
    colour = {f: FAMILY_COLOURS.get(f, PALETTE[k % len(PALETTE)]) for k, f in enumerate(fams)}
    boxes: dict[str, _Box] = {}
    where: dict[Node, str] = {}
    fold_key = f"layers {folded[0]}-{folded[-1]}" if folded else ""
    for n in graph.all_nodes():
        if layer_of[n] in folded:
            where[n] = fold_key
            continue
        where[n] = n.name
        lines = _label(n)
        step = (steps or {}).get(n.name)
        if step is not None:
            lines.append(f"step {step[0]}: {step[1]}")
        fill = colour[step[1]] if step is not None else (KINDS[_kind(n)] if steps is None else "#ffffff")
        if added is not None:          # a diff: what the pass made, against the rest
            fill = ADDED if n.name in added else "#f2f2f2"
        boxes[n.name] = _Box(n.name, lines, fill, n, _kind(n) == "communication" and n.op is not Op.LOCAL_SHARD,
                             layer_of[n])
    if folded:
        count = sum(1 for n in graph.nodes if layer_of[n] in folded)
        boxes[fold_key] = _Box(fold_key, [f"transformer layers {folded[0]}..{folded[-1]} folded",
                                          f"{count} nodes, each layer as layer {shown[0]}",
                                          "(--layers all unfolds them)"], "#ececff", dashed=True)
    dag = nx.DiGraph()
    dag.add_nodes_from(boxes)
    labels: dict[tuple[str, str], str] = {}
    for n in graph.nodes:
        for x in n.node_inputs:
            a, b = where[x], where[n]
            if a != b and not dag.has_edge(a, b):
                dag.add_edge(a, b)
                labels[(a, b)] = str(x.type)
    for o in graph.outputs:
        if isinstance(o, Node):
            boxes.setdefault("return", _Box("return", ["return"], "#eeeeee"))
            dag.add_edge(where[o], "return")
            labels[(where[o], "return")] = str(o.type)
    # layers: one below the lowest input; order in a layer: the mean position of the inputs
    rank: dict[str, int] = {}
    for k in nx.topological_sort(dag):
        rank[k] = max((rank[p] + 1 for p in dag.predecessors(k)), default=0)
    rows: dict[int, list[str]] = {}
    for k in nx.topological_sort(dag):
        rows.setdefault(rank[k], []).append(k)
    width = 0.0
    for r in sorted(rows):
        row = sorted(rows[r], key=lambda k: sum(boxes[p].x for p in dag.predecessors(k)) /
                     max(1, dag.in_degree(k)))
        x = 0.0
        for k in row:
            boxes[k].x = x
            x += boxes[k].w + GAP_X
        width = max(width, x)
    y = 40.0 + (LINE_H if title else 0)
    for r in sorted(rows):
        row = rows[r]
        shift = (width - sum(boxes[k].w + GAP_X for k in row)) / 2
        for k in row:
            boxes[k].x += shift + 20
            boxes[k].y = y
        y += max(boxes[k].h for k in row) + GAP_Y
    side = width + 60          # edges that skip layers run down the right side, one lane each
    body, lanes = [], 0
    labelled = set()
    for (a, b) in sorted(dag.edges, key=lambda e: rank[e[1]] - rank[e[0]]):   # short edges first
        A, B = boxes[a], boxes[b]
        x1, y1, x2, y2 = A.x + A.w / 2, A.y + A.h, B.x + B.w / 2, B.y
        if rank[b] - rank[a] > 1:      # out below the source, along its lane, in above the target
            lanes += 1
            lane, d = side + 14 * lanes, 18 + 5 * (lanes % 4)
            path = f"M{x1:.0f},{y1:.0f} V{y1 + d:.0f} H{lane:.0f} V{y2 - d:.0f} H{x2:.0f} V{y2:.0f}"
        else:
            path = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + GAP_Y / 2:.0f} {x2:.0f},{y2 - GAP_Y / 2:.0f} {x2:.0f},{y2:.0f}"
        lx, ly = x1 + 5, y1 + 12           # the value's type, just below the node that makes it
        body.append(f'<path class="edge" d="{path}" fill="none" stroke="#555" stroke-width="1.2" '
                    f'marker-end="url(#arrow)"/>')
        if a not in labelled and (a, b) in labels:   # a value's type, once
            labelled.add(a)
            body.append(f'<text class="shape" x="{lx:.0f}" y="{ly:.0f}" font-size="10" fill="#335">'
                        f'{escape(labels[(a, b)])}</text>')
    for k, bx in boxes.items():
        attrs = f' data-ir="{escape(k)}"' + (f' data-op="{bx.node.op.value}"' if bx.node is not None else "") + \
            (f' data-layer="{bx.layer}"' if bx.layer is not None else "") + (' data-hot="1"' if bx.hot else "") + \
            (' data-added="1"' if bx.fill == ADDED else "")
        stroke = ' stroke="#d00" stroke-width="3"' if bx.hot else ' stroke="#333" stroke-width="1"'
        dash = ' stroke-dasharray="6,4"' if bx.dashed else ""
        body.append(f'<g class="{"node" if bx.node is not None else "box"}"{attrs}>'
                    f'<rect x="{bx.x:.0f}" y="{bx.y:.0f}" width="{bx.w:.0f}" height="{bx.h:.0f}" rx="5" '
                    f'fill="{bx.fill}"{stroke}{dash}/>')
        for i, t in enumerate(bx.lines):
            body.append(f'<text x="{bx.x + PAD:.0f}" y="{bx.y + PAD + 10 + i * LINE_H:.0f}" font-size="{FONT}">'
                        f'{escape(t)}</text>')
        body.append("</g>")
    legend = [(f, colour[f]) for f in fams] if steps is not None else \
        [(k, v) for k, v in KINDS.items() if k in {_kind(b.node) for b in boxes.values() if b.node is not None}]
    if added is not None:
        legend = [("made by the pass", ADDED), ("there before it", "#f2f2f2")]
    lx = side + 14 * lanes + 40
    body.append(f'<text x="{lx}" y="40" font-size="{FONT}" font-weight="bold">'
                f'{"kernel family (plan step)" if steps is not None else "diff" if added is not None else "op kind"}'
                '</text>')
    for i, (name, fill) in enumerate(legend):
        body.append(f'<rect x="{lx}" y="{50 + i * 20}" width="14" height="14" fill="{fill}" stroke="#333"/>'
                    f'<text x="{lx + 20}" y="{61 + i * 20}" font-size="{FONT}">{escape(name)}</text>')
    yy = 60 + len(legend) * 20
    body.append(f'<rect x="{lx}" y="{yy}" width="14" height="14" fill="#fff" stroke="#d00" stroke-width="3"/>'
                f'<text x="{lx + 20}" y="{yy + 11}" font-size="{FONT}">collective / send / recv</text>')
    for i, t in enumerate(removed or []):
        body.append(f'<text x="{lx}" y="{yy + 40 + i * LINE_H}" font-size="{FONT}" fill="#a00">{escape(t)}</text>')
    total_w = lx + 320
    total_h = max(y, yy + 60 + LINE_H * len(removed or []))
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{total_h:.0f}" '
            f'font-family="DejaVu Sans Mono, monospace">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<text x="20" y="24" font-size="15" font-weight="bold">{escape(title)}</text>')
    return head + "".join(body) + "</svg>\n"


def plan_steps(plan, graph: str) -> dict:
    """IR node name -> (step index, kernel family) of a lowered graph."""
    gp = plan.graphs.get(graph)
    if gp is None:
        return {}
    return {name.lstrip("%"): (k, st.family.value) for k, st in enumerate(gp.steps) for name in st.nodes}


def diff_nodes(a: Graph, b: Graph) -> tuple[set, list[str]]:
    """B's nodes that A lacks (by op, attributes, type and HF module), and lines naming A's
    nodes B lacks."""
    def key(n):
        return (n.op, tuple(sorted((k, str(v)) for k, v in n.attrs.items())), str(n.type), str(n.origin))
    have = Counter(key(n) for n in a.nodes)
    added = set()
    for n in b.nodes:
        if have[key(n)] > 0:
            have[key(n)] -= 1
        else:
            added.add(n.name)
    left = Counter(key(n) for n in b.nodes)
    gone = []
    for n in a.nodes:
        if left[key(n)] > 0:
            left[key(n)] -= 1
        else:
            gone.append(f"- %{n.name} = {n.op.value} : {n.type}")
    return added, (["removed by the pass:"] + gone[:40] + ([f"... {len(gone) - 40} more"] if len(gone) > 40 else [])
                   if gone else [])
