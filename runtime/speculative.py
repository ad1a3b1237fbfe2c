"""Speculative decoding with token trees (SpecInfer): trees, their verify inputs, acceptance,
and the drafts that propose them.

A decoding sequence has one token not yet in the cache (its last). A draft proposes a tree
on top of it: node 0 is that token, every other node a proposed continuation of its parent
(parents come before children). The target model runs the whole tree in one ``verify`` step
(ffc.ir.attention._cached_attention: node j at cache slot base + j, rope position base + depth, seeing
its ancestors) and returns logits at every node. Acceptance walks down from the root:

  greedy    the target's argmax at a node is the next token; if a child holds it, that child
            is accepted and the walk goes on from it; else the argmax is emitted and it stops
            (a bonus token every step: a step never yields fewer tokens than plain decoding)
  sampling  SpecInfer's multi-step speculative sampling: at a node with the target's
            distribution p (temperature, top-k, top-p and repetition penalty applied), each
            child in turn is accepted with probability min(1, p(x) / q(x)), q the distribution
            the draft drew it from (a point mass for drafts that pick tokens); on rejection p
            becomes the normalised max(0, p - q) and the next child is tried; with none left, a
            token is drawn from p. The tokens emitted are distributed exactly as plain sampling's.

The accepted nodes' K/V are already in the cache at base + node; ``commit_moves`` says which
rows to copy down to base + depth (no recomputation).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ffc.errors import InvalidRequestError

from .drafts import ModelDraft, NgramDraft, Tree, trials
from .sampling import SamplingParams, draw, target_probs

__all__ = ["Tree", "Accepted", "accept_greedy", "accept_sampled", "commit_moves", "SpecControl", "Speculation",
           "ModelDraft", "NgramDraft"]


@dataclass(frozen=True)
class Accepted:
    path: list[int]        # accepted nodes below the root, in depth order
    tokens: list[int]      # the tokens emitted: the accepted nodes' and the final (bonus) one


def accept_greedy(tree: Tree, logits: torch.Tensor) -> Accepted:
    """logits: [nodes, V], the target's at each node."""
    best = logits.argmax(-1).tolist()
    kids = tree.children()
    cur, path, out = 0, [], []
    while True:
        t = best[cur]
        nxt = next((c for c in kids[cur] if tree.tokens[c] == t), None)
        out.append(t)
        if nxt is None:
            return Accepted(path, out)
        path.append(nxt)
        cur = nxt


def accept_sampled(tree: Tree, logits: torch.Tensor, params: SamplingParams, seen: Sequence[int],
                   generator: Optional[torch.Generator]) -> Accepted:
    """Multi-step speculative sampling over the tree (see the module doc). ``seen``: the
    sequence's tokens so far (for the repetition penalty)."""
    kids = tree.children()
    cur, path, out = 0, [], []
    seen = list(seen)
    while True:
        p = target_probs(logits[cur], torch.tensor(seen, dtype=torch.long), params)
        taken = None
        for c in kids[cur]:
            x = tree.tokens[c]
            q = tree.q[c]
            qx = 1.0 if q is None else float(q[x])
            if qx > 0 and float(torch.rand((), generator=generator)) < min(1.0, float(p[x]) / qx):
                taken = c
                break
            p = (p - q).clamp_min(0) if q is not None else p.index_fill(0, torch.tensor([x]), 0.0)
            total = float(p.sum())
            if total <= 0:       # nothing left outside the draft's support: p was q exactly
                break
            p = p / total
        if taken is None:
            t = draw(p.unsqueeze(0), [generator])[0] if float(p.sum()) > 0 else tree.tokens[kids[cur][-1]]
            out.append(t)
            return Accepted(path, out)
        path.append(taken)
        out.append(tree.tokens[taken])
        seen.append(tree.tokens[taken])
        cur = taken


def commit_moves(tree: Tree, path: Sequence[int], base: int) -> list[tuple[int, int]]:
    """(from slot, to slot) copies that put the accepted nodes' K/V at their positions:
    node j at depth d moves from base + j to base + d (in depth order, which never overwrites a
    row still to be read: j >= d, and a later node's index exceeds an earlier node's depth)."""
    depth = tree.depths()
    return [(base + j, base + depth[j]) for j in path if j != depth[j]]


