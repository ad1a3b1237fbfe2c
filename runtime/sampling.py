"""Sampling parameters and pure sampling functions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ffc.errors import InvalidRequestError


MAX_SEED = 2 ** 63 - 1     # a generator's seed (torch takes < 2**64: room for generate()'s seed + k per prompt)


def check_seed(seed, name: str = "seed") -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InvalidRequestError(f"invalid {name}={seed!r}: must be an integer in 0..{MAX_SEED} or None")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name, value, want):
            raise InvalidRequestError(f"invalid {name}={value!r}: {want}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            bad("temperature", self.temperature, "must be a number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 disables it)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", self.repetition_penalty, "must be a number > 0 (1 disables it)")
        check_seed(self.seed)
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            bad("stop", self.stop, "must be a string or a list of strings")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            bad("stop", self.stop, "must be non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): seen tokens' positive logits / p, negative * p.
    logits: [V]; seen: [n] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    s = logits[seen]
    logits[seen] = torch.where(s < 0, s * penalty, s / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask to -inf all but the top_k tokens and the smallest set whose probability >= top_p,
    along the last dimension (one row [V] or a batch of rows [N, V])."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [V] a token is drawn from, given the logits [V] of one position: the
    repetition penalty, then greedy (all mass on the argmax) or temperature, top-k and top-p."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(logits).index_fill(0, logits.argmax().view(1), 1.0)
    return torch.softmax(filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p), -1)


def draw(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """One token per row of ``probs`` [N, V] (rows sum to > 0): row i by inverse transform
    sampling with one uniform from ``generators[i]`` (torch's default one where None), so a
    seeded request's tokens do not depend on the rows it is drawn with."""
    u = torch.tensor([float(torch.rand((), dtype=torch.float64, generator=g)) for g in generators],
                     dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).tolist()
    last = probs.shape[-1]
    # u * total can round up to the total itself: then the last token with any mass
    return [t if t < last else int(probs[i].nonzero().max()) for i, t in enumerate(picked)]


def sample_rows(logits: torch.Tensor, rows: Sequence[tuple[SamplingParams, torch.Tensor,
                                                            Optional[torch.Generator]]]) -> list[int]:
    """The next token of each sequence: ``logits`` [N, V] the last positions' logits, ``rows``
    (params, seen token ids, generator) per row. Rows with the same temperature, top-k and
    top-p are filtered and drawn together (one softmax, one sort per group, not per sequence)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, _, _) in enumerate(rows):
        groups.setdefault((p.temperature, p.top_k, p.top_p) if not p.greedy else None, []).append(i)
    out = [0] * len(rows)
    for key, idx in groups.items():
        lg = logits[idx].float()
        for j, i in enumerate(idx):
            p, seen, _ = rows[i]
            if p.repetition_penalty != 1.0:
                lg[j] = apply_repetition_penalty(lg[j], seen, p.repetition_penalty)
        if key is None:
            picked = lg.argmax(-1).tolist()
        else:
            temperature, top_k, top_p = key
            picked = draw(torch.softmax(filter_top_k_top_p(lg / temperature, top_k, top_p), -1),
                          [rows[i][2] for i in idx])
        for i, t in zip(idx, picked):
            out[i] = t
    return out
