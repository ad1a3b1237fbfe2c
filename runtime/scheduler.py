"""Requests and the step scheduler (in-flight batching over the paged KV cache).

Every step the scheduler first gives each running request, oldest first, its next chunk
(one token when decoding, the rest of its prompt up to the budget when prefilling), then
admits waiting requests in arrival order while the per-step token budget, the request
limit and free blocks last. Prefill chunks and decode tokens share the budget
(``max_tokens_per_batch``), so a long prompt never stalls the running decodes for more
than one budget's worth of tokens. When a running request needs a block and none is
free, the newest running request is preempted: its blocks are freed and it waits to be
recomputed (prompt plus what it generated so far) — never an out-of-memory crash.
A request admitted with a prompt whose leading blocks are in the prefix cache (kv_cache.py)
takes those blocks and starts computing after them.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ffc.errors import InvalidRequestError

from .kv_cache import BlockPool
from .speculative import Tree
from .sampling import SamplingParams

_ORDER = itertools.count()


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator] = None
    listener: Optional[Callable[["Request"], None]] = None   # called (engine thread) on new tokens and at the end
    arrival: float = field(default_factory=time.monotonic)
    order: int = field(default_factory=lambda: next(_ORDER))  # admission priority: lower is older
    out: list[int] = field(default_factory=list)
    text: str = ""
    decoded: Any = None                # its text's incremental decoder (detokenize.py; False: decoded whole)
    finish: Optional[str] = None       # "stop", "length", "abort" or "error"
    error: Optional[str] = None
    blocks: list[int] = field(default_factory=list)
    computed: int = 0                  # tokens whose K/V are in the cache
    keys: list[int] = field(default_factory=list)   # prefix-cache keys of its full blocks (kv_cache.py)
    registered: int = 0                # leading blocks indexed in the prefix cache
    released: int = 0                  # leading blocks freed behind every layer's sliding window
    preemptions: int = 0
    draft: Optional[str] = None        # speculative decoding: the draft that proposes its trees
    group: Optional[str] = None        # requests one caller waits for together (llm.generate's batch)
    acceptance: float = 0.5            # its draft's per-token acceptance, smoothed
    outlook: float = 0.0               # tokens its tree worth verifying adds beyond the first, smoothed over steps
    unspeculated: int = 0              # steps since it last speculated
    probe_gap: int = 16                # steps a turned-down request waits before probing its draft
    proposed: int = 0                  # draft tokens verified, and accepted (for /metrics)
    accepted: int = 0
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.out)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start .. start+n-1 of prompt + output (no copy of the whole sequence per step)."""
        p = len(self.prompt)
        return self.prompt[start:start + n] + self.out[max(start - p, 0):max(start + n - p, 0)]

    @property
    def finished(self) -> bool:
        return self.finish is not None


