"""All-reduce and all-gather between tensor-parallel ranks on one machine through shared memory.

gloo pays a few hundred microseconds per collective over loopback TCP; a decode step of a
tensor-parallel model makes one or two per layer, so on one machine that latency, not the
bytes, is the step. Here each rank copies its tensor into its own slot of one shared segment
and then publishes a sequence number in its own cache line; the others wait until every rank
published this call's number and read all slots (every rank sums in rank order, so all hold
the same bits, as gloo's ranks do). Two sets of slots alternate, so a rank one call ahead never
overwrites a slot another rank still reads. Tensors larger than a slot, other dtypes, and
device tensors go to the fallback group (gloo or NCCL). Needs x86's ordered stores (a slot is
written before its flag and read after it); other machines keep gloo.
"""
from __future__ import annotations

import os
import platform
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Optional

import torch

SLOT_BYTES = 16 << 20          # per rank and phase: a 2048-token prefill all-reduce of 576 floats is 4.7 MB
WAIT_TIMEOUT_S = 20.0           # a rank that never arrives: the others give up (the driver reports the dead one)
_LINE = 64                      # each rank's flag in its own cache line


def available() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def segment_bytes(world: int, slot_bytes: int = SLOT_BYTES) -> int:
    return _LINE * world + 2 * world * slot_bytes


class SharedMemoryGroup:
    """The collective interface ir.ops uses (get_rank, get_world_size, all_reduce, all_gather)
    over a shared segment; ``fallback`` (same interface) takes what does not fit."""

    def __init__(self, name: str, rank: int, world: int, fallback, slot_bytes: int = SLOT_BYTES,
                 creator_elsewhere: bool = True):
        self.shm = shared_memory.SharedMemory(name=name)
        if creator_elsewhere:   # the driver created it and unlinks it: this process's tracker must not
            try:
                resource_tracker.unregister(self.shm._name, "shared_memory")
            except Exception:  # noqa: BLE001 - tracker details vary across Python versions
                pass
        self.rank, self.world, self.fallback, self.slot = rank, world, fallback, slot_bytes // 4
        buf = self.shm.buf
        self.flags = torch.frombuffer(buf, dtype=torch.int64, count=world * _LINE // 8).view(world, _LINE // 8)
        self.slots = torch.frombuffer(buf, dtype=torch.float32, offset=_LINE * world,
                                      count=2 * world * self.slot).view(2, world, self.slot)
        self.seq = int(self.flags[rank, 0])

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world

    def _fits(self, t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() <= self.slot

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """Publish t; once every rank has, the slots of this call [world, n]."""
        self.seq += 1
        phase = self.slots[self.seq % 2]
        n = t.numel()
        phase[self.rank, :n].copy_(t.reshape(-1))
        self.flags[self.rank, 0] = self.seq
        flags, spins, deadline = self.flags[:, 0], 0, None
        while int(flags.min()) < self.seq:
            spins += 1
            if spins % 64 == 0:
                os.sched_yield()               # 2 cores, 3 processes: let the laggard run
                if deadline is None:
                    deadline = time.monotonic() + WAIT_TIMEOUT_S
                elif time.monotonic() > deadline:
                    late = [r for r in range(self.world) if int(flags[r]) < self.seq]
                    raise RuntimeError(f"shared-memory collective: ranks {late} of this group did not arrive "
                                       f"within {WAIT_TIMEOUT_S:.0f} s")
        return phase[:, :n]

    def all_reduce(self, t: torch.Tensor) -> None:
        if not self._fits(t):
            return self.fallback.all_reduce(t)
        parts = self._exchange(t)
        acc = parts[0].clone()
        for r in range(1, self.world):
            acc += parts[r]
        t.copy_(acc.view(t.shape))

    def all_gather(self, out: list, t: torch.Tensor) -> None:
        if not self._fits(t):
            return self.fallback.all_gather(out, t)
        parts = self._exchange(t)
        for r, o in enumerate(out):
            o.copy_(parts[r].view(t.shape))

    def close(self) -> None:
        self.flags = self.slots = None
        self.shm.close()


def create_segment(name: str, world: int):
    """The driver's side: one zeroed segment per tensor-parallel group (it unlinks it at close)."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=segment_bytes(world))
    shm.buf[:_LINE * world] = bytes(_LINE * world)
    return shm


def remove_segment(shm) -> None:
    """The driver's side at the end: unmap and unlink (idempotent)."""
    try:
        shm.close()
        shm.unlink()
    except (OSError, FileNotFoundError):
        pass


def segment_name(base: Optional[str], stage: int) -> Optional[str]:
    return None if base is None else f"{base}_s{stage}"
