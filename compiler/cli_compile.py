"""`ffc compile`, `ffc build` and `ffc calibrate`: what writes artifacts and profiles (imported by
ffc.cli only for these commands: the compiler, transformers and the search cost seconds to import)."""
from __future__ import annotations

import sys

import torch

from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Workload
from ffc.runtime.offload import format_policy

from . import build, knobs
from .api import compile_model
from .artifact import REBUILT, Artifact, read_manifest, refresh_manifest
from .calibrate import calibrate, profile_for, save
from .codegen import render_sources
from .errors import FfcError
from .disk import disk_bandwidth
from .offload_policy import plan_offload
from .parallel import dry_run
from .progress import Reporter
from .util import parse_memory


def _degree(text: str):
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise FfcError(f"parallel degree {text!r} must be a positive integer or 'auto'")
    return int(text)


def _compile(a) -> None:
    tp, pp = _degree(a.tp), _degree(a.pp)
    if a.devices is not None:
        if a.devices < 1:
            raise FfcError(f"--devices {a.devices} must be a positive number of devices")
        if "auto" not in (tp, pp) and tp * pp > a.devices:
            raise FfcError(f"--tp {tp} --pp {pp} needs {tp * pp} devices but --devices gives {a.devices}: lower the "
                           "degrees, or pass --tp auto / --pp auto to search the splits of the devices")
    if a.dry_run or tp == "auto" or pp == "auto":
        if not a.dry_run:
            raise FfcError("--tp auto / --pp auto choose degrees in a --dry-run; then compile with the degrees it "
                           "reports")
        log = lambda s: print(f"[ffc] {s}", file=sys.stderr)  # noqa: E731
        print(dry_run(a.model, tp=tp, pp=pp, devices=a.devices, profile=profile_for(a.profile, log),
                      memory_limit=parse_memory(a.memory_per_device, what="--memory-per-device"),
                      workload=Workload.parse(a.workload) if a.workload else None,
                      max_seq_len=a.max_seq_len, dtype=a.dtype, allow_pickle=a.allow_pickle,
                      quant=QuantPolicy.parse(a.quant, a.quant_skip), kv_dtype=a.kv_dtype,
                      memory_budget=parse_memory(a.memory_budget, what="--memory-budget"),
                      max_batch=a.max_batch, prefill_tokens=a.prefill_tokens, kv_block_size=a.kv_block_size,
                      log=log))
        return
    if not a.output:
        raise FfcError("give the artifact directory to write with -o/--output")
    with Reporter(quiet=a.quiet) as report:
        compile_model(a.model, a.output, max_seq_len=a.max_seq_len, from_ir=a.from_ir, allow_pickle=a.allow_pickle,
                      log=report, dtype=a.dtype, target=a.target, codegen=not a.no_codegen,
                      prefill_tokens=a.prefill_tokens, max_batch=a.max_batch, kv_block_size=a.kv_block_size, tp=tp,
                      pp=pp, profile=a.profile, memory_per_device=a.memory_per_device, workload=a.workload,
                      quant=a.quant, quant_skip=a.quant_skip, kv_dtype=a.kv_dtype, self_draft=a.self_draft,
                      calibration=a.calibration, memory_budget=a.memory_budget)
    if not a.quiet:
        print(report.summary(), file=sys.stderr)
    if a.memory_budget is not None:       # what loads will run (it builds the weights store once, too)
        budget = parse_memory(a.memory_budget, what="--memory-budget")
        print(format_policy(plan_offload(Artifact.open(a.output), budget).policy.summary), file=sys.stderr)
    print(a.output)


def _build(a) -> None:
    """Rebuild an artifact's kernels from its (possibly edited) sources."""
    # everything but what the build writes is verified first: a build never blesses corruption
    art = Artifact(a.artifact, read_manifest(a.artifact, skip=REBUILT))
    if not art.kernels:
        raise FfcError(f"{art.root} has no generated kernels (compiled with --no-codegen); recompile it")
    log = lambda s: print(f"[ffc] {s}", file=sys.stderr)  # noqa: E731
    build.check_plan(art, log)     # the edited sources may be vouched for, a crafted plan may not
    _, spans = render_sources(art.plan)
    root = art.root
    lib = build.build(root / "kernels", art.plan.target, spans, log=log, reuse=False)
    kernels = dict(art.kernels, library=str(lib.relative_to(root)))
    refresh_manifest(root, {"kernels": kernels})
    print(lib)


def _calibrate(a) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    with Reporter() as report:
        prof = calibrate(a.ranks, a.artifact, log=report)
        with report.phase("disk reads, page cache bypassed (offloaded weights)"):
            store = knobs.cache_dir() / "offload"
            store.mkdir(parents=True, exist_ok=True)
            report.note(f"{disk_bandwidth(store, remeasure=True) / 1e9:.2f} GB/s")
    print(report.summary("calibrate"), file=sys.stderr)
    print(save(prof, a.output))


COMMANDS = {"compile": _compile, "build": _build, "calibrate": _calibrate}
