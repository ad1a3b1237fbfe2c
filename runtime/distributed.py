"""Tensor-parallel ranks: local worker processes that run a sharded artifact in lockstep.

The driver (the process that called ``ffc.load``) keeps the engine: scheduler, block tables,
sampling. Each step it sends the step's inputs to every rank; every rank runs the same
graph on its own weights (weights/rank{r}.safetensors) and its own slice of the KV pool,
the collectives in the graph meeting over torch.distributed (gloo); rank 0 sends back the
logits. A rank that raises or dies ends every rank and the caller gets one error naming it,
within seconds: the driver watches the processes while it waits, collectives time out, and
workers die with their parent (PR_SET_PDEATHSIG), so nothing hangs and nothing is orphaned.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ffc
from ffc.artifact import Artifact
from ffc.errors import ArtifactError, FfcError, InvalidRequestError
from ffc.ir import Comm, run_graph
from ffc.ir.graph import stage_graph
from ffc.util import free_port

from . import shm_collectives
from .compiled import open_compiled
from .device_memory import HOST, copy_kv_slots

COLLECTIVE_TIMEOUT_S = 20     # a collective whose peer is gone fails after this long
START_TIMEOUT_S = 120
STEP_TIMEOUT_FLOOR_S = 60     # a step's deadline: 50x its predicted time, never less than this


class RankError(FfcError):
    """A worker rank failed; the message names it. All ranks have been stopped."""


def _reap(procs: list, seconds: float) -> None:
    for p in procs:
        try:
            p.wait(seconds)
        except subprocess.TimeoutExpired:
            pass


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TorchGroup:
    """A torch.distributed (sub)group as the collectives of ir.ops see a group."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.size

    def all_reduce(self, t) -> None:
        dist.all_reduce(t, group=self.group)

    def all_gather(self, parts, t) -> None:
        dist.all_gather(parts, t, group=self.group)


class _Shard:
    """What one rank holds: the graphs, its weights, its slice of the KV pool, and whom its
    collectives talk to; it answers the driver's messages ("pool", n), ("run", graph, arrays) and
    ("copy_slots", blocks, moves): a verified tree's accepted K/V to their positions."""

    def __init__(self, art: Artifact, rank: int, backend: Optional[str] = None, threads: int = 1,
                 library: Optional[str] = None, shm: Optional[str] = None):
        self.rank = rank
        self.module = art.read_module(verify=False)    # the driver verified it (ffc.load)
        self.weights = load_file(str(art.path(f"weights/rank{rank}.safetensors")))
        self.tp, self.pp = art.tp, art.pp
        # rank = stage * tp + tp rank; stage s runs graphs "<graph>_stage<s>", receives its input
        # from the same tp rank of stage s-1 and sends to that of stage s+1
        self.stage, self.tp_rank = divmod(rank, self.tp)
        group = None
        if self.tp > 1 and self.pp > 1:
            groups = [dist.new_group(list(range(s * self.tp, (s + 1) * self.tp))) for s in range(self.pp)]
            group = TorchGroup(groups[self.stage], self.tp_rank, self.tp)
        elif self.tp > 1:
            group = TorchGroup(None, self.tp_rank, self.tp)
        if shm and self.tp > 1:    # this stage's tp ranks meet in their shared segment; gloo for the rest
            group = shm_collectives.SharedMemoryGroup(shm_collectives.segment_name(shm, self.stage), self.tp_rank,
                                                      self.tp, group)
        self.comm = Comm(group, dist)
        self.cache_type = self.module.graphs[self.graph("prefill")].input("kv_cache").type
        self.cache = None
        self.compiled = None
        self.memory = HOST
        if backend != "interpreter" and art.kernels and library:   # the same kernels on every rank
            graphs = [self.graph(g) for g in ("prefill", "decode", "verify") if self.graph(g) in self.module.graphs]
            self.compiled = open_compiled(art, self.weights, library, threads, graphs, self.comm)
            self.weights = self.compiled.weights   # packed originals are freed
            self.memory = self.compiled.memory

    def handle(self, msg: tuple):
        if msg[0] == "pool":
            self.cache = None
            self.cache = self.memory.empty(self.cache_type.concrete({"S": msg[1]}), self.cache_type.torch_dtype)
            return None
        if msg[0] == "copy_slots":
            copy_kv_slots(self.cache, msg[1], msg[2])
            return None
        kind, graph, arrays = msg
        inputs = dict({k: torch.from_numpy(v) for k, v in arrays.items()}, kv_cache=self.cache)
        # a pipeline stage's graph receives from the previous stage and sends to the next itself
        events = [] if kind == "trace" else None     # the same step, with its timeline (pid = this rank)
        if events is not None and self.compiled is None:
            raise InvalidRequestError("a trace times the artifact's kernels; the interpreter backend has none")
        if self.compiled is not None:
            outs = self.compiled.run(self.graph(graph), inputs, outputs=self.stage == self.pp - 1, events=events,
                                     pid=self.rank)
        else:
            outs = run_graph(self.module.graphs[self.graph(graph)], self.weights, inputs, comm=self.comm)
        last = outs[0][0].numpy() if self.stage == self.pp - 1 and self.tp_rank == 0 else None   # the last stage's
        return last if events is None else (last, events)                                       # first tp rank

    def graph(self, name: str) -> str:
        return stage_graph(name, self.stage) if self.pp > 1 else name


