"""Speculative decoding with token trees (SpecInfer): trees, their verify inputs, acceptance,
and the drafts that propose them.

A decoding sequence has one token not yet in the cache (its last). A draft proposes a tree
on top of it: node 0 is that token, every other node a proposed continuation of its parent
(parents come before children). The target model runs the whole tree in one ``verify`` step
(ops._cached_attention: node j at cache slot base + j, rope position base + depth, seeing
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

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ffc.errors import InvalidRequestError
from ffc.ir.ops import TREE_NODES

from .sampling import SamplingParams, target_probs


@dataclass
class Tree:
    """A token tree on top of a sequence. ``q[j]``: the distribution node j's token was drawn
    from (over the vocabulary), None when the draft picked it (a point mass)."""
    tokens: list[int]
    parents: list[int]
    q: list[Optional[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.tokens)
        if not 1 <= n <= TREE_NODES or len(self.parents) != n or self.parents[0] != -1 \
                or any(not 0 <= p < j for j, p in enumerate(self.parents) if j):
            raise InvalidRequestError(f"a token tree needs 1..{TREE_NODES} nodes, node 0 the root and every "
                                      f"parent before its child; got parents {self.parents}")
        if not self.q:
            self.q = [None] * n

    @staticmethod
    def chain(root: int, tokens: Sequence[int]) -> "Tree":
        return Tree([root, *tokens], list(range(-1, len(tokens))))

    def depths(self) -> list[int]:
        d = [0] * len(self.tokens)
        for j in range(1, len(d)):
            d[j] = d[self.parents[j]] + 1
        return d

    def masks(self) -> list[int]:
        """Per node, the bits of itself and its ancestors, as signed int64 (node 63: the sign bit)."""
        m = [0] * len(self.tokens)
        for j, p in enumerate(self.parents):
            m[j] = (m[p] if p >= 0 else 0) | (1 << j)
        return [x - (1 << 64) if x >= 1 << 63 else x for x in m]

    def children(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.tokens]
        for j, p in enumerate(self.parents):
            if p >= 0:
                out[p].append(j)
        return out


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
            t = int(torch.multinomial(p, 1, generator=generator)) if float(p.sum()) > 0 else tree.tokens[kids[cur][-1]]
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


# ---------------------------------------------------------------- drafts

class NgramDraft:
    """Prompt lookup: the continuation that followed the latest earlier occurrence of the
    sequence's last n tokens (n from ``max_ngram`` down to 1) is proposed; several occurrences
    with different continuations become branches of one tree (their common prefixes shared)."""

    kind = "ngram"

    def __init__(self, max_ngram: int = 3, branches: int = 3):
        self.max_ngram, self.branches = max_ngram, branches

    def propose(self, tokens: Sequence[int], depth: int, max_nodes: int) -> Optional[Tree]:
        n_tok = len(tokens)
        for n in range(min(self.max_ngram, n_tok - 1), 0, -1):
            tail = list(tokens[n_tok - n:])
            conts: list[list[int]] = []
            for start in range(n_tok - n - 1, -1, -1):       # latest occurrence first
                if list(tokens[start:start + n]) == tail:
                    cont = list(tokens[start + n:start + n + depth])
                    if cont and cont not in conts:
                        conts.append(cont)
                        if len(conts) == self.branches:
                            break
            if conts:
                return _trie(tokens[-1], conts, max_nodes)
        return None


def _trie(root: int, chains: list[list[int]], max_nodes: int) -> Optional[Tree]:
    tokens, parents = [root], [-1]
    child: dict[tuple[int, int], int] = {}
    for chain in chains:
        cur = 0
        for t in chain:
            nxt = child.get((cur, t))
            if nxt is None:
                if len(tokens) == max_nodes:
                    break
                nxt = len(tokens)
                tokens.append(t)
                parents.append(cur)
                child[(cur, t)] = nxt
            cur = nxt
    return Tree(tokens, parents) if len(tokens) > 1 else None


class SpecControl:
    """How deep to speculate, from measured acceptance and step times: with per-token
    acceptance a, a chain of k draft tokens yields (1 - a^(k+1)) / (1 - a) tokens per step, and
    a sequence's k + 1 tokens cost (1 + c k) of its plain decode step, c the extra cost of a
    verified token (measured on this plan: verify steps against decode steps). The depth with
    the most tokens per unit of time is used; 0 when none beats plain decoding by 2% (the
    draft is not consulted: speculation turned down)."""

    def __init__(self, max_depth: int = 8, max_nodes: int = 16, prior_acceptance: float = 0.5):
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self.prior = prior_acceptance
        self.cost = 0.1                          # extra cost per verified token, smoothed
        self._decode: Optional[float] = None     # seconds of a decode step per sequence, smoothed

    def depth(self, acceptance: float) -> int:
        a = min(max(acceptance, 0.0), 0.99)
        best, arg = 1.02, 0
        for k in range(1, self.max_depth + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (1 + self.cost * k)
            if rate > best:
                best, arg = rate, k
        return arg

    def observe(self, sequences: int, tokens: int, seconds: float) -> None:
        """A model step over ``sequences`` decoding sequences and ``tokens`` tokens took ``seconds``."""
        if sequences <= 0:
            return
        per = seconds / sequences
        if tokens == sequences:
            self._decode = per if self._decode is None else 0.8 * self._decode + 0.2 * per
        elif self._decode:
            c = max(0.0, (per / self._decode - 1) / ((tokens - sequences) / sequences))
            self.cost = 0.8 * self.cost + 0.2 * c


def update_acceptance(acc: float, depth: int, accepted: int) -> float:
    """A request's per-token acceptance rate, smoothed over its verify steps: a step that
    accepted ``accepted`` of a tree ``depth`` deep saw that many acceptances and one rejection
    (none if it accepted the whole depth), as a geometric trial counts them."""
    if depth <= 0:
        return acc
    trials = accepted + (1 if accepted < depth else 0)
    return 0.8 * acc + 0.2 * (accepted / trials)


class Speculation:
    """An engine's speculative decoding: the drafts requests may name, how deep to go, and the
    acceptance of a verified tree (with the request's and the engine's counters)."""

    def __init__(self):
        self.drafts: dict = {"ngram": NgramDraft()}
        self.control = SpecControl()

    def check(self, draft: str, runner) -> None:
        if draft not in self.drafts:
            raise InvalidRequestError(f"speculative draft {draft!r} is not available; use one of "
                                      f"{', '.join(sorted(self.drafts))}")
        if not runner.can_verify:
            raise InvalidRequestError("this artifact has no verify graph (a model with sliding-window attention, or "
                                      "compiled by an older ffc); speculative decoding needs one")

    def trees(self, running, config) -> dict:
        """A draft tree for each decoding request that speculates, as deep as the control finds
        worth it (within its token and length limits)."""
        out = {}
        for req in running:
            if req.draft is None or req.finished or req.num_tokens - req.computed != 1:
                continue
            depth = min(self.control.depth(req.acceptance), req.params.max_new_tokens - len(req.out) - 1,
                        config.max_seq_len - req.num_tokens - 1)
            if depth > 0:
                tree = self.drafts[req.draft].propose(req.prompt + req.out, depth, self.control.max_nodes)
                if tree is not None:
                    out[req] = tree
        return out

    def accept(self, req, tree: Tree, logits: torch.Tensor, stats) -> Accepted:
        p = req.params
        if p.greedy and p.repetition_penalty == 1.0:
            acc = accept_greedy(tree, logits)
        else:
            acc = accept_sampled(tree, logits, p, req.prompt + req.out, req.generator)
        if len(tree.tokens) > 1:
            depth = max(tree.depths())
            req.proposed += depth
            req.accepted += len(acc.path)
            req.acceptance = update_acceptance(req.acceptance, depth, len(acc.path))
            stats.spec_proposed += depth
            stats.spec_accepted += len(acc.path)
            stats.verify_steps += 1
        return acc