@dataclass(frozen=True)
class SchedulerConfig:
    max_tokens_per_batch: int = 256    # prefill and decode tokens per step
    max_requests_per_batch: int = 128  # sequences per step
    max_seq_len: int = 2048            # positions per sequence (prompt + generated)
    kv_window: Optional[int] = None    # every layer sees only the last this many positions: older blocks are freed

    def __post_init__(self):
        for name in ("max_tokens_per_batch", "max_requests_per_batch", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")
        if self.kv_window is not None and (isinstance(self.kv_window, bool) or not isinstance(self.kv_window, int)
                                           or self.kv_window < 1):
            raise InvalidRequestError(f"kv_window must be an integer >= 1 or None, got {self.kv_window!r}")


@dataclass(frozen=True)
class Scheduled:
    req: Request
    start: int
    n: int
    tree: Optional[Tree] = None        # a decoding request's token tree (n nodes from start)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        # set when a waiting request may have ended (an abort): the next retire looks through the
        # queue (else only the running ones: a queue of 20,000 prompts scanned every step was quadratic)
        self.queue_changed = False
        # admission leaves this many blocks free, so running requests can grow a step or two
        self.watermark = max(1, pool.num_blocks // 100)

    def add(self, req: Request) -> None:
        longest = min(len(req.prompt) + req.params.max_new_tokens, self.config.max_seq_len)
        need = self.pool.blocks_for(longest)
        if self.config.kv_window is not None:     # blocks behind the window are freed as it moves on
            need = min(need, self.pool.blocks_for(self.config.kv_window + self.config.max_tokens_per_batch) + 1)
        if need > self.pool.num_blocks:
            raise InvalidRequestError(
                f"request {req.id} may grow to {longest} tokens = {need} KV blocks at once, but the "
                f"pool has {self.pool.num_blocks}; lower max_tokens or give the KV cache more memory")
        self.waiting.append(req)

    def _release(self, req: Request) -> None:
        """Free the blocks no layer reads any more: with every layer's window W, a query at
        position p >= req.computed sees keys from p - W + 1 on."""
        window = self.config.kv_window
        if window is None:
            return
        behind = max(0, req.computed - window + 1) // self.pool.block_size
        if behind > req.released:
            self.pool.free(req.blocks[req.released:behind])   # the table keeps their ids: never read
            req.released = behind

    def _owned(self, req: Request) -> list[int]:
        return req.blocks[req.released:]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def retire(self) -> list[Request]:
        """Drop finished (and aborted) requests, freeing their blocks."""
        done = [r for r in self.running if r.finished]
        if done:
            self.running = [r for r in self.running if not r.finished]
        if self.queue_changed:
            self.queue_changed = False
            ended = [r for r in self.waiting if r.finished]
            if ended:
                self.waiting = deque(r for r in self.waiting if not r.finished)
                done += ended
        for r in done:
            self.pool.free(self._owned(r))
        return done

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(self._owned(req))
        req.computed = req.registered = req.released = 0
        req.preemptions += 1
        self.preemptions += 1
        # back to the queue in arrival order, ahead of newer waiting requests
        k = 0
        while k < len(self.waiting) and self.waiting[k].order < req.order:
            k += 1
        self.waiting.insert(k, req)

    def _grow(self, req: Request, positions: int) -> bool:
        """Give ``req`` blocks for ``positions``, preempting newer running requests if needed;
        False when ``req`` is itself the newest and still does not fit."""
        need = self.pool.blocks_for(positions) - len(req.blocks)
        while need > self.pool.free_blocks:
            victim = max(self.running, key=lambda r: r.order)
            if victim is req:
                return False
            self._preempt(victim)
        if need > 0:
            req.blocks += self.pool.allocate(need)
        return True

    def schedule(self, trees: Optional[dict] = None) -> list[Scheduled]:
        """This step's chunks; ``trees``: a token tree for some decoding requests (speculative
        decoding), scheduled whole if the token budget has room, else as plain decoding."""
        cfg = self.config
        budget, out = cfg.max_tokens_per_batch, []
        for req in sorted(self.running, key=lambda r: r.order):
            if req not in self.running:          # preempted for an older request this step
                continue
            if budget == 0 or len(out) == cfg.max_requests_per_batch:
                break
            tree = (trees or {}).get(req)
            if tree is not None and len(tree.tokens) > budget:
                tree = None
            n = len(tree.tokens) if tree is not None else min(req.num_tokens - req.computed, budget)
            if not self._grow(req, req.computed + n):
                self._preempt(req)
                continue
            out.append(Scheduled(req, req.computed, n, tree))
            budget -= n
        bs = self.pool.block_size
        while self.waiting and budget > 0 and len(out) < cfg.max_requests_per_batch:
            req = self.waiting[0]
            tokens = req.prompt + req.out
            # leading blocks already in the prefix cache (at least one token left to compute)
            hits = self.pool.match(self.pool.keys(tokens, req.keys, (len(tokens) - 1) // bs))
            start = len(hits) * bs
            n = min(len(tokens) - start, budget)
            need = self.pool.blocks_for(start + n) - len(hits)
            if need + self.pool.idle_among(hits) + (self.watermark if self.running else 0) > self.pool.free_blocks:
                break
            self.waiting.popleft()
            req.blocks = self.pool.acquire(hits) + self.pool.allocate(need)
            req.computed, req.registered = start, len(hits)
            self.running.append(req)
            out.append(Scheduled(req, start, n))
            budget -= n
        return out

    def trim(self, req: Request) -> None:
        """Return the blocks past ``req``'s tokens (a verify step's rejected tree slots)."""
        keep = self.pool.blocks_for(req.num_tokens)
        if len(req.blocks) > keep:
            self.pool.free(req.blocks[keep:])
            del req.blocks[keep:]

    def computed(self, req: Request, upto: int) -> None:
        """``req``'s tokens before ``upto`` are in the cache: index the blocks that became full."""
        req.computed = upto
        full = upto // self.pool.block_size
        if full > req.registered:
            keys = self.pool.keys(req.prompt + req.out, req.keys, full)
            self.pool.register(req.blocks[req.registered:full], keys[req.registered:full])
            req.registered = full
        self._release(req)
