"""The KV cache of the last layers on disk: an offload policy's ``kv_disk`` (FlexGen's KV
fraction on the slower tier), so that a batch whose KV cache does not fit in RAM beside the
weights can run (every step reads the streamed weights once for the whole batch).

The RAM pool (runtime/kv_cache.py) then holds the first layers only; each of the last
``kv_disk`` layers' pools, [2, S, Hkv, BS, R] as the kernels address it, lives in a file of its
own region and is read into one of two layer-sized slots the attention kernels of that layer
are bound to. Before every run the blocks its sequences read (each row's blocks up to its last
position) and those it writes (the blocks of its tokens' positions) become whole-page byte
ranges of a layer's region, the same for every layer; the kernel library's Streamer
(csrc/ffc_stream.h) reads a disk layer's read ranges into its slot while earlier layers compute,
and once its attention step is done writes the write ranges back before that slot is read into
again. Pages rather than blocks: O_DIRECT needs page-aligned offsets and sizes, and a page
shared with a neighbouring block holds that block's bytes as they were read in this run (a
written page is always inside the read ones), so writing it back loses nothing.

The file is made in ``$FFC_CACHE_DIR/offload/kv/`` with its whole size allocated (a disk that
cannot hold it is an error at load, not mid-generation) and is unlinked as soon as the reader has
it open: nothing is left behind by a process that is killed; a file left by one killed between
the two is removed by the next load.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Mapping, Optional

import torch

from ffc import knobs
from ffc.errors import InvalidRequestError

from .device_memory import host_buffer

ALIGN = 4096            # O_DIRECT: offsets, sizes and buffers aligned to the logical block
SLOTS = 2               # disk layers' pools alternate between this many slots in RAM


def ram_layers(layers: int, disk: int) -> int:
    """Layers' worth of a KV pool RAM holds with the last ``disk`` of ``layers`` on disk: the
    others', and the slots the disk layers' are read into (the policy prices it, the pool
    allocates it)."""
    return layers - disk + min(disk, SLOTS)


def aligned(nbytes: int) -> tuple[torch.Tensor, int]:
    """A buffer of at least ``nbytes`` and the offset in it of an ALIGN-aligned start (from
    2 MiB on, in huge pages: ``host_buffer``)."""
    buf = host_buffer(nbytes + ALIGN)
    return buf, (-buf.data_ptr()) % ALIGN


def _remove_stale(folder: Path) -> None:
    """KV files of processes that are gone (killed between making and unlinking one)."""
    for f in folder.glob("kv-*.bin"):
        try:
            pid = int(f.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:
            pass                      # another user's, alive


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted unique block ids as runs [first, end)."""
    ids = torch.unique(ids)
    if not ids.numel():
        return []
    breaks = (torch.nonzero(ids[1:] - ids[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, len(ids)]
    vals = ids.tolist()
    return [(vals[a], vals[b - 1] + 1) for a, b in zip(starts, ends)]


class KVDisk:
    """The disk layers of one bound KV cache: their file, slots and the Streamer's units."""

    def __init__(self, streamer, cache: torch.Tensor, layers: int, disk: int):
        ram = int(cache.shape[0])
        if ram + disk != layers:
            raise InvalidRequestError(f"the KV cache holds {ram} layers in RAM; with {disk} on disk the model's "
                                      f"{layers} need {layers - disk}: allocate the pool with disk_layers={disk}")
        self.ram, self.disk = ram, disk
        self.blocks = int(cache.shape[2])
        self.block_size = int(cache.shape[4])
        self.layer_bytes = cache.stride(0) * cache.element_size()
        self.half = self.layer_bytes // 2                   # K, then V: S blocks each
        self.block_bytes = self.half // self.blocks
        self.region = -(-self.layer_bytes // ALIGN) * ALIGN
        self.slots = [aligned(self.region) for _ in range(min(disk, SLOTS))]
        self.key = (cache.data_ptr(), tuple(cache.shape))
        folder = knobs.cache_dir() / "offload" / "kv"
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        path = folder / f"kv-{os.getpid()}-{secrets.token_hex(4)}.bin"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.region * disk)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):     # a file system without it: sparse
                    os.ftruncate(fd, self.region * disk)
                else:
                    raise InvalidRequestError(f"the KV cache of {disk} layers on disk needs "
                                              f"{self.region * disk / 2**20:.0f} MiB in {folder} ({e.strerror}); free "
                                              "disk space there or give a larger memory budget") from None
            units = [(j * self.region, self.region, j % len(self.slots)) for j in range(disk)]
            self.first = streamer.attach_kv(str(path), units, [b.data_ptr() + lead for b, lead in self.slots])
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)     # the reader holds it open; nothing is left behind
        self.streamer = streamer

    def unit(self, layer: int) -> Optional[int]:
        """The Streamer's unit of a layer's KV cache (None: the layer's is in RAM)."""
        return self.first + layer - self.ram if self.ram <= layer < self.ram + self.disk else None

    def slot(self, layer: int) -> int:
        return (layer - self.ram) % len(self.slots)

    def address(self, layer: int) -> Optional[int]:
        """Where a disk layer's attention kernels find its pool (its slot)."""
        if self.unit(layer) is None:
            return None
        buf, lead = self.slots[self.slot(layer)]
        return buf.data_ptr() + lead

    def stage(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Tell the Streamer which pages of each disk layer the coming run reads and writes."""
        if "tree_mask" in inputs:
            raise InvalidRequestError("a token tree's K/V go to slots past the sequence and are moved after "
                                      "acceptance, which a KV cache on disk does not do: speculative decoding needs "
                                      "the whole KV cache in RAM (a larger memory budget, or none)")
        table = inputs["block_tables"]
        pos, rows = inputs["position_ids"].reshape(-1), inputs["seq_ids"].reshape(-1)
        last = torch.full((table.shape[0],), -1, dtype=torch.long).scatter_reduce(0, rows, pos, "amax")
        held = torch.arange(table.shape[1])[None, :] < ((last + self.block_size) // self.block_size)[:, None]
        ok = lambda ids: ids[(ids >= 0) & (ids < self.blocks)]      # noqa: E731 - the kernels skip others
        reads = self._pages(_runs(ok(table[held])))
        writes = self._pages(_runs(ok(table[rows, pos // self.block_size])))
        self.streamer.set_kv(reads, writes)

    def _pages(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Block runs as whole-page byte ranges of a layer's region, K's and V's, merged."""
        spans = []
        for base in (0, self.half):
            for a, b in runs:
                lo = (base + a * self.block_bytes) // ALIGN * ALIGN
                hi = min(-(-(base + b * self.block_bytes) // ALIGN) * ALIGN, self.region)
                if spans and lo <= spans[-1][1]:
                    spans[-1][1] = max(spans[-1][1], hi)
                else:
                    spans.append([lo, hi])
        return [(lo, hi - lo) for lo, hi in spans]
