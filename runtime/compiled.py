"""The compiled backend: a plan bound to its kernel library, weights, one arena and a KV cache.

Binding resolves every kernel argument of every step to an address once (buffers are arena
offsets, weights are tensors, the KV cache is bound per cache tensor); a step then copies its
few input ids into the arena, runs the whole graph in one C++ call, and copies logits out.
Linear weights are repacked in the plan's panel layout when the plan is opened; the plan keeps
only the weights its kernels read, so the unpacked originals can be freed.
A CUDA plan holds its weights, arena and KV cache in GPU memory its kernel library's executor
allocated (``device_memory``: no CUDA build of torch needed; every copy runs on the executor's
stream); inputs are copied in and logits copied back to the host. Collective steps view that
memory as torch tensors for NCCL, which needs a CUDA torch.
The runtime reads only the plan (``ffc.plan``): it never imports the lowering or codegen.
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Optional

import torch

from ffc.artifact import Artifact
from ffc.errors import ArtifactError, InvalidRequestError
from ffc.ir.ops import REGISTRY, Comm, Op
from ffc.plan.expr import X
from ffc.plan.schema import PLAN_VERSION, Arg, ArgKind, GraphPlan, Plan, Step, Target, limits

from ffc import knobs

from .device_memory import HOST, OwnMemory, as_torch, read, write
from .kernel_library import load_library
from .offload import WeightStream
from .qpanels import pack_panels, pack_qpanels, panel_count, panel_view


def _env_of(env: dict, exprs) -> list[int]:
    return [int(e.evaluate(env)) for e in exprs]


def _pack(plan: Plan, names: set, weights: Mapping[str, torch.Tensor], packed: dict, memory) -> None:
    """Pack the arguments ``names`` that ``packed`` lacks, into it: whole weights first, so that a
    chunk of one (an lm_head lowered in row ranges) is a view of its panels, not a second copy
    (in host memory; executor-owned memory has no views, a chunk is packed on its own there)."""
    for name in sorted(names - set(packed), key=lambda n: n != plan.packed[n].param):
        p = plan.packed[name]
        span = panel_view(plan.packed.get(p.param), p)
        if span is not None and isinstance(packed.get(p.param), torch.Tensor):
            packed[name] = packed[p.param][span[0]:span[1]]
            continue
        info, w = plan.params[p.param], weights[p.param]
        if info.dtype.quantized:
            packed[name] = memory.to_device(pack_qpanels(w, info.dtype, info.shape[1], p.rows, p.nr), copy=False)
            continue
        out = memory.weight((panel_count(p.rows, p.nr), w.shape[1], p.nr), w.dtype)   # host: packed in place
        t = pack_panels(w, p.rows, p.nr, out=out)
        packed[name] = t if out is not None else memory.to_device(t, copy=False)


class CompiledPlan:
    def __init__(self, plan: Plan, lib, weights: Mapping[str, torch.Tensor], threads: Optional[int] = None,
                 graphs: Optional[list[str]] = None, comm: Optional[Comm] = None, offload=None):
        """``graphs``: the ones this process runs (a pipeline stage's), bound and given weights;
        default all. ``comm``: whom the plan's collective steps talk to (a rank's groups).
        ``offload``: a runtime.offload.WeightStream holding every weight the kernels read
        (resident, streamed into its slots, or mapped), whose steps join each program."""
        if plan.version != PLAN_VERSION:
            raise ArtifactError(f"the artifact's plan is version {plan.version}, this ffc runs version "
                                f"{PLAN_VERSION}; recompile the artifact")
        self.plan = plan
        self.lib = lib
        self.comm = comm
        self.device = torch.device("cuda" if plan.target is Target.CUDA else "cpu")
        self.graphs: dict[str, GraphPlan] = {g: plan.graphs[g] for g in (graphs or plan.graphs)}
        names = set(lib.kernel_names())
        missing = sorted(names - set(plan.kernels)) + sorted(set(plan.kernels) - names)
        if missing:
            raise ArtifactError(f"the kernel library does not match the plan (kernels {missing[:4]}); "
                                "rebuild it with `ffc build ARTIFACT`")
        ordinal = 0
        if self.device.type == "cuda":
            ordinal = torch.cuda.current_device() if torch.cuda.is_available() else 0   # a rank's GPU
            why = lib.device_check(ordinal)
            if why:
                raise ArtifactError(f"the plan is for CUDA, but this process cannot run it: {why}; load it with "
                                    "backend='interpreter' or compile with --target cpu")
            collectives = any(st.kernel is None for gp in self.graphs.values() for st in gp.steps)
            if collectives and not torch.cuda.is_available():
                raise ArtifactError(f"the plan's collective steps (tensor/pipeline parallel) on CUDA go through NCCL, "
                                    f"which needs a CUDA build of torch (this is {torch.__version__}); compile with "
                                    "--tp 1 --pp 1 to run on one GPU")
        self.exe = lib.Executor(int(threads or torch.get_num_threads()), ordinal)
        self.memory = OwnMemory(self.exe, self.device) if self.device.type == "cuda" or knobs.own_memory() else HOST
        args = [a for gp in self.graphs.values() for st in gp.steps for a in st.args]
        self.offload = offload
        owned = offload.tensors if offload is not None else {}
        self.weights = {a.name: owned[a.name] if a.name in owned else self.memory.to_device(weights[a.name])
                        for a in args if a.kind is ArgKind.PARAM}
        self.packed = {a.name: owned[a.name] for a in args if a.kind is ArgKind.PACKED and a.name in owned}
        _pack(plan, {a.name for a in args if a.kind is ArgKind.PACKED}, weights, self.packed, self.memory)
        self._arena = self.memory.empty((max(gp.arena_bytes for gp in self.graphs.values()) + 64,), torch.uint8)
        self.base = (self._arena.data_ptr() + 63) // 64 * 64
        self._bound_cache: Optional[tuple] = None
        self._where: dict[str, list] = {}     # per bound program: each step's index in its segment (None: streaming)
        self._host_cache: Optional[torch.Tensor] = None
        self._segments = {g: self.segments(g) for g in self.graphs}
        self._step_index = {g: {id(st): k for k, st in enumerate(gp.steps)} for g, gp in self.graphs.items()}

    @property
    def limits(self) -> dict[str, tuple[int, int]]:
        """Most tokens and rows one prefill / decode call takes (as ranks running kernels report)."""
        return limits(self.graphs)

    def _offset(self, gp: GraphPlan, name: str) -> int:
        """Byte offset of buffer ``name`` in the arena."""
        return self.base - self._arena.data_ptr() + gp.buffers[name].offset

    def _view(self, gp: GraphPlan, name: str, dtype, numel: int) -> torch.Tensor:
        """A torch view of arena memory (collective steps; executor memory needs a CUDA torch)."""
        off = self._offset(gp, name)
        return as_torch(self._arena)[off:off + numel * dtype.itemsize].view(dtype.torch)

    def arg_tensor(self, a: Arg) -> torch.Tensor:
        """The weight tensor a param or packed argument reads."""
        return self.packed[a.name] if a.kind is ArgKind.PACKED else self.weights[a.name]

    def _addr(self, gp: GraphPlan, a: Arg, cache: torch.Tensor) -> int:
        size = a.dtype.itemsize
        if a.kind is ArgKind.BUF:
            return self.base + gp.buffers[a.name].offset + a.offset * size
        if a.kind is ArgKind.CACHE:     # a layer's pool (on disk: the slot the offload streams it into)
            on_disk = self.offload.kv.address(a.offset) if self.offload and self.offload.kv else None
            return on_disk or cache.data_ptr() + a.offset * cache.stride(0) * cache.element_size()
        return self.arg_tensor(a).data_ptr() + a.offset * size

    def segments(self, graph: str) -> list[tuple[str, object]]:
        """The graph's steps as runs of kernels (one executor call each) and the collectives
        between them: [("kernels", (bound name, steps)) | ("collective", step), ...]."""
        out, run = [], []
        for st in self.graphs[graph].steps:
            if st.kernel is None:
                if run:
                    out.append(("kernels", (f"{graph}/{len(out)}", run)))
                    run = []
                out.append(("collective", st))
            else:
                run.append(st)
        if run:
            out.append(("kernels", (f"{graph}/{len(out)}", run)))
        return out

    def bind(self, cache: torch.Tensor) -> None:
        key = (cache.data_ptr(), tuple(cache.shape))
        if self._bound_cache == key:
            return
        if cache.numel() and not cache.is_contiguous():
            raise InvalidRequestError("the KV cache must be contiguous")
        if cache.numel() and (cache.device.type != self.device.type or
                              isinstance(cache, torch.Tensor) == self.memory.own):
            raise InvalidRequestError(f"the KV cache is {type(cache).__name__} on {cache.device}; the plan runs on "
                                      f"{type(self.memory).__name__} of {self.device}: allocate it with .memory.empty")
        if self.offload is not None and cache.dim() > 1:     # a KV cache (all of its layers may be on disk)
            self.offload.attach_kv(cache)
        for name, gp in self.graphs.items():
            for kind, seg in self.segments(name):
                if kind == "kernels":
                    bound, steps = seg
                    prog = [(st.kernel, [self._addr(gp, a, cache) for a in st.args]) for st in steps]
                    prog, self._where[bound] = (self.offload.program(name, steps, prog) if self.offload
                                                else (prog, list(range(len(prog)))))
                    self.exe.bind(bound, prog)
        self._bound_cache = key
        self._cache = cache  # keep it alive while bound

    def _collective(self, gp: GraphPlan, st: Step, env: dict) -> None:
        """A collective step on arena memory, with the op's reference (torch.distributed or the
        local ranks' shared memory, through ``comm``)."""
        spec = st.collective

        def view(a: Arg, shape, strides=None):
            shape = _env_of(env, shape)
            if strides is None:
                t = self._view(gp, a.name, a.dtype, a.offset + math.prod(shape))
                return t[a.offset:].view(shape)
            st_ = _env_of(env, strides)
            extent = a.offset + sum((d - 1) * s for d, s in zip(shape, st_)) + 1
            base = as_torch(self.arg_tensor(a)).reshape(-1) if a.kind is ArgKind.PARAM else \
                self._view(gp, a.name, a.dtype, extent)
            return base.as_strided(shape, st_, base.storage_offset() + a.offset)
        y = view(st.args[0], spec.out_shape)
        if spec.op in (Op.SEND, Op.RECV):   # the neighbouring stage's rank, arena to arena
            world = self.comm.world if self.comm is not None else None
            if world is None:
                raise InvalidRequestError("send/recv between pipeline stages need the artifact's ranks")
            peer = world.get_rank() + spec.peer
            if spec.op is Op.RECV:
                world.recv(y, peer)
            else:
                y.copy_(view(st.args[1], spec.in_shape, spec.in_strides))
                world.send(y, peer)
        else:
            x = view(st.args[1], spec.in_shape, spec.in_strides)
            attrs = {"ranks": spec.ranks} if spec.dim is None else {"dim": spec.dim, "ranks": spec.ranks}
            y.copy_(REGISTRY[spec.op].ref(x, **attrs, comm=self.comm))
        self._sync()       # the executor's stream reads y next

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def run(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: bool = True,
            events: Optional[list] = None, pid: int = 0) -> list[torch.Tensor]:
        """The graph's outputs, copied to the host (``outputs=False``: none; a pipeline stage that
        sends its activations on). With ``events`` (a list) the run is traced: Chrome trace events
        (microseconds on the monotonic clock) go there, every kernel step on every executor thread
        (the executor's trace entry point; its plain run takes no timestamps), every collective or
        send/recv on thread 0, which runs them; ``pid``: this process's track."""
        gp = self.graphs[graph]
        env = self._stage(graph, inputs)
        if self.offload is not None:
            self.offload.stage(inputs)

        def event(st, tid, t0, t1, name, cat):
            events.append({"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": t0 / 1e3,
                           "dur": (t1 - t0) / 1e3, "args": {"graph": graph, "step": self._step_index[graph][id(st)],
                                                             "origin": st.origin}})
        for kind, seg in self._segments[graph]:
            if kind == "kernels" and events is None:
                self.exe.run(seg[0], env["T"], env["N"], env["S"])
            elif kind == "kernels":
                for i, tid, t0, t1 in self.exe.trace(seg[0], env["T"], env["N"], env["S"]):
                    k = self._where[seg[0]][i]
                    if k is not None:
                        event(seg[1][k], tid, t0, t1, seg[1][k].kernel, seg[1][k].family.value)
                    elif tid == 0:      # a weight-streaming step: waiting for a read shows here
                        events.append({"name": "weight stream", "cat": "stream", "ph": "X", "pid": pid, "tid": 0,
                                       "ts": t0 / 1e3, "dur": (t1 - t0) / 1e3, "args": {"graph": graph}})
            elif events is None:
                self._collective(gp, seg, env)
            else:
                t0 = time.monotonic_ns()
                self._collective(gp, seg, env)
                event(seg, 0, t0, time.monotonic_ns(), seg.collective.op.value, "collective")
        self._write_back()
        if self.offload is not None:
            self.offload.trim()
        return [read(self._arena, self._offset(gp, o.buffer), o.dtype.torch, _env_of(env, o.shape))
                for o in (gp.outputs if outputs else ())]

    def _write_back(self) -> None:
        """A host KV cache given to a plan on its own memory gets what the step wrote."""
        if self._host_cache is not None:
            self._host_cache.copy_(self._cache.cpu())
            self._host_cache = None

    def dims(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> dict:
        """T, N, S read off the inputs' shapes (checked against the plan), and the cache bound."""
        gp = self.graphs[graph]
        env = {"T": 1, "N": 1, "S": 1}
        cache = None
        for name, spec in gp.inputs.items():
            if name not in inputs:
                raise InvalidRequestError(f"graph {graph} needs input {name!r}")
            t = inputs[name]
            if spec.buffer is None:
                cache = t
                env["S"] = int(t.shape[2])
                continue
            if t.dtype != spec.dtype.torch or t.dim() != len(spec.shape):
                raise InvalidRequestError(f"input {name} must be {spec.dtype} of rank {len(spec.shape)}")
            for d, size in zip(spec.shape, t.shape):
                if d.op is X.VAR and d.arg in env:
                    env[d.arg] = int(size)
        if env["T"] > gp.max_tokens or env["N"] > gp.max_rows:
            raise InvalidRequestError(f"{graph} step of {env['T']} tokens / {env['N']} rows exceeds the plan's "
                                      f"{gp.max_tokens} / {gp.max_rows}; split the batch")
        if cache is not None and self.memory.own and isinstance(cache, torch.Tensor) and cache.numel():
            self._host_cache = cache           # a host cache (debug, bench): run on a copy, copied back
            cache = self.memory.to_device(cache)
        self.bind(cache if cache is not None else torch.zeros(0))
        return env

    def _stage(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> dict:
        """Copy the inputs into their arena buffers (later kernels may reuse that memory)."""
        gp = self.graphs[graph]
        env = self.dims(graph, inputs)
        for name, spec in gp.inputs.items():
            if spec.buffer is not None:
                write(self._arena, self._offset(gp, spec.buffer), inputs[name].to(spec.dtype.torch))
        return env

    def profile(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> list[float]:
        """Seconds of each step of ``graph`` for these inputs (kernels timed between barriers,
        collectives by wall clock)."""
        self.run(graph, inputs)
        env = self._stage(graph, inputs)
        out: list[float] = []
        for kind, seg in self._segments[graph]:
            if kind == "kernels":
                times = self.exe.profile(seg[0], env["T"], env["N"], env["S"])
                out += [t for t, k in zip(times, self._where[seg[0]]) if k is not None]
            else:
                t0 = time.perf_counter()
                self._collective(self.graphs[graph], seg, env)
                out.append(time.perf_counter() - t0)
        self._write_back()
        return out


def open_compiled(artifact: Artifact, weights, library, threads: Optional[int] = None,
                  graphs: Optional[list[str]] = None, comm: Optional[Comm] = None, offload=None) -> CompiledPlan:
    """The artifact's plan bound to the kernel library at ``library`` (which the loader chose:
    the shipped one, or one rebuilt for this machine); ``offload``: an OffloadPolicy (its
    weights are then read from the artifact's offload store, not from ``weights``)."""
    try:
        lib = load_library(library)
        stream = None if offload is None else WeightStream(artifact, artifact.plan, artifact.read_module(verify=False),
                                                           offload, lib)
        return CompiledPlan(artifact.plan, lib, weights, threads, graphs, comm, stream)
    except ArtifactError as e:
        raise ArtifactError(f"{artifact.root}: {e}") from None