class SpecControl:
    """The shape of the trees, from measured acceptance and step times.

    A step's time depends on how many tokens it runs: t(T), measured on every plain decode
    step (T = its sequences) and verify step (T = its tree nodes), interpolated between the
    counts seen; elsewhere (and before any step) shaped by the cost model's predicted t(T) /
    t(1), which the compiler records in the manifest (speculative.verify_cost). With B sequences speculating, each with a tree of n nodes
    and depth k, against plain decoding's t(B) for B tokens:

      cost           t(B n) / t(B) + d k + c x    d: a draft step per sequence over t(B) / B;
                                                  c: a draft's catch-up per token the request is
                                                  likely to have left, x: the step's tokens
      tokens/step    1 + sum over depths i of A(i-1) * (a_i + (1 - a_i) * b(w_i))
                     a_i: the acceptance of the chain's token at depth i given the ones above
                     it (one rate at every depth for a draft model; prompt lookup's grow with
                     the match), A(i) = a_1 ... a_i; b(w): how often the target's token is among
                     the draft's next w - 1 candidates when its first is rejected (counted at
                     every rejection); w_i: the width at depth i (the chain node and w_i - 1
                     leaves beside it)

    The shape with the most tokens per unit of cost is used (a chain as deep as pays, widened
    where a leaf's expected tokens beat its cost); none when no shape beats plain decoding by
    2% (the draft is not consulted: speculation turned down). On a CPU a decode step reads the
    weights once for any small T, so extra nodes are nearly free at batch 1 and not at batch 8.
    Priors come from the compiler's cost model and calibration where known (a self-draft's
    manifest) and are replaced by measurements as steps run."""

    MAX_WIDTH = 4
    REFRESH = 8           # steps observed between recomputing t(B n) / t(B) from the smoothed times
    EVIDENCE = 8          # steps of a draft and of plain decoding at a batch size before comparing them

    def __init__(self, max_depth: int = 16, max_nodes: int = 32, prior_acceptance: float = 0.5,
                 node_cost: float = 0.1):
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self.prior = prior_acceptance
        self.curve = {1: 1.0, 2: 1.0 + node_cost}   # predicted t(T) / t(1), the cost model's where known
        self.times: dict[int, float] = {}        # verify steps: tokens -> seconds, smoothed
        self.decode_times: dict[int, float] = {}  # plain decode steps: sequences -> seconds, smoothed
        self._rel_key, self._rel = None, []      # plan()'s t(B n) / t(B), and its plans by their inputs,
        self._plans: dict[tuple, tuple] = {}     # until a new token count is seen or REFRESH more steps
        self._observed = 0
        self.rates: dict[tuple, float] = {}      # (draft or None, batch) -> tokens per second, smoothed,
        self.counts: dict[tuple, int] = {}       # and the steps it is from

    def set_curve(self, curve: dict) -> None:
        """The cost model's predicted t(T) / t(1) at some T (the manifest's speculative.verify_cost)."""
        pts = {int(t): float(v) for t, v in curve.items() if int(t) >= 1 and float(v) > 0}
        if len(pts) >= 2:
            self.curve = pts
            self._rel_key = None

    def predicted(self, tokens: int) -> float:
        """t(tokens) / t(1) by the curve: interpolated, extended linearly past its ends."""
        pts = sorted(self.curve)
        lo = max((t for t in pts if t <= tokens), default=pts[0])
        hi = min((t for t in pts if t > lo), default=None)
        if hi is None:                    # past the last point: the last segment's slope
            lo, hi = pts[-2], pts[-1]
        f = (tokens - lo) / (hi - lo)
        return max(self.curve[lo] + f * (self.curve[hi] - self.curve[lo]), 1e-6)

    def step_time(self, tokens: int, verify: bool = True) -> Optional[float]:
        """t(tokens) of a verify step (or a plain decode step): measured, interpolated between
        measured counts, or scaled from the nearest measured count by the predicted curve; from
        the other kind's steps while this kind has none (None before any step was seen)."""
        times = (self.times or self.decode_times) if verify else (self.decode_times or self.times)
        if tokens in times:
            return times[tokens]
        if not times:
            return None
        below = max((t for t in times if t < tokens), default=None)
        above = min((t for t in times if t > tokens), default=None)
        if below is not None and above is not None:
            f = (tokens - below) / (above - below)
            return times[below] * (1 - f) + times[above] * f
        ref = below if below is not None else above
        scaled = times[ref] * self.predicted(tokens) / self.predicted(ref)
        pts = sorted(times)
        if below is not None and len(pts) > 1:     # the measured slope at the top, if steeper
            slope = (times[pts[-1]] - times[pts[-2]]) / (pts[-1] - pts[-2])
            scaled = max(scaled, times[ref] + slope * (tokens - ref))
        return scaled

    def relative(self, tokens: int, batch: int) -> float:
        """A verify step over ``tokens`` against a plain decode step of ``batch`` sequences."""
        a, b = self.step_time(tokens), self.step_time(batch, verify=False)
        if a is None or b is None:
            return self.predicted(tokens) / self.predicted(batch)
        return a / b

    def shape(self, acceptance, draft_cost: float = 0.0, alt: Sequence[float] = (), batch: int = 1,
              extra: float = 0.0, min_gain: float = 1.02) -> list[int]:
        """Widths per depth (its length the depth); [] to decode plainly. ``acceptance``: a_i per
        depth (see the class doc), or one rate for every depth; ``alt[w - 2]``: b(w);
        ``draft_cost``: a draft step per sequence relative to a plain step's share, t(B) / B;
        ``extra``: a further cost of speculating per token it yields, in the same unit (a draft's
        catch-up spread over the tokens left); ``min_gain``: the predicted speed-up a shape must
        reach."""
        return self.plan(acceptance, draft_cost, alt, batch, extra, min_gain)[0]

    def plan(self, acceptance, draft_cost: float = 0.0, alt: Sequence[float] = (),
             batch: int = 1, extra: float = 0.0, min_gain: float = 1.02) -> tuple[list[int], float]:
        """The best shape and its predicted speed-up over plain decoding (1.0 for plain)."""
        a = tuple(round(min(max(x, 0.0), 0.99), 2)         # inputs rounded: plans are reused
                  for x in per_depth(acceptance, self.max_depth))
        b = [0.0, 0.0, *(round(x, 2) for x in alt)][:self.MAX_WIDTH + 1]      # by width: b(1) = 0, no leaves
        B = max(batch, 1)
        draft_cost, extra = round(draft_cost, 2), round(extra, 2)

        key = (B, len(self.times), len(self.decode_times), self._observed // self.REFRESH)
        if self._rel_key != key:     # t(B n) / t(B) for every tree size
            self._rel = [0.0] + [self.relative(B * n, B) for n in range(1, self.max_nodes + 2)]
            self._rel_key = key
            self._plans = {}
        memo = (a, tuple(b), draft_cost, extra, min_gain)
        if memo not in self._plans:
            self._plans[memo] = self._best(a, b, draft_cost, extra, min_gain)
        widths, gain = self._plans[memo]
        return list(widths), gain

    def _best(self, a: tuple, b: list, draft_cost: float, extra: float, min_gain: float) -> tuple[list[int], float]:
        rel = self._rel
        reach = expected_reach(a)       # reach[i]: the chain's first i tokens all accepted

        def cost(nodes: int, k: int, tokens: float) -> float:
            return rel[nodes] + draft_cost * k + extra * tokens

        best, arg = min_gain, []
        for k in range(1, self.max_depth + 1):
            if k + 1 > self.max_nodes:
                break
            widths = [1] * k
            gain = sum(reach[1:k + 1])
            rate = (1 + gain) / cost(k + 1, k, 1 + gain)
            while sum(widths) + 1 <= self.max_nodes:   # widen where one more leaf adds the most tokens
                options = [(reach[i] * (1 - a[i]) * (b[widths[i] + 1] - b[widths[i]]), i) for i in range(k)
                           if widths[i] + 1 < len(b)]
                if not options:
                    break
                g, i = max(options)
                wider = (1 + gain + g) / cost(sum(widths) + 2, k, 1 + gain + g)
                if wider <= rate:
                    break
                widths[i] += 1
                gain += g
                rate = wider
            if rate > best:
                best, arg = rate, widths
        return arg, (best if arg else 1.0)

    def observe(self, tokens: int, seconds: float, verify: bool = True) -> None:
        """A verify step (or a plain decode step) over ``tokens`` tokens took ``seconds``."""
        if tokens <= 0:
            return
        times = self.times if verify else self.decode_times
        old = times.get(tokens)
        times[tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self._observed += 1

    def realized(self, batch: int, tokens: int, seconds: float, draft: Optional[str]) -> None:
        """What a step of ``batch`` decoding sequences gave: ``tokens`` in ``seconds`` (with the
        drafting), verifying one draft's trees or (None) decoding plainly; tokens per second,
        smoothed, per batch size."""
        if seconds <= 0:
            return
        old = self.rates.get((draft, batch))
        self.rates[(draft, batch)] = tokens / seconds if old is None else 0.8 * old + 0.2 * tokens / seconds
        self.counts[(draft, batch)] = self.counts.get((draft, batch), 0) + 1

    def losing(self, batch: int, draft: str) -> bool:
        """This draft's speculative steps at this batch size have given fewer tokens per second
        than plain ones (the estimates behind the shapes were wrong here): turned down, once
        EVIDENCE steps of each were seen (one step's rate is mostly its luck and the machine's)."""
        if batch < 2:         # one sequence: the shapes' own measurements are exact enough
            return False
        plain, spec = self.rates.get((None, batch)), self.rates.get((draft, batch))
        seen = min(self.counts.get((None, batch), 0), self.counts.get((draft, batch), 0))
        return plain is not None and spec is not None and seen >= self.EVIDENCE and spec < plain

    def share(self, batch: int) -> Optional[float]:
        """A sequence's share of a plain decode step of ``batch`` sequences, t(B) / B (None
        before any step was seen)."""
        t = self.step_time(max(batch, 1), verify=False)
        return None if t is None else t / max(batch, 1)


def per_depth(acceptance, depth: int) -> list[float]:
    """Acceptance given as one rate for every depth or a rate per depth, as ``depth`` rates
    (a list shorter than ``depth`` goes on at its last rate)."""
    if isinstance(acceptance, (int, float)):
        return [float(acceptance)] * depth
    rates = [float(x) for x in acceptance][:depth]
    return rates + [rates[-1]] * (depth - len(rates))


def expected_reach(rates: Sequence[float]) -> list[float]:
    """[1, a_1, a_1 a_2, ...]: the chance that a chain's first i tokens are all accepted."""
    out = [1.0]
    for x in rates:
        out.append(out[-1] * x)
    return out


def update_acceptance(acc: float, depth: int, accepted: int) -> float:
    """A request's per-token acceptance rate, smoothed over its verify steps (each counted as
    drafts.trials does)."""
    if depth <= 0:
        return acc
    return 0.8 * acc + 0.2 * (accepted / trials(depth, accepted))


class Speculation:
    """An engine's speculative decoding: the drafts requests may name, the shape of their trees,
    and the acceptance of a verified tree (with the request's and the engine's counters)."""

    PROBE_EVERY = 16      # a request not speculating still tries a small tree after this many steps,
    PROBE_MAX = 256       # doubling the wait after each probe that did not turn speculation back on
    MODEL_MARGIN = 1.1    # a draft model's predicted speed-up must reach this (its costs are estimates)
    LOOKUP_MARGIN = 1.02  # prompt lookup's at batch 1 (no draft cost: its trees are nearly free there)
    BATCH_MARGIN = 1.1    # ... and prompt lookup's in a batch (one sequence's trees, nearly free at batch 1, make
                          # every sequence's step a verify step; estimates of B sequences' gains are coarser)
    PROBE_COST = 1.1      # a probe alone may make a step's verify cost this much of its decode step's
    LENGTHS = 256         # answers' lengths remembered (their tail says how long a running one may go on)

    def __init__(self):
        self.drafts: dict = {"ngram": NgramDraft()}
        self.control = SpecControl()
        self.gate = True      # verify only steps expected to pay (off: every tree proposed is verified)
        self.sunk = 0.0       # seconds the last trees() spent catching drafts up on long stretches (one-off)
        self.expected: dict = {}   # this step's trees: the per-token acceptance each was shaped for,
        self.keys: dict = {}       # and the draft's own key for it (prompt lookup: its match length)
        self.lengths: deque = deque(maxlen=self.LENGTHS)   # tokens of answers that ended by themselves

    def answered(self, tokens: int) -> None:
        self.lengths.append(tokens)

    def tokens_left(self, req) -> int:
        """How many tokens ``req`` is likely still to write: the mean excess over what it wrote of
        the answers seen that ran longer (as many as it wrote, at least ModelDraft.MIN_LEFT, until
        8 answers were seen), within its max_new_tokens."""
        n = len(req.out)
        cap = max(1, req.params.max_new_tokens - n)
        if len(self.lengths) < 8:
            return min(cap, max(n, ModelDraft.MIN_LEFT))
        longer = [x - n for x in self.lengths if x > n]
        return min(cap, max(1, round(sum(longer) / len(longer))) if longer else ModelDraft.MIN_LEFT)

    def check(self, draft: str, runner) -> None:
        if draft not in self.drafts:
            raise InvalidRequestError(f"speculative draft {draft!r} is not available; use one of "
                                      f"{', '.join(sorted(self.drafts))}, 'self' (an artifact compiled with "
                                      "--self-draft) or the path of a draft artifact")
        if not runner.can_verify:
            raise InvalidRequestError("this artifact has no verify graph (a model with sliding-window attention, or "
                                      "compiled by an older ffc); speculative decoding needs one")

    def trees(self, running, config) -> dict:
        """A draft tree for each decoding request that speculates, shaped as the control finds
        worth it (within its token and length limits)."""
        out, batches, probes = {}, {}, set()
        self.expected, self.keys = {}, {}
        batch = sum(1 for r in running if not r.finished and r.num_tokens - r.computed == 1)   # decoding now
        terms: dict = {}            # per draft, this step: its step cost and b(w), whether it lost here
        # a probe's tree verified alone makes the whole step a verify step: in a large batch, dear
        cheap_probe = self.control.relative(batch + 2, batch) <= self.PROBE_COST
        for req in running:
            if req.draft is None or req.finished or req.num_tokens - req.computed != 1:
                continue
            draft = self.drafts[req.draft]
            model = isinstance(draft, ModelDraft)
            if req.draft not in terms:
                cost, alt = (draft.cost_at(batch, self.control), draft.alt()) if model else (0.0, ())
                terms[req.draft] = (cost, alt, self.control.losing(batch, req.draft),
                                    bool(self.control.shape(0.99, cost, alt, batch)))   # would a perfect draft pay?
            cost, alt, losing, could = terms[req.draft]
            if not could:               # not at this batch size, whatever the acceptance: nothing to try
                continue
            toks = req.prompt + req.out
            if model and not req.proposed:      # until its first verify: the draft's rate over earlier
                if draft.acceptance is not None:  # requests, else its calibrated one (in eager PyTorch,
                    req.acceptance = draft.acceptance   # without the kernels' int8 activations: capped)
                elif draft.prior_acceptance is not None:
                    req.acceptance = min(draft.prior_acceptance, 0.9)
            acceptance, key = req.acceptance, None
            if hasattr(draft, "expect"):         # the draft rates this proposal itself (prompt lookup)
                found = draft.expect(toks, self.control.max_depth)
                if found is None:
                    continue
                acceptance, key = found
            margin = self.MODEL_MARGIN if model else self._margin(batch)
            widths = [] if losing else self.control.shape(acceptance, cost, alt, batch, min_gain=margin)
            if widths and model:        # the draft's catch-up on this request, where it lags
                widths = self.control.shape(acceptance, cost, alt, batch, min_gain=margin,
                                            extra=draft.catchup_cost(req, self.control, batch, self.tokens_left(req)))
            if not widths:              # turned down: probe now and then, so the request's acceptance can
                req.unspeculated += 1   # recover (a draft rating its own proposals learns from all requests')
                if key is not None or req.unspeculated < req.probe_gap or not cheap_probe:
                    continue
                if model and draft.catchup_seconds(req, self.control.share(batch) or 0.0) > \
                        (self.control.step_time(batch, verify=False) or 0.0):
                    continue            # a probe catching the draft up on more than a step's time: not worth it
                widths = [1, 1]
                probes.add(req)
                req.probe_gap = min(2 * req.probe_gap, self.PROBE_MAX)   # probes that keep failing: rarer
            else:
                req.probe_gap = self.PROBE_EVERY
            req.unspeculated = 0
            room = config.max_seq_len - req.num_tokens + 1       # the tree's nodes fill slots base .. base + n - 1
            depth = min(len(widths), req.params.max_new_tokens - len(req.out) - 1, room - 2)
            if depth <= 0:
                continue
            self.expected[req], self.keys[req] = acceptance, key
            nodes = min(self.control.max_nodes, room)
            if model:
                widths = widths[:depth]
                while 1 + sum(widths) > nodes:
                    widths[-1] -= 1
                    if not widths[-1]:
                        widths.pop()
                batches.setdefault(req.draft, []).append((req, toks, widths))
                continue
            tree = draft.propose(toks, depth, min(nodes, 1 + sum(widths[:depth])))   # the nodes priced
            if tree is not None:
                out[req] = tree
        alive = {r.id for r in running if not r.finished}
        self.sunk = 0.0
        for name, draft in self.drafts.items():
            if isinstance(draft, ModelDraft):
                draft.release(alive)
                if name in batches:
                    draft.sunk = 0.0
                    out.update(draft.propose_batch(batches[name], self.control))
                    self.sunk += draft.sunk
        return self._worth_a_verify_step(out, probes, batch)

    def _margin(self, batch: int) -> float:
        """The predicted speed-up a draft without a model's costs must promise at ``batch``."""
        return self.LOOKUP_MARGIN if batch < 2 else self.BATCH_MARGIN

    def _worth_a_verify_step(self, trees: dict, probes: set, batch: int) -> dict:
        """The trees, if verifying them (every decoding sequence joins the verify step) is
        expected to give more tokens per second than a plain decode step; else only the probes.
        A few trees in a large batch make the whole step a verify step, which costs more."""
        if not trees or not self.gate:
            return trees
        tokens = batch + sum(len(t.tokens) - 1 for t in trees.values())
        gain = sum(sum(expected_reach([min(x, 0.99) for x in per_depth(self.expected[req], max(t.depths()))])[1:])
                   for req, t in trees.items())
        if (batch + gain) / batch >= self._margin(batch) * self.control.relative(tokens, batch):
            return trees
        return {req: t for req, t in trees.items() if req in probes}

    def accept(self, req, tree: Tree, logits: torch.Tensor, stats) -> Accepted:
        p = req.params
        if p.greedy and p.repetition_penalty == 1.0:
            acc = accept_greedy(tree, logits)
        else:
            acc = accept_sampled(tree, logits, p, req.prompt + req.out, req.generator)
        if len(tree.tokens) > 1:
            draft = self.drafts.get(req.draft)
            if isinstance(draft, ModelDraft):     # the chain: each depth's first node
                chain = _chain(tree)
                depth = len(chain)
                got = sum(1 for j in acc.path if j in chain)
                draft.observe(req, got, acc.tokens)
            else:
                depth, got = max(tree.depths()), len(acc.path)
                key = self.keys.get(req)
                if key is not None:
                    draft.observe(key, depth, got)
            req.proposed += depth
            req.accepted += len(acc.path)
            req.acceptance = update_acceptance(req.acceptance, depth, got)
            stats.spec_proposed += depth
            stats.spec_accepted += len(acc.path)
            stats.verify_steps += 1
        return acc


def _chain(tree: Tree) -> set:
    """The first child of every node from the root down (a model draft's chain)."""
    kids, cur, out = tree.children(), 0, set()
    while kids[cur]:
        cur = kids[cur][0]
        out.add(cur)
    return out
