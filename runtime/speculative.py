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

from .drafts import LookupFirst, ModelDraft, NgramDraft, Tree
from .sampling import SamplingParams, draw, target_probs
from .spec_control import SpecControl, expected_reach, per_depth, update_acceptance

__all__ = ["Tree", "Accepted", "accept_greedy", "accept_sampled", "commit_moves", "SpecControl", "Speculation",
           "LookupFirst", "ModelDraft", "NgramDraft"]


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


class AnswerLengths:
    """How long answers run, from the answers seen: what a running request is likely still to
    write (a draft's catch-up is priced by it), and whether it will run to its max_new_tokens
    (a batch whose answers do ends together: Speculation.pace_setters)."""

    LENGTHS = 256         # answers remembered (their tail says how long a running one may go on)

    def __init__(self):
        self.ends: deque = deque(maxlen=self.LENGTHS)   # answers' (tokens, whether cut at max_new_tokens)
        self._longer: dict = {}    # longer_than's results by length, until the next answer ends

    def answered(self, tokens: int, cut: bool = False) -> None:
        """An answer ended: by itself, or ``cut`` at its max_new_tokens."""
        self.ends.append((tokens, cut))
        self._longer = {}

    def longer_than(self, n: int) -> tuple[int, int, Optional[float]]:
        """Of the answers seen that ran longer than ``n`` tokens: how many, how many of them were
        cut at max_new_tokens, and the mean excess over ``n`` of the others (None: no other). Per
        step every decoding request of a batch asks, mostly with lengths asked before."""
        if n not in self._longer:
            longer = [(x, cut) for x, cut in self.ends if x > n]
            stopped = [x - n for x, cut in longer if not cut]
            self._longer[n] = (len(longer), sum(cut for _, cut in longer),
                               sum(stopped) / len(stopped) if stopped else None)
        return self._longer[n]

    def tokens_left(self, req) -> int:
        """How many tokens ``req`` is likely still to write: the mean excess over what it wrote of
        the answers seen that ran longer and ended by themselves (as many as it wrote, at least
        ModelDraft.MIN_LEFT, until 8 such answers were seen), within its max_new_tokens."""
        n = len(req.out)
        cap = max(1, req.params.max_new_tokens - n)
        seen, cut, _ = self.longer_than(-1)
        if seen - cut < 8:
            return min(cap, max(n, ModelDraft.MIN_LEFT))
        excess = self.longer_than(n)[2]
        return min(cap, max(1, round(excess)) if excess is not None else ModelDraft.MIN_LEFT)

    def runs_to_cap(self, req) -> bool:
        """Whether ``req`` is likely to write until its max_new_tokens: most of the answers seen
        that ran longer than it so far were cut there; with fewer than 4 seen, taken to (the
        cautious side: see Speculation.pace_setters)."""
        longer, cut, _ = self.longer_than(len(req.out))
        return longer < 4 or 2 * cut > longer

    def steps_left(self, req, to_cap: bool) -> float:
        """How many steps ``req`` likely still needs: its tokens left (to its max_new_tokens if it
        is likely to run there) over the tokens a step of it has yielded so far."""
        n = len(req.out)
        left = req.params.max_new_tokens - n if to_cap else self.tokens_left(req)
        return left * max(1, n - req.accepted) / max(n, 1)


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
    PACE = 0.9            # a group's members that may end last: steps left within this share of its most

    def __init__(self):
        self.drafts: dict = {"ngram": NgramDraft()}
        self.control = SpecControl()
        self.gate = True      # verify only steps expected to pay (off: every tree proposed is verified)
        self.sunk = 0.0       # seconds the last trees() spent catching drafts up on long stretches (one-off)
        self.expected: dict = {}   # this step's trees: the per-token acceptance each was shaped for,
        self.keys: dict = {}       # and the draft that made it with its key (prompt lookup: match, agreement)
        self.lengths = AnswerLengths()

    def check(self, draft: str, runner) -> None:
        if draft not in self.drafts:
            raise InvalidRequestError(f"speculative draft {draft!r} is not available; use one of "
                                      f"{', '.join(sorted(self.drafts))}, 'self' (an artifact compiled with "
                                      "--self-draft) or the path of a draft artifact")
        if not runner.can_verify:
            raise InvalidRequestError("this artifact has no verify graph (a model with sliding-window attention, or "
                                      "compiled by an older ffc); speculative decoding needs one")

    def pace_setters(self, running) -> tuple[dict, set]:
        """A group of requests (one llm.generate call) is done when its last one is. Where its
        answers end by themselves, at lengths spread out, any member may be the last and every
        member's accepted tokens count (as for requests on their own). Where most of them are
        likely to run to their max_new_tokens, they end together there, and only a step that
        brings all of the slowest closer to it brings the group's end closer. For such groups:
        the members that may end last (estimated steps left within ``PACE`` of the group's
        most), by request, their group and its decoding members' count; and the other members,
        whose trees would not bring the group's end closer (a member whose prompt still runs
        ends last: none of them speculates). Groups none of whose members speculates: none."""
        groups: dict = {}
        for r in running:
            if r.group is not None and not r.finished:
                groups.setdefault(r.group, []).append(r)
        setters, others = {}, set()
        for key, members in groups.items():
            if len(members) < 2 or all(r.draft is None for r in members):
                continue
            decoding = [r for r in members if r.num_tokens - r.computed == 1]
            to_cap = {r: self.lengths.runs_to_cap(r) for r in decoding}
            if 2 * sum(to_cap.values()) <= len(decoding):
                continue
            if len(decoding) < len(members):
                others.update(decoding)
                continue
            left = {r: self.lengths.steps_left(r, to_cap[r]) for r in decoding}
            top = max(left.values())
            for r, n in left.items():
                if n >= self.PACE * top:
                    setters[r] = (key, len(decoding))
                else:
                    others.add(r)
        return setters, others

    def trees(self, running, config, waiting: bool = False) -> dict:
        """A draft tree for each decoding request that speculates, shaped as the control finds
        worth it (within its token and length limits). ``waiting``: requests wait for room in
        the batch, so a step's tokens are what counts (throughput); else, for requests an
        llm.generate call runs together, the step that brings the group's end closer (the
        steps its slowest member still needs)."""
        out, batches, probes = {}, {}, set()
        self.expected, self.keys = {}, {}
        batch = sum(1 for r in running if not r.finished and r.num_tokens - r.computed == 1)   # decoding now
        setters, others = ({}, set()) if waiting else self.pace_setters(running)
        terms: dict = {}            # per draft, this step: its step cost and b(w), whether it lost here
        # a probe's tree verified alone makes the whole step a verify step: in a large batch, dear
        cheap_probe = self.control.relative(batch + 2, batch) <= self.PROBE_COST
        # groups a pace setter of which has nothing to verify gain nothing this step, unless speculation
        # raises all of them alike (see _worth_a_verify_step): their other setters are not drafted for
        lowest: dict = {}           # per group: its pace setters' lowest outlook
        for r, (key, _) in setters.items():
            lowest[key] = min(lowest.get(key, r.outlook), r.outlook)
        uneven = {key for key, o in lowest.items() if o < self._margin(batch) - 1}
        dead, last = set(), None
        for req in sorted(running, key=lambda r: r not in setters):     # pace setters first
            if last is not None and last not in self.expected and setters[last][0] in uneven:
                dead.add(setters[last][0])
            last = req if req in setters else None
            if req.draft is None or req.finished or req.num_tokens - req.computed != 1 or req in others:
                continue
            draft = self.drafts[req.draft]
            both = draft if isinstance(draft, LookupFirst) else None
            if both is not None:
                draft = both.model
            model = isinstance(draft, ModelDraft)
            if req.draft not in terms:  # would a perfect draft pay? (a combined one: its model, or its lookup)
                cost, alt = (draft.cost_at(batch, self.control), draft.alt()) if model else (0.0, ())
                pays = bool(self.control.shape(0.99, cost, alt, batch))
                terms[req.draft] = (cost, alt, self.control.losing(batch, req.draft),
                                    pays or (both is not None and bool(self.control.shape(0.99, 0.0, alt, batch))), pays)
            cost, alt, losing, could, model_pays = terms[req.draft]
            if not could:               # not at this batch size, whatever the acceptance: nothing to try
                continue
            toks = req.prompt + req.out
            if model and not req.proposed:      # until its first verify: the draft's rate over earlier
                if draft.acceptance is not None:  # requests, else its calibrated one (in eager PyTorch,
                    req.acceptance = draft.acceptance   # without the kernels' int8 activations: capped)
                elif draft.prior_acceptance is not None:
                    req.acceptance = min(draft.prior_acceptance, 0.9)
            acceptance, key = req.acceptance, None
            if both is not None and not losing:
                found = self._lookup_first(req, toks, both, cost if model_pays else None, alt, batch)
                if found is not None:
                    draft, model, (acceptance, key) = both.lookup, False, found
            elif hasattr(draft, "expect"):       # the draft rates this proposal itself (prompt lookup)
                acceptance, key = draft.expect(toks, self.control.max_depth) or (None, None)
            if model and not model_pays:         # a combined draft's model that cannot pay at this batch
                acceptance = None                # size: no tree, no probe
            widths = []
            if acceptance is not None:
                margin = self.MODEL_MARGIN if model else self._margin(batch)
                widths = [] if losing else self.control.shape(acceptance, cost, alt, batch, min_gain=margin)
            if widths and model:        # the draft's catch-up on this request, where it lags
                extra = draft.catchup_cost(req, self.control, batch, self.lengths.tokens_left(req))
                widths = self.control.shape(acceptance, cost, alt, batch, min_gain=margin, extra=extra)
            if req in setters:          # what the tree worth verifying for it now adds (none: 0), smoothed
                rates = per_depth(acceptance, len(widths)) if widths else []
                req.outlook = 0.8 * req.outlook + 0.2 * sum(expected_reach([min(x, 0.99) for x in rates])[1:])
                if setters[req][0] in dead:
                    continue
            if acceptance is None:
                continue
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
            self.expected[req], self.keys[req] = acceptance, (draft, key)
            nodes = min(self.control.max_nodes, room)
            if model:
                widths = widths[:depth]
                while 1 + sum(widths) > nodes:
                    widths[-1] -= 1
                    if not widths[-1]:
                        widths.pop()
                batches.setdefault(draft.name, []).append((req, toks, widths))
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
        return self._worth_a_verify_step(out, probes, batch, setters)

    def _lookup_first(self, req, toks: list, both: LookupFirst, cost: Optional[float], alt: Sequence[float],
                      batch: int) -> Optional[tuple]:
        """A combined draft's choice now: prompt lookup's proposal (its ``expect``) if its tree is
        predicted to speed up as much as the model's (the model's catch-up on what lookup drafted
        included; ``cost`` None: the model cannot pay at this batch size), else None."""
        found = both.lookup.expect(toks, self.control.max_depth)
        if found is None:
            return None
        widths, gain = self.control.plan(found[0], 0.0, (), batch, min_gain=self._margin(batch))
        if not widths:
            return None
        if cost is not None and req.acceptance is not None:
            extra = both.model.catchup_cost(req, self.control, batch, self.lengths.tokens_left(req))
            if gain < self.control.plan(req.acceptance, cost, alt, batch, extra, self.MODEL_MARGIN)[1]:
                return None
        return found

    def _margin(self, batch: int) -> float:
        """The predicted speed-up a draft without a model's costs must promise at ``batch``."""
        return self.LOOKUP_MARGIN if batch < 2 else self.BATCH_MARGIN

    def _worth_a_verify_step(self, trees: dict, probes: set, batch: int, setters: dict) -> dict:
        """The trees, if verifying them (every decoding sequence joins the verify step) is
        expected to give more tokens per second than a plain decode step; else only the probes.
        A few trees in a large batch make the whole step a verify step, which costs more. A group
        of requests (``setters``: its pace setters) whose end comes s steps closer gains k s tokens
        (k: its members). Where speculation raises all its pace setters alike (each one's outlook,
        what it would gain from a tree at every step, pays for such steps) its end comes as close
        as they gain on average, a setter without a tree now catching up later; else only as
        close as its slowest pace setter gains now."""
        if not trees or not self.gate:
            return trees
        tokens = batch + sum(len(t.tokens) - 1 for t in trees.values())
        gains = {req: sum(expected_reach([min(x, 0.99) for x in per_depth(self.expected[req], max(t.depths()))])[1:])
                 for req, t in trees.items()}
        gain = sum(g for req, g in gains.items() if req not in setters)
        cost = self._margin(batch) * self.control.relative(tokens, batch)
        groups: dict = {}           # per group: its members, its pace setters' gains now and outlooks
        for req, (key, size) in setters.items():
            groups.setdefault(key, (size, [], []))
            groups[key][1].append(gains.get(req, 0.0))
            groups[key][2].append(req.outlook)
        for size, now, outlook in groups.values():
            gain += size * (sum(now) / len(now) if 1 + min(outlook) >= cost else min(now))
        if (batch + gain) / batch >= cost:
            return trees
        return {req: t for req, t in trees.items() if req in probes}

    def accept(self, req, tree: Tree, logits: torch.Tensor, stats) -> Accepted:
        p = req.params
        if p.greedy and p.repetition_penalty == 1.0:
            acc = accept_greedy(tree, logits)
        else:
            acc = accept_sampled(tree, logits, p, req.prompt + req.out, req.generator)
        if len(tree.tokens) > 1:
            draft, key = self.keys.get(req, (self.drafts.get(req.draft), None))
            if isinstance(draft, ModelDraft):     # the chain: each depth's first node
                chain = _chain(tree)
                depth = len(chain)
                got = sum(1 for j in acc.path if j in chain)
                draft.observe(req, got, acc.tokens)
                req.acceptance = update_acceptance(req.acceptance, depth, got)   # its trees' shape
            else:                                 # prompt lookup rates its proposals by their match
                depth, got = max(tree.depths()), len(acc.path)
                if key is not None:
                    draft.observe(key, depth, got)
            req.proposed += depth
            req.accepted += len(acc.path)
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
