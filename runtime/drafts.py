"""Drafts for speculative decoding: the token trees they propose, prompt lookup, and draft
models (another artifact, or the compiler's self-draft) with their own KV cache."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ffc.errors import InvalidRequestError
from ffc.ir.attention import TREE_NODES

from .kv_cache import BlockPool
from .model_runner import Chunk

if TYPE_CHECKING:
    from .spec_control import SpecControl


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


def trials(depth: int, accepted: int) -> int:
    """A verified chain ``depth`` deep of which ``accepted`` tokens were taken, counted as
    geometric trials: that many acceptances and, short of the whole depth, one rejection."""
    return accepted + (1 if accepted < depth else 0)


class NgramDraft:
    """Prompt lookup: the continuations that followed earlier occurrences of the sequence's
    ending (the prompt's and the text's so far) are proposed, the occurrences whose match with
    the ending is longest first (the latest among equals); up to ``branches`` different
    continuations become branches of one tree (their common prefixes shared).

    How far a continuation holds depends mostly on how long the match is: an ending of one
    common token recurs everywhere, eight tokens matched verbatim mean the text is being copied.
    And each proposed token the target accepts makes the match one token longer: a proposal
    from a one-token match is a coin toss at its first token and a copy after a few. So
    acceptance is counted per match length (buckets of ``BUCKETS``, smoothed, with priors),
    over every verified proposal of any request, a token at depth i of a proposal from a match
    of m tokens counting for m + i - 1; a proposal's tree is shaped by those rates along its
    depths (``expect``). A proposal's first token is rated by its match and by how many of the
    ending's earlier occurrences it followed (``agreement``: a token that followed every one
    of them is taken several times as often as one that followed a few), each pair with its
    own counts."""

    kind = "ngram"
    MAX_MATCH = 32                           # match lengths counted up to
    BUCKETS = (1, 2, 3, 4, 8, 16)            # bucket i: matches of at least BUCKETS[i] tokens
    PRIOR = (0.3, 0.45, 0.6, 0.7, 0.8, 0.9)  # per-token acceptance before any is measured
    WEIGHT = 8.0                             # the prior counts as this many trials
    AGREE = (1.0, 0.5)                       # agreement class i: at least this share of the occurrences
    AGREE_PRIOR = (1.2, 0.9, 0.6)            # a first token's prior: the match's, times this per class

    def __init__(self, branches: int = 2):
        self.branches = branches
        self.hits = [p * self.WEIGHT for p in self.PRIOR]
        self.trials = [self.WEIGHT] * len(self.PRIOR)
        self.first_hits = [[min(p * f, 0.95) * self.WEIGHT for f in self.AGREE_PRIOR] for p in self.PRIOR]
        self.first_trials = [[self.WEIGHT] * len(self.AGREE_PRIOR) for _ in self.PRIOR]
        self._found: tuple = (None, [])      # the last lookup: (the token list looked in, its matches)

    def lookup(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """(match length, end position) of earlier occurrences of the tokens' ending, longest
        match first, the latest among equals."""
        if self._found[0] is tokens:          # expect() then propose() on the same list
            return self._found[1]
        n_tok, last = len(tokens), tokens[-1]
        found, p = [], -1
        while True:                           # the ending's last token's occurrences (searched in C)
            try:
                p = tokens.index(last, p + 1, n_tok - 1)
            except ValueError:
                break
            n = 1
            while n < self.MAX_MATCH and p - n >= 0 and tokens[p - n] == tokens[n_tok - 1 - n]:
                n += 1
            found.append((n, p))
        found.reverse()
        found.sort(key=lambda f: -f[0])       # stable: the latest first among equal lengths
        self._found = (tokens, found)
        return found

    def bucket(self, match: int) -> int:
        return _BUCKET_OF[min(match, len(_BUCKET_OF) - 1)]

    def agreement(self, tokens: Sequence[int], found: list) -> int:
        """The class (``AGREE``) of the share of the ending's earlier occurrences (``lookup``)
        that the proposal's first token followed."""
        share = [tokens[p + 1] for _, p in found].count(tokens[found[0][1] + 1]) / len(found)
        return next((i for i, lo in enumerate(self.AGREE) if share >= lo), len(self.AGREE))

    def expect(self, tokens: Sequence[int], depth: int) -> Optional[tuple[list[float], tuple[int, int]]]:
        """(the acceptance of each of the first ``depth`` tokens given the ones before it, the
        proposal's key: its match length and agreement class) of the proposal ``propose`` would
        make now; None when the ending occurs nowhere before (nothing to propose)."""
        found = self.lookup(tokens)
        if not found:
            return None
        m, c = found[0][0], self.agreement(tokens, found)
        rates = [h / t for h, t in zip(self.hits, self.trials)]
        return [self.rate(m, c)] + [rates[self.bucket(m + i)] for i in range(1, depth)], (m, c)

    def rate(self, match: int, agreement: Optional[int] = None) -> float:
        """A token's acceptance after a match of ``match`` tokens (a first token's, given its
        agreement class)."""
        b = self.bucket(match)
        if agreement is not None:
            return self.first_hits[b][agreement] / self.first_trials[b][agreement]
        return self.hits[b] / self.trials[b]

    def observe(self, key: tuple[int, int], depth: int, accepted: int) -> None:
        """A verified proposal (``key``: from a match of m tokens, agreement class c): ``accepted``
        of ``depth`` tokens, each a trial of the match length it extended (see ``trials``), the
        first one also of (m, c)."""
        decay = 1 - 1 / (4 * self.WEIGHT)     # old counts fade: the text being written changes
        match, c = key
        b = self.bucket(match)
        self.first_hits[b][c] = self.first_hits[b][c] * decay + (accepted > 0)
        self.first_trials[b][c] = self.first_trials[b][c] * decay + 1
        for i in range(trials(depth, accepted)):
            b = self.bucket(match + i)
            self.hits[b] = self.hits[b] * decay + (i < accepted)
            self.trials[b] = self.trials[b] * decay + 1

    def propose(self, tokens: Sequence[int], depth: int, max_nodes: int) -> Optional[Tree]:
        conts: list[list[int]] = []
        for _, end in self.lookup(tokens):
            cont = list(tokens[end + 1:end + 1 + depth])
            if cont and cont not in conts:
                conts.append(cont)
                if len(conts) == self.branches:
                    break
        return _trie(tokens[-1], conts, max_nodes) if conts else None


