"""Pictures of the cost model's decisions (matplotlib, written as PNG, SVG or PDF by suffix).

``strategy_plot``: a tensor-parallel / pipeline strategy (parallel/strategy.json) per transformer
layer: the chosen placements' predicted compute and communication time over the search's
workload (one rank), against every op on its next-best legal strategy; memory per rank per
layer; and the whole plan against the other plans the search priced (all replicated, ...).
``cost_model_plot``: predicted against measured time per kernel family on log axes, with the
band the cost model is held to (benchmarks/cost_model.py --plot).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt

matplotlib.use("Agg")          # files only: no display needed

CHOSEN, COMM, NEXT = "#4c72b0", "#dd8452", "#555555"


def _layer_key(layer) -> str:
    return "other" if layer is None else str(layer)


def strategy_plot(st: dict, path, fmt: str | None = None):
    """Per layer: the chosen plan's compute and communication (stacked), the next-best outline;
    memory per rank; the whole plan next to the search's reference plans."""
    choices = st["choices"]
    layer_of = {c["node"]: c["layer"] for c in choices}
    layers = sorted({c["layer"] for c in choices if c["layer"] is not None})
    keys = [str(x) for x in layers] + (["other"] if any(c["layer"] is None for c in choices) else [])
    compute = dict.fromkeys(keys, 0.0)
    comm = dict.fromkeys(keys, 0.0)
    nxt = dict.fromkeys(keys, 0.0)
    memory = dict.fromkeys(keys, 0.0)
    for c in choices:
        k = _layer_key(c["layer"])
        compute[k] += c["compute_s"]
        memory[k] += c["memory"]
        legal = [a["extra_s"] for a in c["alternatives"] if a["extra_s"] is not None]
        nxt[k] += min(legal) if legal else 0.0
    for e in st["collectives"]:
        comm[_layer_key(layer_of.get(e["consumer"]))] += e["seconds"]
    fig, (ax, mem, whole) = plt.subplots(3, 1, figsize=(max(11.0, 0.32 * len(keys) + 6), 11),
                                         gridspec_kw={"height_ratios": [3, 2, 2]})
    x = range(len(keys))
    ms = [1e3 * compute[k] for k in keys]
    mc = [1e3 * comm[k] for k in keys]
    ax.bar(x, ms, color=CHOSEN, label="chosen: compute and memory traffic (roofline)")
    ax.bar(x, mc, bottom=ms, color=COMM, label="chosen: communication (collectives it feeds)")
    ax.bar(x, [a + b + 1e3 * nxt[k] for a, b, k in zip(ms, mc, keys)], fill=False, edgecolor=NEXT,
           linestyle="--", label="every op on its next-best legal strategy")
    w = st["workload"]
    ax.set_title(f"tp={st['tp']} pp={st['pp']} on {st['profile']}: predicted time per rank over the search's workload\n"
                 f"(prefill {w['prompt_tokens']} tokens x batch {w['batch']}, then {w['output_tokens']} decode steps)",
                 fontsize=10)
    ax.set_ylabel("ms")
    ax.set_xticks(list(x), keys, fontsize=8)
    ax.set_xlabel("transformer layer (other: embedding, final norm, lm_head)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # beside, never over a bar
    mem.bar(x, [memory[k] / 2**20 for k in keys], color="#55a868")
    mem.set_ylabel("MiB per rank")
    mem.set_title("memory per rank: weights, and the KV cache of attention", fontsize=10)
    mem.set_xticks(list(x), keys, fontsize=8)
    plans = [(r["plan"], r["compute_s"], r["comm_s"]) for r in st.get("references", [])]
    if st.get("predicted") and not any(p[0] == "chosen" for p in plans):
        plans.insert(0, ("chosen", st["predicted"]["compute_s"], st["predicted"]["comm_s"]))
    y = range(len(plans))
    whole.barh(y, [1e3 * p[1] for p in plans], color=CHOSEN, label="compute")
    whole.barh(y, [1e3 * p[2] for p in plans], left=[1e3 * p[1] for p in plans], color=COMM, label="communication")
    whole.set_yticks(list(y), [p[0] for p in plans], fontsize=8)
    whole.invert_yaxis()
    whole.set_xlabel("ms per rank over the workload")
    whole.set_title("the whole plan against the others the search priced", fontsize=10)
    whole.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(left=0.2, right=0.72, hspace=0.5)      # room for the legends on the right
    fig.savefig(path, dpi=110, bbox_inches="tight", format=fmt)   # fmt: for a file object (else by suffix)
    plt.close(fig)
    return path


def cost_model_plot(points: Sequence[tuple[str, float, float]], path, band: float = 0.25) -> Path:
    """``points``: (kernel family, predicted s, measured s); log-log, one colour per family,
    the diagonal and a +-``band`` region."""
    fig, ax = plt.subplots(figsize=(7, 6.5))
    lo = min(min(p, m) for _, p, m in points) / 1.5
    hi = max(max(p, m) for _, p, m in points) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * (1 - band), hi * (1 - band)], [lo * (1 + band), hi * (1 + band)],
                    color="#cccccc", alpha=0.5, label=f"+-{band:.0%}")
    for fam in sorted({f for f, _, _ in points}):
        mine = [(p, m) for f, p, m in points if f == fam]
        ax.scatter([m for _, m in mine], [p for p, _ in mine], s=22, label=f"{fam} ({len(mine)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured (s)")
    ax.set_ylabel("predicted (s)")
    ax.set_title("cost model against measurement, per kernel family", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
