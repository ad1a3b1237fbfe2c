"""The paged KV cache: one preallocated pool of fixed-size blocks, handed out to requests.

The pool tensor is the graphs' ``kv_cache`` input, [L, 2, S, Hkv, BS, D]: S blocks of BS
positions for every layer's K and V. A request owns a list of block ids (its block table
row); position p of the request lives in block ``blocks[p // BS]`` at offset ``p % BS``.
Blocks need no clearing: a token attends only to positions its own request has written.

Prefix caching: a block whose positions are all written holds K/V that depend only on the
tokens up to its end, so it is indexed by a key chained over those tokens. A later request
whose prompt starts with the same tokens takes the block (a reference count) instead of
recomputing it. Full blocks are never written again, so sharing them is safe. A cached block
nobody references stays in the index until its memory is needed (least recently freed first).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

from ffc.errors import InvalidRequestError
from ffc.ir.types import TensorType

from .device_memory import HOST
from .kv_stream import ram_layers

DEFAULT_MEMORY_FRACTION = 0.2  # of the memory available when no budget is given


class BlockPool:
    """S blocks of one cache tensor: a free list, reference counts, and the prefix index."""

    def __init__(self, cache_type: TensorType, blocks_per_seq: int, num_blocks: int, memory=HOST,
                 prefix_caching: bool = True, disk_layers: int = 0):
        """``memory``: where the pool lives (a plan's ``.memory``; ``device_memory``); None:
        bookkeeping only (the ranks of a tensor-parallel artifact hold the tensors).
        ``disk_layers``: the last layers' K/V are on disk (runtime/kv_stream.py), the tensor holds
        the others'."""
        self.layers, _, _, self.kv_heads, self.block_size, self.head_dim = cache_type.shape
        self.blocks_per_seq = blocks_per_seq         # block-table columns: ceil(max_seq_len / BS)
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.disk_layers = disk_layers
        shape = cache_type.concrete({"S": num_blocks})
        self.tensor = None if memory is None else memory.empty((shape[0] - disk_layers, *shape[1:]),
                                                               cache_type.torch_dtype)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._index: dict[int, int] = {}             # prefix key -> block holding it
        self._key_of: dict[int, int] = {}            # block -> its prefix key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, oldest first
        self.hit_tokens = 0                          # prompt tokens served from the prefix cache

    @staticmethod
    def bytes_per_block(cache_type: TensorType, disk_layers: int = 0) -> int:
        """RAM per block: every layer's K/V, or with the last ``disk_layers`` on disk the others'
        and the two layer slots those are read into."""
        per = math.prod(cache_type.concrete({"S": 1})) * torch.empty((), dtype=cache_type.torch_dtype).element_size()
        layers = int(cache_type.shape[0])
        return per * ram_layers(layers, disk_layers) // layers

    @classmethod
    def for_budget(cls, cache_type: TensorType, blocks_per_seq: int, budget: Optional[int],
                   want_blocks: int, memory=HOST, prefix_caching: bool = True, disk_layers: int = 0) -> "BlockPool":
        """A pool within ``budget`` bytes (default: a fraction of available memory), no larger
        than ``want_blocks``, and at least one full-length sequence."""
        per = cls.bytes_per_block(cache_type, disk_layers)
        if budget is None:
            n = min(want_blocks, int(DEFAULT_MEMORY_FRACTION * (memory or HOST).available()) // per)
            n = max(n, blocks_per_seq)
        else:
            n = budget // per
            if n < blocks_per_seq:
                raise InvalidRequestError(
                    f"kv_cache_memory of {budget / 2**20:.1f} MiB holds {n} blocks of {per / 2**20:.2f} MiB, but one "
                    f"sequence of max_seq_len needs {blocks_per_seq}; give at least "
                    f"{blocks_per_seq * per / 2**20:.0f} MiB")
        return cls(cache_type, blocks_per_seq, int(n), memory, prefix_caching, disk_layers)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: never used, or cached with no reference."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, n: int) -> Optional[list[int]]:
        """``n`` blocks, or None (and nothing taken) when fewer are free. Cached blocks with no
        reference are reused (and dropped from the index) only when no plain free block is left."""
        if n > self.free_blocks:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._index[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block (most recently allocated last in, first reused)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    # ------------------------------------------------------------ prefix cache
    def keys(self, tokens: list[int], have: list[int], full_blocks: int) -> list[int]:
        """Chained keys of the first ``full_blocks`` blocks of ``tokens``, extending ``have``."""
        bs = self.block_size
        for i in range(len(have), full_blocks):
            have.append(hash((have[-1] if have else None, tuple(tokens[i * bs:(i + 1) * bs]))))
        return have[:full_blocks]

    def match(self, keys: list[int]) -> list[int]:
        """Blocks holding the longest indexed prefix of ``keys`` (no reference taken)."""
        out = []
        if self.prefix_caching:
            for k in keys:
                b = self._index.get(k)
                if b is None:
                    break
                out.append(b)
        return out

    def idle_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self._refs[b] == 0)

    def acquire(self, blocks: list[int]) -> list[int]:
        """Take a reference to each (matched) block."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
        self.hit_tokens += len(blocks) * self.block_size
        return list(blocks)

    def register(self, blocks: list[int], keys: list[int]) -> None:
        """Index full blocks under their prefix keys (a key already indexed keeps its block)."""
        if not self.prefix_caching:
            return
        for b, k in zip(blocks, keys):
            if k not in self._index and b not in self._key_of:
                self._index[k] = b
                self._key_of[b] = k
