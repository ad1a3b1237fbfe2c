"""The shape of speculative trees: expected accepted tokens per unit of predicted step time,
from the cost model's curve and the measured step times and acceptance (SpecControl)."""
from __future__ import annotations

from typing import Optional, Sequence

from .drafts import trials

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