def collective_backend(art: Artifact, backend: Optional[str], local_rank: int = 0) -> str:
    """gloo between CPU ranks; NCCL when the ranks run CUDA kernels (then this process takes
    GPU ``local_rank`` modulo the GPUs it sees)."""
    if backend == "interpreter" or art.target != "cuda":
        return "gloo"
    if not torch.cuda.is_available():   # a single GPU needs only the driver; NCCL comes with a CUDA torch
        raise ArtifactError(f"{art.root} runs CUDA kernels on {art.tp * art.pp} ranks, whose collectives go "
                            f"through NCCL, which needs a CUDA build of torch (this is {torch.__version__}); "
                            "compile with --tp 1 --pp 1 for one GPU, or load it with backend='interpreter'")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return "nccl"


def _worker(root: str, rank: int, world: int, port: int, threads: int, conn,
            backend: Optional[str] = None, shm: Optional[str] = None, library: Optional[str] = None) -> None:
    """One rank started by ``ffc.load``: take the manifest from the driver, join the group, then
    run steps until told to stop."""
    _die_with_parent()
    try:
        torch.set_num_threads(threads)
        msg = conn.recv()      # ("artifact", manifest): parsed and checked by the driver
        art = Artifact(root, msg[1])
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(collective_backend(art, backend, rank), rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        shard = _Shard(art, rank, backend, threads, library, shm)
        conn.send(("ready", rank))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            conn.send(("ok", shard.handle(msg)))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException as e:  # noqa: BLE001 - reported to the driver, then this rank exits
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
        except (OSError, EOFError):
            pass
        os._exit(1)
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _arrays(inputs: dict) -> dict:
    """A step's inputs as sent to the ranks: numpy arrays (torch's pickler would share tensors
    through a resource server), without the KV pool (every rank holds its own slice)."""
    return {k: v.contiguous().numpy() for k, v in inputs.items() if k != "kv_cache"}


def _plan_limits(art: Artifact, backend: Optional[str]) -> Optional[dict]:
    """Tokens and rows per call of the plan the ranks run (None: they run the interpreter)."""
    if backend == "interpreter" or not art.kernels:
        return None
    return art.plan.limits()


def step_timeout(manifest: dict) -> float:
    """Seconds a step's reply may take: 50x the longest step the cost model predicted (the
    manifest is checked data but its numbers are not trusted: a floor of 60 s, at most an hour)."""
    pred = (manifest.get("parallel") or {}).get("predicted") or {}
    try:
        longest = max(float(pred.get("prefill_s", 0) or 0), float(pred.get("decode_s", 0) or 0))
    except (TypeError, ValueError):
        longest = 0.0
    if not longest >= 0:        # NaN
        longest = 0.0
    return min(3600.0, max(STEP_TIMEOUT_FLOOR_S, 50 * longest))


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (state T or t in /proc; False where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class RankGroup:
    """``world`` local worker processes for one artifact (``python -m ffc.runtime.distributed``,
    each talking to this process over its own socket pair: no re-import of the caller's script)."""

    def __init__(self, art: Artifact, world: int, threads: Optional[int] = None,
                 backend: Optional[str] = None, stages: int = 1, library: Optional[Path] = None,
                 wait: bool = True):
        """Starts the ranks; with ``wait`` False the caller does other work while they start
        (import torch, join the group, bind the plan) and then calls ``ready``."""
        self.world, self.stages = world, stages
        self.limits = _plan_limits(art, backend)
        self.step_timeout = step_timeout(art.manifest)
        port = free_port()
        threads = threads or max(1, (os.cpu_count() or world) // world)
        self.procs, self.conns, self._segments = [], [], []
        tp = world // stages
        shm = None     # CPU ranks on this machine: collectives through shared memory
        kind = collective_backend(art, backend)    # refused here, before a rank starts, if it cannot run
        if tp > 1 and shm_collectives.available() and kind == "gloo":
            shm = f"ffc{os.getpid()}_{port}"
            self._segments = [shm_collectives.create_segment(shm_collectives.segment_name(shm, s), tp)
                              for s in range(stages)]
        for r in range(world):
            parent, child = Pipe()
            fd = child.fileno()
            p = subprocess.Popen([sys.executable, "-m", "ffc.runtime.distributed", "--fd", str(fd),
                                  "--root", str(art.root), "--rank", str(r), "--world", str(world),
                                  "--port", str(port), "--threads", str(threads), "--backend", backend or "auto"] +
                                 (["--shm", shm] if shm else []) + (["--library", str(library)] if library else []),
                                 pass_fds=(fd,))
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._send_all(("artifact", art.manifest))
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until every rank has joined the group and bound its plan."""
        self._gather(START_TIMEOUT_S, "starting")

    def _gather(self, timeout: Optional[float], what: str) -> list:
        """One reply per rank; a rank that errors or dies stops all of them."""
        replies: list = [None] * self.world
        pending = set(range(self.world))
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic() + 1.0
        while pending:
            for r in sorted(pending):
                conn, proc = self.conns[r], self.procs[r]
                try:
                    ready = conn.poll(0.05)
                except (OSError, EOFError):
                    ready = False
                if ready:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        self._fail(f"rank {r} closed its connection while {what} (exit code {proc.poll()})")
                    if msg[0] == "error":
                        self._fail(self._cause(r, msg[1], what))
                    replies[r] = msg[1]
                    pending.discard(r)
                elif proc.poll() is not None:
                    self._fail(f"rank {r} died while {what} (exit code {proc.returncode}); all ranks stopped")
            now = time.monotonic()
            if pending and now >= next_check:      # a stopped process (SIGSTOP, a debugger) is alive but never answers
                next_check = now + 1.0
                stopped = [r for r in sorted(pending) if _stopped(self.procs[r].pid)]
                if stopped:
                    self._fail(f"rank {stopped[0]} is stopped (SIGSTOP or a debugger) while {what}; all ranks "
                               "stopped")
            if pending and deadline is not None and now > deadline:
                self._fail(f"rank {sorted(pending)[0]} did not answer within {timeout:.3g} s while {what} (hung; "
                           f"ranks {sorted(pending)} pending); all ranks stopped")
        return replies

    def _cause(self, r: int, error: str, what: str) -> str:
        """The root cause: a rank that died makes its peers' collectives fail, so name the dead
        one first (waiting a moment for the OS to report it)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            dead = [(k, p.poll()) for k, p in enumerate(self.procs) if k != r and p.poll() is not None]
            if dead:
                k, code = dead[0]
                return (f"rank {k} died while {what} (exit code {code}); all ranks stopped "
                        f"(rank {r} then failed: {error.splitlines()[0][:200]})")
            time.sleep(0.05)
        return f"rank {r} failed while {what}: {error}"

    def _fail(self, message: str):
        self.close(force=True)
        raise RankError(message)

    def _send_all(self, msg: tuple) -> None:
        if not self.procs:
            raise RankError("the ranks have been stopped; load the artifact again")
        for r, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except (OSError, BrokenPipeError):
                self._fail(f"rank {r} is gone (exit code {self.procs[r].poll()}); all ranks stopped")

    def call(self, msg: tuple, what: str) -> list:
        self._send_all(msg)
        return self._gather(self.step_timeout, what)

    def run(self, graph: str, inputs: dict) -> torch.Tensor:
        return self.run_many(graph, [inputs])[0]

    def run_many(self, graph: str, batches: list) -> list:
        """Several steps sent before any answer is awaited: pipeline stages overlap them."""
        for inputs in batches:
            self._send_all(("run", graph, _arrays(inputs)))
        outs = []
        for _ in batches:
            replies = self._gather(self.step_timeout, f"running a {graph} step")
            outs.append(torch.from_numpy(next(r for r in replies if r is not None)))  # tp rank 0 of the last stage
        return outs

    def trace(self, graph: str, inputs: dict) -> tuple[torch.Tensor, list[dict]]:
        """One step, as run(), and every rank's timeline (Chrome trace events, pid = rank)."""
        replies = self.call(("trace", graph, _arrays(inputs)), f"tracing a {graph} step")
        out = next(r[0] for r in replies if r[0] is not None)
        return torch.from_numpy(out), [e for r in replies for e in r[1]]

    def allocate_pool(self, num_blocks: int) -> None:
        self.call(("pool", num_blocks), "allocating the KV pool")

    def copy_slots(self, blocks: list, moves: list) -> None:
        self.call(("copy_slots", blocks, moves), "moving accepted K/V")

    def close(self, force: bool = False) -> None:
        procs, conns = self.procs, self.conns
        self.procs, self.conns = [], []
        if not force:
            for c in conns:
                try:
                    c.send(("stop",))
                except (OSError, BrokenPipeError):
                    pass
            _reap(procs, 5)
        for p in procs:
            if p.poll() is None:
                p.kill()
        _reap(procs, 5)
        for c in conns:
            c.close()
        segments, self._segments = getattr(self, "_segments", []), []
        for s in segments:
            shm_collectives.remove_segment(s)

    def __del__(self):
        try:
            self.close(force=True)
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- torchrun
def torchrun_env() -> Optional[tuple[int, int]]:
    """(rank, world size) when this process was started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                  and "MASTER_ADDR" in os.environ):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def join_torchrun_group(art: Artifact, backend: Optional[str] = None) -> tuple[int, int]:
    if not dist.is_initialized():
        kind = collective_backend(art, backend, int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(kind, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


class TorchrunRanks:
    """Ranks started by torchrun (one per process, on any machines): this process is rank 0, the
    driver, and holds shard 0 itself; every step's message reaches the others by a broadcast
    over the same group the graph's collectives use."""

    def __init__(self, art: Artifact, world: int, backend: Optional[str] = None, library: Optional[Path] = None):
        self.stages = 1   # steps go one at a time through the broadcast
        if dist.get_world_size() != world or dist.get_rank() != 0:
            raise RankError(f"the artifact has tp={world}, but torchrun started {dist.get_world_size()} processes "
                            f"(this is rank {dist.get_rank()}); use --nnodes x --nproc-per-node = {world}")
        self.world = world
        self.limits = _plan_limits(art, backend)
        self.procs: list = []
        self.shard = _Shard(art, 0, backend, torch.get_num_threads(), library)
        self._open = True
        atexit.register(self.close)

    def _send(self, msg: tuple):
        box = [msg]
        try:
            dist.broadcast_object_list(box, src=0)
            return self.shard.handle(msg) if msg[0] != "stop" else None
        except RuntimeError as e:
            raise RankError(f"a torchrun rank failed ({str(e).splitlines()[0][:200]}); torchrun stops the others")

    def run(self, graph: str, inputs: dict) -> torch.Tensor:
        return torch.from_numpy(self._send(("run", graph, _arrays(inputs))))

    def trace(self, graph: str, inputs: dict) -> tuple[torch.Tensor, list[dict]]:
        """One step and this process's timeline (rank 0's track: the other ranks' stay on their hosts)."""
        out, events = self._send(("trace", graph, _arrays(inputs)))
        return torch.from_numpy(out), events

    def allocate_pool(self, num_blocks: int) -> None:
        self._send(("pool", num_blocks))

    def copy_slots(self, blocks: list, moves: list) -> None:
        self._send(("copy_slots", blocks, moves))

    def close(self, force: bool = False) -> None:
        if self._open and dist.is_initialized():
            self._open = False
            self._send(("stop",))


def follow_torchrun(art: Artifact, backend: Optional[str] = None, library: Optional[Path] = None) -> None:
    """Ranks > 0 under torchrun: hold a shard and answer rank 0's broadcasts until it stops."""
    shard = _Shard(art, dist.get_rank(), backend, torch.get_num_threads(), library)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "stop":
            break
        shard.handle(box[0])
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="a rank of a tensor-parallel ffc artifact: started by ffc.load "
                                             "(--fd ...), or under torchrun with --generate ARTIFACT")
    ap.add_argument("--fd", type=int, help="the socket to the driver (ffc.load passes it)")
    ap.add_argument("--shm", help="base name of the shared-memory segments for collectives")
    ap.add_argument("--root", help="the artifact directory")
    ap.add_argument("--library", help="the kernel library to load (the driver chose one that loads here)")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto", choices=["auto", "compiled", "interpreter"])
    ap.add_argument("--generate", metavar="ARTIFACT", help="under torchrun: greedy tokens for --token-ids, "
                                                           "printed by rank 0 as a JSON list")
    ap.add_argument("--token-ids", default="")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    if a.generate:
        llm = ffc.load(a.generate)          # ranks > 0 serve rank 0 inside load, then exit
        try:
            ids = [int(t) for t in a.token_ids.split(",") if t]
            print(json.dumps(llm.generate([ids], a.max_new_tokens, ignore_eos=True).token_ids[0]), flush=True)
        finally:
            llm.close()
        return
    _worker(a.root, a.rank, a.world, a.port, a.threads, Connection(a.fd),
            None if a.backend == "auto" else a.backend, a.shm, a.library)
    # the group is left and nothing is buffered: skip the interpreter's teardown of torch (a few
    # tenths of a second the driver's close would wait for, every load)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
