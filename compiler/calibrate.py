"""``ffc calibrate``: measure this machine into a device profile for the cost model.

GEMM FLOP/s (torch.mm at model-like shapes), read bandwidth (a streaming reduction over a
buffer far larger than the caches), per-kernel overhead (a tiny op), and the collectives
between local processes as the runtime's ranks run them (all_reduce and all_gather through
shared memory on x86, all_to_all and send/recv over gloo; sizes from 4 KiB to 16 MiB,
fitted as t = a + b * bytes). Medians throughout: the machine is
shared and noisy.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ffc
from ffc.runtime import shm_collectives
from ffc.runtime.device_memory import host_buffer

from .cluster import DeviceProfile, Link, load_profile, local_profile_path
from .errors import InvalidRequestError
from .kernel_cost import calibration_samples, fit_families
from .progress import Reporter
from .util import free_port

SIZES = [4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20, 16 << 20]


def _median_time(fn: Callable, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_gemm(runs: int = 7) -> dict:
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in ((512, 576, 1536), (1024, 1024, 1024), (256, 2048, 2048)):
            a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
            t = _median_time(lambda: torch.mm(a, b), runs)
            best = max(best, 2 * m * k * n / t)
        out[name] = best
    out["fp16"] = out["bf16"]
    return out


def measure_bandwidth(nbytes: int = 1 << 30, runs: int = 7) -> float:
    """Streaming reads of host memory as the runtime allocates it (huge pages: ``host_buffer``)."""
    x = host_buffer(nbytes).view(torch.float32).uniform_()
    return nbytes / _median_time(lambda: x.sum(), runs)


def measure_overhead(runs: int = 200) -> float:
    x = torch.ones(8)
    return _median_time(lambda: x.add_(1.0), runs)


def _collective_worker(rank: int, world: int, port: int, runs: int, out_path: str, sizes: list,
                       kinds: tuple, shm: Optional[str] = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # all-reduce / all-gather as the runtime's local ranks do them (shared memory, gloo past a slot)
    group = dist
    if shm:
        group = shm_collectives.SharedMemoryGroup(shm, rank, world, dist, creator_elsewhere=False)   # spawned: the creator's tracker
    results = []
    try:
        for n in sizes:
            x = torch.zeros(n // 4)
            parts = [torch.zeros(n // 4 // world) for _ in range(world)]
            ops = {
                "all_reduce": lambda: group.all_reduce(x),
                "all_gather": lambda: group.all_gather(parts, parts[rank].clone()),
                "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(x), x),
                "send_recv": lambda: (dist.send(x, 1) if rank == 0 else dist.recv(x, 0)) if rank < 2 else None,
            }
            for kind, fn in ops.items():
                if kind not in kinds:
                    continue
                try:
                    dist.barrier()
                    t = _median_time(fn, runs)
                except RuntimeError:   # this gloo build lacks the collective
                    continue
                results.append((kind, n, t))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def time_collectives(world: int = 2, runs: int = 9, sizes=SIZES,
                      kinds=("all_reduce", "all_gather", "all_to_all", "send_recv")) -> list:
    """[(collective, bytes, median seconds)] between ``world`` local processes, as the runtime's
    local ranks run them: all-reduce and all-gather through shared memory (x86), the rest gloo."""
    port = free_port()
    seg = shm_collectives.create_segment(f"ffccal{os.getpid()}_{port}", world) if shm_collectives.available() else None
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.json")
            mp.start_processes(_collective_worker, args=(world, port, runs, path, list(sizes), tuple(kinds),
                                                         seg.name if seg else None),
                               nprocs=world, start_method="spawn")
            with open(path) as f:
                return [tuple(r) for r in json.load(f)]
    finally:
        if seg is not None:
            shm_collectives.remove_segment(seg)


def measure_collectives(world: int = 2, runs: int = 9) -> list:
    """[(collective, ranks, a, b)]: t = a + b * bytes fitted over SIZES (least squares on relative
    error, so the small sizes that fix the latency weigh as much as the large ones)."""
    raw = time_collectives(world, runs)
    fitted = []
    for kind in sorted({k for k, _, _ in raw}):
        pts = [(n, t) for k, n, t in raw if k == kind]
        n, t = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        b, a = np.polyfit(n, t, 1, w=1 / t)
        fitted.append((kind, world, max(float(a), 1e-7), max(float(b), 1e-13)))
    return fitted


def calibrate(world: int = 2, artifact=None, log: Callable[[str], None] = lambda s: None) -> DeviceProfile:
    """This machine as a profile; with ``artifact`` also its generated kernels' cost per family."""
    threads = torch.get_num_threads()
    report = Reporter.of(log)
    with report.phase(f"GEMM at {threads} threads"):
        flops = measure_gemm()
        report.note(f"fp32 {flops['fp32'] / 1e9:.0f} GFLOP/s, bf16 {flops['bf16'] / 1e9:.0f} GFLOP/s")
    with report.phase("read bandwidth"):
        bw = measure_bandwidth()
        report.note(f"{bw / 1e9:.1f} GB/s")
    with report.phase("per-op overhead"):
        overhead = measure_overhead()
        report.note(f"{overhead * 1e6:.1f} us")
    with report.phase(f"collectives between {world} local processes"):   # shared memory up to a slot, as the
        fitted = measure_collectives(world)                              # runtime's ranks; gloo past it
        report.note(", ".join(f"{kind} {a * 1e6:.0f} us + {1 / b / 1e9:.2f} GB/s" for kind, _, a, b in fitted))
    ar = next((f for f in fitted if f[0] == "all_reduce"), None)
    latency, bandwidth = (ar[2] / 2, 1 / ar[3]) if ar else (50e-6, 1e9)
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    kernels = ()
    if artifact is not None:
        with report.phase(f"generated kernels of {artifact} at 9 decode/prefill shapes"):
            llm = ffc.load(artifact)
            if llm.compiled is None:
                raise InvalidRequestError(f"{artifact} has no generated kernels; compile it without --no-codegen")
            fams = fit_families(calibration_samples(llm))
        for f, (a, c, m) in fams.items():
            log(f"  {f}: {a * 1e6:.2f} us + {c and 1 / c / 1e9:.1f} GFLOP/s + {m and 1 / m / 1e9:.1f} GB/s")
        kernels = tuple(sorted((f, a, c, m) for f, (a, c, m) in fams.items()))
    return DeviceProfile(name="local", description=f"this machine: {os.cpu_count()} CPUs, {threads} threads, local ranks",
                         peak_flops=tuple(sorted(flops.items())), memory_bandwidth=bw, memory_bytes=float(mem),
                         kernel_overhead=overhead,
                         link=Link("gloo-local", latency, bandwidth, tuple(fitted)),
                         measured=(("threads", threads), ("world", world)), kernels=kernels, shared=True)


def save(profile: DeviceProfile, path=None):
    path = Path(path or local_profile_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def profile_for(name, log: Callable[[str], None] = lambda s: None) -> DeviceProfile:
    """The named profile; ``local`` (the default) is measured once with ``calibrate`` and saved
    when this machine has none yet."""
    if name in (None, "local") and not local_profile_path().exists():
        log(f"no profile of this machine yet: measuring it once (ffc calibrate) into {local_profile_path()}")
        save(calibrate(log=log))
    return load_profile(name)