# NgramDraft.bucket by match length (a match is at least one token; a longer one, the last bucket's)
_BUCKET_OF = [max((i for i, lo in enumerate(NgramDraft.BUCKETS) if m >= lo), default=0)
              for m in range(NgramDraft.BUCKETS[-1] + 1)]


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


class ModelDraft:
    """A draft model: a compiled artifact with the target's tokenizer (another model of the
    family, a quantized copy, or the compiler's self-draft), run with its own paged KV cache.
    Per sequence it keeps the tokens whose K/V its cache holds; a proposal first catches up
    with what the target committed since (one prefill chunk per sequence, all sequences in
    one call), then runs its chain one decode step per depth for all sequences together. The
    chain is its argmax at each depth; a depth of width w adds its next w - 1 candidates as
    leaves beside the chain node. Proposals are point masses (exact under sampling too: see
    ``accept_sampled``)."""

    kind = "model"
    RANKS = 4                  # candidates remembered per depth, to learn b(w) at every rejection
    MIN_LEFT = 16              # tokens a request is taken to have left before answers' lengths are known

    def __init__(self, llm, name: str, vocab_size: int, acceptance: Optional[float] = None,
                 cost: Optional[float] = None, max_sequences: int = 64):
        self.llm, self.name = llm, name
        self.runner = llm.runner
        self.vocab_size = vocab_size            # the target's: candidates beyond it are never proposed
        self.max_len = llm.max_seq_len
        self.pool = BlockPool.for_budget(llm.cache_type, self.runner.blocks_per_seq, None,
                                         max_sequences * self.runner.blocks_per_seq, memory=llm.memory,
                                         prefix_caching=False)
        self.prior_acceptance = acceptance      # from calibration (a self-draft's manifest), if known,
        self.acceptance: Optional[float] = None  # and as measured over all requests (a new one's prior)
        self.cost = 0.25 if cost is None else cost     # a draft step per sequence / a target decode step's share
        self.costs: dict[int, float] = {}       # the same measured, by the sequences drafted together
        self.catchup: Optional[float] = None    # seconds per token of catching up, measured
        self.sunk = 0.0                         # seconds of large catch-ups (one-off), since read
        self.misses, self.rank_hits = 8.0, [2.0, 1.0, 0.5]   # b(w) counts with a weak prior
        self.seqs: dict[str, _DraftSeq] = {}
        self.calls = 0

    def _measure(self, control, batch: int, catch_s: float, caught: int, steps_s: float, steps: int) -> None:
        """The chain's decode steps (and a catch-up call over the one or few tokens the target
        committed since: another step) give the cost of a draft step per sequence, relative to
        a plain step's share at this batch; a catch-up call over many tokens, the seconds per
        token of catching up (what a sequence the draft fell behind on costs to resume)."""
        self.calls += 1
        if self.calls == 1:                  # the first call pays one-time set-up
            return
        share = control.share(batch)
        if caught <= 4 * batch:              # steady state: the catch-up call is one more step
            steps_s, steps = steps_s + catch_s, steps + batch
        if share is not None and steps:
            now = steps_s / steps / share
            old = self.costs.get(batch)       # a batch size not seen before: its first measurement
            self.costs[batch] = now if old is None else 0.8 * old + 0.2 * now
        if caught >= 8 * batch:
            self.catchup = catch_s / caught if self.catchup is None else 0.8 * self.catchup + 0.2 * catch_s / caught
            self.sunk += catch_s

    def lag(self, req) -> int:
        """Tokens of ``req`` the draft's cache lacks (all of them before its first proposal)."""
        st = self.seqs.get(req.id)
        return req.num_tokens - (len(st.tokens) if st is not None else 0)

    def catchup_cost(self, req, control, batch: int, left: int) -> float:
        """Catching up with ``req`` (see ``lag``), spread over the ``left`` tokens it is likely
        still to write (most answers stop well before their limit), relative to a plain step's
        share: what speculating on it costs per token beyond the draft's steps."""
        share = control.share(batch)
        if share is None:
            return 0.0
        return self.catchup_seconds(req, share) / max(1, left) / share

    def catchup_seconds(self, req, share: float) -> float:
        """Seconds to catch up with ``req`` (measured per token; before that, a prefill token
        taken as a fifth of a draft decode step); ``share``: a plain step's share t(B) / B."""
        per_token = self.catchup if self.catchup is not None else self.cost * share / 5
        return max(0, self.lag(req) - 1) * per_token

    def cost_at(self, batch: int, control: "SpecControl") -> float:
        """A draft step per sequence relative to a plain step's share, with ``batch`` sequences:
        measured at that batch; else from the nearest measured batch, taking the draft's step
        time as unchanged while the target's changes as measured (cautious for larger batches:
        a draft step is not assumed to get cheaper per sequence as fast as the target's)."""
        if batch in self.costs:
            return self.costs[batch]
        ref = min(self.costs, key=lambda b: (abs(b - batch), b)) if self.costs else 1
        base = self.costs.get(ref, self.cost)
        a, b = control.step_time(ref, verify=False), control.step_time(batch, verify=False)
        return base if a is None or b is None else base * (batch / ref) * (a / b)

    def alt(self) -> list[float]:
        """b(2), b(3), ...: the target's token among the draft's next candidates after a rejection."""
        out, acc = [], 0.0
        for h in self.rank_hits:
            acc += h
            out.append(acc / self.misses)
        return out

    def release(self, alive: set) -> None:
        """Free the cache of sequences no longer running."""
        for rid in [r for r in self.seqs if r not in alive]:
            self.pool.free(self.seqs.pop(rid).blocks)

    def propose_batch(self, items: Sequence[tuple], control: "SpecControl") -> dict:
        """items: (request, its tokens, widths per depth); a tree per request (within its pool)."""
        t0 = time.perf_counter()
        work, chunks = [], []
        for req, toks, widths in items:
            n = len(toks)
            widths = list(widths[:max(0, self.max_len - n)])
            st = self.seqs.setdefault(req.id, _DraftSeq())
            if not widths:
                continue
            valid = 0
            for x, y in zip(st.tokens, toks[:n - 1]):
                if x != y:
                    break
                valid += 1
            need = self.pool.blocks_for(n - 1 + len(widths))
            if len(st.blocks) < need:
                more = self.pool.allocate(need - len(st.blocks))
                if more is None:             # the draft's pool is full: this one decodes plainly
                    continue
                st.blocks += more
            chunks.append(Chunk(list(toks[valid:n]), valid, list(st.blocks)))
            st.tokens = list(toks)
            st.alts = []
            work.append((req, st, widths, Tree([toks[-1]], [-1]), n))
        if not work:
            return {}
        logits = self.runner.forward(chunks, self.pool.tensor)
        t1 = time.perf_counter()
        caught = sum(len(c.tokens) for c in chunks)
        chain = [0] * len(work)            # each tree's chain node at the current depth
        steps = 0
        for d in range(max(len(w[2]) for w in work)):
            step = []
            for k, (req, st, widths, tree, n) in enumerate(work):
                if d >= len(widths):
                    continue
                top = logits[k, :self.vocab_size].topk(max(widths[d], self.RANKS)).indices.tolist()
                st.alts.append(top)
                parent = chain[k]
                for r in range(widths[d]):
                    tree.tokens.append(top[r])
                    tree.parents.append(parent)
                    if r == 0:
                        chain[k] = len(tree.tokens) - 1
                if d + 1 < len(widths):
                    step.append(k)
                    st.tokens.append(top[0])
            if not step:
                break
            part = self.runner.forward([Chunk([work[k][1].tokens[-1]], len(work[k][1].tokens) - 1, work[k][1].blocks)
                                        for k in step], self.pool.tensor)
            steps += len(step)
            rows = torch.zeros(len(work), part.shape[1], dtype=part.dtype)
            rows[step] = part
            logits = rows
        self._measure(control, len(work), t1 - t0, caught, time.perf_counter() - t1, steps)
        out = {}
        for req, st, widths, tree, _ in work:
            tree.q = [None] * len(tree.tokens)
            out[req] = tree
        return out

    def observe(self, req, chain_accepted: int, target_tokens: Sequence[int]) -> None:
        """After verification: where the chain was rejected, the rank of the target's token among
        the draft's candidates at that depth."""
        st = self.seqs.get(req.id)
        if st is not None and st.alts:
            rate = chain_accepted / trials(len(st.alts), chain_accepted)
            self.acceptance = rate if self.acceptance is None else 0.95 * self.acceptance + 0.05 * rate
        if st is None or chain_accepted >= len(st.alts) or chain_accepted >= len(target_tokens):
            return
        self.misses += 1
        top = st.alts[chain_accepted]
        t = target_tokens[chain_accepted]
        if t in top[1:self.RANKS]:
            self.rank_hits[top.index(t) - 1] += 1


@dataclass
class _DraftSeq:
    blocks: list = field(default_factory=list)
    tokens: list = field(default_factory=list)    # those whose K/V the draft's cache holds
    alts: list = field(default_factory=list)      # the last proposal's ranked candidates per depth


class LookupFirst:
    """Prompt lookup and a draft model for one request ("ngram+self", "ngram+PATH"): at each
    step, prompt lookup's tree where the control predicts it at least the speed-up of the
    model's (it costs no draft steps: where the text is being copied), else the model's (where
    there is nothing to look up, or only a short match). Over the stretches lookup drafts, the
    model's cache falls behind the text; it catches up (one prefill chunk) when next asked, a
    cost its plan is charged with meanwhile (``ModelDraft.catchup_cost``)."""

    kind = "lookup+model"

    def __init__(self, lookup: NgramDraft, model: ModelDraft):
        self.lookup, self.model = lookup, model
