"""Sampling parameters and pure sampling functions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
    """Mask to -inf all but the top_k tokens and the smallest set whose probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [V] a token is drawn from, given the logits [V] of one position: the
    repetition penalty, then greedy (all mass on the argmax) or temperature, top-k and top-p."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(logits).index_fill(0, logits.argmax().view(1), 1.0)
    return torch.softmax(filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p), -1)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator]) -> int:
    """One token from the last-position logits [V] of one sequence."""
    if params.greedy:
        return int(torch.argmax(apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)))
    return int(torch.multinomial(target_probs(logits, seen, params), 1, generator=generator))
