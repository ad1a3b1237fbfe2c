"""The cost model against measurement on this machine: predicted vs measured time per kernel
of a compiled plan's step, per step, and per collective, with the median absolute error.

Predictions use the calibrated profile (``ffc calibrate``): a kernel's time is the roofline
of its FLOPs and the bytes it reads and writes outside itself (weights, arena buffers, the
KV cache up to the context) plus the per-kernel overhead; a collective's is the profile's
fitted time. Measurements: each kernel timed between the executor's barriers (median of
runs), whole steps by wall clock, collectives between local processes as the runtime's ranks
run them (shared memory on x86, else gloo).

    ffc calibrate --artifact smol.ffc && python benchmarks/cost_model.py smol.ffc --batch 1 8 --context 256
    python benchmarks/cost_model.py smol.ffc --plot cost.png      # predicted vs measured, per kernel family

Calibration fits kernel costs at other shapes (decode batch 1-16 at context 32-128, prefill
16-96 tokens); the defaults here check batch 1 and 8 at context 256 and a 128-token prefill.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ffc
from ffc.cluster import load_profile
from ffc.calibrate import time_collectives
from ffc.kernel_cost import kernel_work, measure, step_inputs
from ffc.plots import cost_model_plot


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--profile", default="local")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=256, help="decode position")
    ap.add_argument("--prefill", type=int, nargs="*", default=[128], help="prefill lengths (one sequence)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", metavar="FILE.png", default=None,
                    help="also draw predicted against measured per kernel family (log axes, the +-25%% band)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    profile = load_profile(a.profile)
    llm = ffc.load(a.artifact)
    errors, rows, points = [], [], []
    shapes = [("decode", b, a.context) for b in a.batch] + [("prefill", 1, n) for n in a.prefill]
    for graph, batch, context in shapes:
        inputs = step_inputs(llm, graph, batch, context)
        work = kernel_work(llm, graph, inputs)
        pred = [profile.kernel_time(fam, f, b) for fam, _, f, b in work]
        meas = measure(llm, graph, inputs, a.runs)
        steps = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            llm.compiled.run(graph, inputs)
            steps.append(time.perf_counter() - t0)
        tag = f"{graph} b{batch} ctx{context}" if graph == "decode" else f"prefill {context} tokens"
        groups: dict = {}
        for (fam, label, _, _), p, m in zip(work, pred, meas):
            g = groups.setdefault(f"{fam}:{label}", [[], []])
            g[0].append(p)
            g[1].append(m)
            errors.append(abs(p - m) / m)
            points.append((fam, p, m))
        for name, (ps, ms) in groups.items():
            rows.append((f"{tag} {name} (x{len(ps)})", statistics.median(ps), statistics.median(ms)))
        step = statistics.median(steps)
        rows.append((f"{tag} whole step", sum(pred), step))
        errors.append(abs(sum(pred) - step) / step)
    cfg = llm.manifest["model"]["config"]
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd"))   # what a tp=2 plan all-reduces per token
    sizes = [b * hidden * 4 for b in a.batch] + [n * hidden * 4 for n in a.prefill]
    for _, n, t in time_collectives(2, runs=15, sizes=sizes, kinds=("all_reduce",)):
        p = profile.collective_time("all_reduce", n, 2)
        rows.append((f"all_reduce of {n / 1024:.0f} KiB, 2 local ranks", p, t))
        errors.append(abs(p - t) / t)
        points.append(("all_reduce", p, t))
    print(f"profile {profile.name} ({'kernel families fitted' if profile.kernels else 'roofline only'}); "
          f"{torch.get_num_threads()} threads")
    print(f"{'op':58} {'predicted':>11} {'measured':>11} {'error':>7}")
    for name, p, m in rows:
        print(f"{name:58} {p * 1e6:9.1f}us {m * 1e6:9.1f}us {100 * (p - m) / m:+6.0f}%")
    print(f"median absolute error over {len(errors)} kernels, steps and collectives: "
          f"{100 * statistics.median(errors):.1f}%")
    if a.plot:
        cost_model_plot(points, a.plot)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
