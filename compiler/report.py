"""``ffc inspect ART --report report.html``: one self-contained page about an artifact, what a
user attaches to a bug report: the manifest's summary and provenance, the passes (time, nodes),
the final decode graph (SVG, inline), the plan's kernels and fusion decisions, weights per
format, and for a parallel artifact its strategy (text and picture, inline as PNG data).
"""
from __future__ import annotations

import base64
import io
import json
from html import escape

from ffc.ir import parse
from ffc.lower.describe import describe_plan

from .artifact import Artifact
from .graph_svg import plan_steps, render_graph
from .plots import strategy_plot

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;font-size:13px}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}.graph{overflow:auto;border:1px solid #ddd}"""


def _table(head: list[str], rows: list[list]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def render_report(art: Artifact) -> str:
    m = art.manifest
    model = m["model"]
    parts = [f"<h1>{escape(art.root.name)}</h1>",
             _table(["", ""], [["model", f"{model['source']} ({model['family']}: {model['architecture']})"],
                               ["ffc / torch / transformers",
                                f"{m['ffc_version']} / {m['torch_version']} / {m['transformers_version']}"],
                               ["options", json.dumps(m["options"], sort_keys=True)],
                               ["compiled in", f"{m['compile_seconds']} s" + (" from edited IR" if m.get("from_ir") else "")],
                               ["kernels", json.dumps(m.get("kernels"), sort_keys=True)]])]
    parts += ["<h2>Passes</h2>", _table(["#", "pass", "nodes", "ms", "changed"],
                                        [[p["index"], p["name"], p["nodes"], f"{p['seconds'] * 1e3:.1f}",
                                          "yes" if p["changed"] else "-"] for p in m["passes"]])]
    final = parse(art.path(art.final_ir, "final_ir").read_text())
    name = "decode" if "decode" in final.graphs else next(iter(final.graphs))
    steps = plan_steps(art.plan, name) if art.kernels else None
    parts += [f"<h2>The {escape(name)} graph</h2><p>One transformer layer drawn, the others folded; colours: the "
              "kernel family of the plan step computing each node; edges: types (and placements).</p>",
              '<div class="graph">' + render_graph(final.graphs[name], steps=steps, title=f"{name} ({art.final_ir})")
              + "</div>"]
    if art.kernels:
        parts += ["<h2>Plan: kernels, fusion decisions, memory</h2>", f"<pre>{escape(describe_plan(art.plan))}</pre>"]
    w = m.get("weights", {}).get("bytes_per_format", {})
    if w:
        parts += ["<h2>Weights per format</h2>",
                  _table(["format", "tensors", "MB"], [[f, v["tensors"], f"{v['bytes'] / 1e6:.1f}"] for f, v in w.items()])]
    par = m.get("parallel")
    if par:
        parts += [f"<h2>Parallel strategy: tp={par['tp']} pp={par['pp']}</h2>",
                  f"<pre>{escape(art.path(par['strategy'], 'parallel.strategy').read_text())}</pre>"]
        data = art.root / "parallel" / "strategy.json"
        if data.is_file():
            buf = io.BytesIO()
            strategy_plot(json.loads(data.read_text()), buf, fmt="png")
            parts.append(f'<img alt="strategy" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')
    parts += ["<h2>Provenance</h2>", f"<pre>{escape(json.dumps(m.get('provenance'), indent=1, sort_keys=True))}</pre>",
              "<p>Benchmark numbers are not stored in an artifact: attach the output of <code>ffc bench ART</code> "
              "(and <code>ffc bench ART --trace step.json</code>) with this page.</p>"]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(art.root.name)}: ffc report</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
