"""The engine: one queue of requests, one scheduler, one KV block pool, one model.

``LLM.generate`` (offline batches), ``LLM.stream`` and the HTTP server all submit requests
here. A step schedules chunks (scheduler.py), runs them as one packed forward pass
(model_runner.py), samples a token for every request whose known tokens are all in the
cache, and retires finished requests, returning their blocks the same step. The engine is
driven either by its own background thread (the server) or by whoever waits on a request
(offline use): both go through ``step``, which one thread at a time runs.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Callable, Optional, Sequence

import torch

from ffc.errors import InvalidRequestError

from .detokenize import Detokenizer
from .kv_cache import BlockPool
from .model_runner import Chunk, ModelRunner
from .sampling import SamplingParams, check_seed, sample_rows
from .scheduler import Request, Scheduler, SchedulerConfig
from .speculative import Speculation, Tree, commit_moves
from .trace import StepTracer, engine_spans

log = logging.getLogger("ffc.engine")


def releasable(text: str, sent: int, hold: int, done: bool) -> int:
    """How far a stream may send ``text`` now: all of it when done; else all but the last
    ``hold`` characters (a possible stop-string prefix) and any unfinished character."""
    if done:
        return len(text)
    end = len(text) - hold
    while end > sent and text[end - 1] == "\ufffd":
        end -= 1
    return end


class EngineStats:
    """Counters since start, and a window of recent steps for tokens/s."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.verify_steps = 0                    # speculative decoding: steps that verified a tree,
        self.spec_proposed = 0                   # the draft tokens they verified (deepest path),
        self.spec_accepted = 0                   # and the ones accepted
        self.finished = collections.Counter()
        self.recent: collections.deque = collections.deque()   # (time, tokens generated)

    def record(self, generated: int, window: float = 10.0) -> None:
        now = time.monotonic()
        self.recent.append((now, generated))
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(g for t, g in self.recent if t >= now - window)
        return n / window


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: set, pool: BlockPool, config: SchedulerConfig):
        self.runner = runner
        self.detok = Detokenizer(tokenizer)          # requests' text as their tokens arrive
        self.eos_ids = eos_ids
        self.pool = pool
        self.config = config
        self.scheduler = Scheduler(config, pool)
        self.stats = EngineStats()
        self.speculation = Speculation()            # drafts and how deep to speculate
        self._lock = threading.RLock()              # scheduler state
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()          # one step at a time
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.on_finish: list[Callable[[Request], None]] = []
        self.tracer: Optional[StepTracer] = None    # the loop's steps traced now and then (ffc serve --trace-dir)

    # ------------------------------------------------------------ requests
    def submit(self, prompt: list[int], params: SamplingParams, *, request_id: Optional[str] = None,
               seed: Optional[int] = None, listener: Optional[Callable[[Request], None]] = None,
               draft: Optional[str] = None, group: Optional[str] = None) -> Request:
        """Queue a request (token ids). ``seed`` overrides ``params.seed`` for its generator;
        ``draft``: decode it speculatively with that registered draft (``self.speculation.drafts``);
        ``group``: requests one caller waits for together (see Speculation.pace_setters)."""
        if draft is not None:
            self.speculation.check(draft, self.runner)
        check_seed(seed)
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if len(prompt) >= self.config.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens, but max_seq_len is {self.config.max_seq_len}; "
                "shorten it or recompile with a larger --max-seq-len")
        gen = None
        if not params.greedy:
            gen = torch.Generator()
            s = seed if seed is not None else params.seed
            gen.manual_seed(s if s is not None else torch.seed())
        req = Request(request_id or uuid.uuid4().hex, list(prompt), params, gen, listener, draft=draft, group=group)
        with self._wake:
            if self._stopping:
                raise InvalidRequestError("the engine is shutting down; retry on another server")
            self.scheduler.add(req)
            self._wake.notify()
        return req

    def abort(self, req: Request) -> None:
        """Cancel a request; its blocks return to the pool at the next step boundary."""
        with self._wake:
            if not req.finished:
                self._end(req, "abort")
            self._wake.notify()

    def _end(self, req: Request, reason: str, error: Optional[str] = None) -> None:
        req.finish, req.error, req.finished_at = reason, error, time.monotonic()
        if reason == "abort":                    # it may not have started yet
            self.scheduler.queue_changed = True
        self.stats.finished[reason] += 1
        if reason in ("stop", "length"):     # how long answers run: what a request is likely to have left
            self.speculation.lengths.answered(len(req.out), cut=reason == "length")

    # ------------------------------------------------------------ stepping
    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def step(self) -> int:
        """Run one scheduled batch; the number of tokens it processed (0 when idle)."""
        with self._step_lock:
            started = time.monotonic_ns()
            with self._lock:
                ended = self.scheduler.retire()
                td = time.perf_counter()
                plan = self.scheduler.schedule(self.speculation.trees(self.scheduler.running, self.config,
                                                                      waiting=bool(self.scheduler.waiting)))
                td = time.perf_counter() - td          # drafting (and scheduling) this step
            self._notify(ended)
            if not plan:
                return 0
            scheduled = time.monotonic_ns()
            verify = [s for s in plan if s.tree is not None]
            if verify:       # every decoding sequence joins the verify call (a one-node tree)
                verify += [s for s in plan if s.tree is None and s.start == s.req.num_tokens - 1]
            rest = [s for s in plan if s not in verify]
            try:
                t0 = time.perf_counter()
                logits = self.runner.forward([Chunk(s.req.tokens(s.start, s.n), s.start, list(s.req.blocks))
                                              for s in rest], self.pool.tensor) if rest else None
                t1 = time.perf_counter()
                trees = [s.tree or Tree([s.req.tokens(s.start, 1)[0]], [-1]) for s in verify]
                tree_logits = self.runner.verify([(t, s.start, s.req.blocks) for t, s in zip(trees, verify)],
                                                 self.pool.tensor) if verify else []
                t2 = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - fail the step's requests, keep the engine alive
                with self._lock:
                    for s in plan:
                        if not s.req.finished:
                            self._end(s.req, "error", f"{type(e).__name__}: {e}")
                    ended = self.scheduler.retire()
                self._notify(ended)
                raise
            touched, forwarded = [], time.monotonic_ns()
            with self._lock:
                due = [k for k, s in enumerate(rest) if self._advance(s)]
                for k, token in zip(due, self._sample([rest[k].req for k in due], logits[due]) if due else []):
                    self._append(rest[k].req, token)
                    touched.append(rest[k].req)
                generated = len(due)
                verified = sum(self._accept(s, tree, lg, touched) for s, tree, lg in zip(verify, trees, tree_logits))
                generated += verified
                control = self.speculation.control
                if rest and all(s.n == 1 for s in rest):      # plain decode steps, and verify steps:
                    control.observe(len(rest), t1 - t0, verify=False)   # t(tokens) for the tree shapes,
                    control.realized(len(rest), len(rest), t1 - t0 + td, None)   # and tokens per second
                if verify:
                    control.observe(sum(len(t.tokens) for t in trees), t2 - t1)
                    drafts = {s.req.draft for s in verify if s.tree is not None}
                    if len(drafts) == 1:
                        # a draft's one-off catch-up is not what a speculative step costs
                        control.realized(len(verify), verified, t2 - t1 + td - self.speculation.sunk, drafts.pop())
                self.stats.steps += 1
                self.stats.generated_tokens += generated
                self.stats.record(generated)
                ended = self.scheduler.retire()
            self._notify(touched, ended)
            if self.runner.events is not None:         # tracing: the Python time around the forward call
                engine_spans(self.runner, started, scheduled, forwarded, time.monotonic_ns(), len(plan))
            return sum(s.n for s in plan)

    def _advance(self, s) -> bool:
        """A prefill chunk or plain decode step of one request ran: whether its next token is due."""
        req = s.req
        if req.finished:                  # aborted while the step ran
            return False
        self.scheduler.computed(req, s.start + s.n)
        if req.computed == len(req.prompt) and not req.out:
            self.stats.prompt_tokens += len(req.prompt)
        return req.computed >= req.num_tokens   # else a prompt chunk: nothing to sample yet

    @staticmethod
    def _sample(reqs: Sequence[Request], logits: torch.Tensor) -> list[int]:
        """The next token of each request, from its last position's logits (rows of ``logits``)."""
        none = torch.empty(0, dtype=torch.long)
        return sample_rows(logits, [(r.params, torch.tensor(r.prompt + r.out, dtype=torch.long)
                                     if r.params.repetition_penalty != 1.0 else none, r.generator)
                                    for r in reqs])

    def _accept(self, s, tree: Tree, logits: torch.Tensor, touched: list) -> int:
        """A verified tree: the accepted nodes' K/V moved to their positions, their tokens and
        the bonus token appended (as far as stop conditions allow)."""
        req = s.req
        if req.finished:
            return 0
        acc = self.speculation.accept(req, tree, logits, self.stats)
        self.runner.copy_slots(req.blocks, commit_moves(tree, acc.path, s.start), self.pool.tensor)
        n = 0
        for t in acc.tokens:
            self._append(req, t)
            n += 1
            if req.finished:
                break
        if not req.finished:
            self.scheduler.computed(req, s.start + 1 + len(acc.path))
            self.scheduler.trim(req)
        touched.append(req)
        return n

    def _append(self, req: Request, token: int) -> None:
        p = req.params
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.out.append(token)
        end = "stop" if token in self.eos_ids and not p.ignore_eos else \
            "length" if len(req.out) >= p.max_new_tokens or req.num_tokens >= self.config.max_seq_len else None
        text, new = self.detok.text(req, whole=end is not None)
        start = max(0, new + 1 - max((len(s) for s in p.stop), default=1))   # where a stop string could end in new text
        cut = min((i for i in (text.find(s, start) for s in p.stop) if i >= 0), default=-1)
        req.text = text if cut < 0 else text[:cut]   # one assignment: readers on other threads
        if cut >= 0:                                 # never see a stop string
            self._end(req, "stop")
        elif end is not None:
            self._end(req, end)

    def _notify(self, *groups: Sequence[Request]) -> None:
        seen = set()
        for group in groups:
            for req in group:
                if id(req) in seen:
                    continue
                seen.add(id(req))
                try:   # a listener that fails (e.g. its event loop closed) must not stall the others
                    if req.listener is not None:
                        req.listener(req)
                    if req.finished and not req.done.is_set():
                        for hook in self.on_finish:
                            hook(req)
                except Exception:  # noqa: BLE001
                    log.exception("listener of request %s failed", req.id)
                if req.finished:
                    req.done.set()

    def wait(self, reqs: Sequence[Request]) -> None:
        """Until every request has finished: steps this thread, or waits on the loop thread."""
        for req in reqs:
            idle = 0
            while not req.done.is_set():
                if self.running_loop:
                    req.done.wait(0.5)
                    continue
                idle = 0 if self.step() else idle + 1
                if idle > 2 and not req.done.is_set():
                    raise RuntimeError(f"request {req.id} cannot be scheduled (engine stalled); this is a bug")

    # ------------------------------------------------------------ background loop
    @property
    def running_loop(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Step in a background thread whenever there is work (the server's mode)."""
        if self.running_loop:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ffc-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop the loop; with ``drain`` after every queued request has finished, else aborting them."""
        with self._wake:
            self._stopping = True
            if not drain:
                for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                    if not r.finished:
                        self._end(r, "abort")
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.scheduler.has_work():
                    return
            try:
                self.step() if self.tracer is None else self.tracer.step(self.step)
            except Exception:  # noqa: BLE001 - the step's requests carry the error; keep serving
                log.exception("engine step failed")
