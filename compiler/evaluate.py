"""``ffc eval``: accuracy of an artifact on a text, as users of quantized models measure it.

Perplexity as llama.cpp's perplexity tool computes it: the text's tokens in windows of
``ctx`` tokens, each evaluated from an empty cache; the first half of a window is context
only, and each later position's next token is scored (ctx/2 - 1 tokens per window). With a
base artifact (``--kl-divergence BASE``), both run the same windows and, at the scored
positions, the mean KL divergence KL(base || this) of the next-token distributions and how
often the top token agrees (llama.cpp's --kl-divergence statistics).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import FfcError, InvalidRequestError


@dataclass
class EvalResult:
    tokens: int                      # of the text
    windows: int
    ctx: int
    scored: int                      # next-token predictions scored
    nll: float                       # their summed negative log-likelihood (nats)
    seconds: float
    nll_std: float = 0.0             # the spread of the per-token NLLs
    kl: list[float] = field(default_factory=list)     # per scored position, with a base
    top1: int = 0                                     # positions whose top token agrees with the base's

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored)

    @property
    def perplexity_error(self) -> float:
        """The perplexity's standard error, by the delta method as llama.cpp reports it."""
        return self.perplexity * self.nll_std / math.sqrt(self.scored)

    def format(self) -> str:
        lines = [f"perplexity {self.perplexity:.4f} +/- {self.perplexity_error:.4f} over {self.scored} scored tokens ({self.windows} windows of "
                 f"{self.ctx}, {self.tokens} tokens in the text; {self.seconds:.1f} s)"]
        if self.kl:
            kl = torch.tensor(self.kl, dtype=torch.float64)
            lines.append(f"KL divergence from the base: mean {kl.mean():.6f}, median {kl.median():.6f}, "
                         f"99th percentile {kl.quantile(0.99):.6f}, max {kl.max():.6f}")
            lines.append(f"top-1 agreement with the base: {100 * self.top1 / len(self.kl):.2f}%")
        return "\n".join(lines)


def text_tokens(llm, text: str) -> list[int]:
    return llm.tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(tokens: list[int], ctx: int, bos: Optional[int], limit: Optional[int] = None) -> list[list[int]]:
    """The text's whole windows of ``ctx`` tokens; with a BOS token, each window begins with it
    (it replaces the window's first token, as llama.cpp's tool does)."""
    out = [list(tokens[k:k + ctx]) for k in range(0, len(tokens) - ctx + 1, ctx)]
    if bos is not None:
        for w in out:
            w[0] = bos
    return out[:limit] if limit else out


def _window_logits(llm, window: list[int]) -> torch.Tensor:
    pool = llm.engine.pool
    blocks = pool.allocate(pool.blocks_for(len(window)))
    if blocks is None:
        raise InvalidRequestError(f"the KV pool cannot hold a window of {len(window)} tokens; raise kv_cache_memory")
    try:
        return llm.runner.all_logits(window, blocks, pool.tensor).double()
    finally:
        pool.free(blocks)


def evaluate(llm, text: str, ctx: int = 512, base=None, max_windows: Optional[int] = None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> EvalResult:
    """Perplexity of ``llm`` on ``text`` (and KL divergence / top-1 agreement against ``base``)."""
    if ctx < 4 or ctx > llm.max_seq_len:
        raise InvalidRequestError(f"--ctx {ctx} must be in 4..{llm.max_seq_len} (the artifact's max_seq_len)")
    tokens = text_tokens(llm, text)
    bos = llm.tokenizer.bos_token_id if getattr(llm.tokenizer, "add_bos_token", False) else None
    ws = windows(tokens, ctx, bos, max_windows)
    if not ws:
        raise InvalidRequestError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    if base is not None and text_tokens(base, text) != tokens:
        raise FfcError("the base artifact's tokenizer splits the text differently; KL needs the same tokens")
    first = ctx // 2
    t0 = time.perf_counter()
    res = EvalResult(len(tokens), len(ws), ctx, 0, 0.0, 0.0)
    nlls = []
    for k, w in enumerate(ws):
        lp = torch.log_softmax(_window_logits(llm, w)[first:ctx - 1], -1)      # predicts w[first + 1:]
        target = torch.tensor(w[first + 1:])
        nll = -lp.gather(1, target[:, None])[:, 0]
        nlls.append(nll)
        if base is not None:
            bp = torch.log_softmax(_window_logits(base, w)[first:ctx - 1], -1)
            res.kl += (bp.exp() * (bp - lp)).sum(-1).tolist()
            res.top1 += int((bp.argmax(-1) == lp.argmax(-1)).sum())
        progress(k + 1, len(ws))
    all_nll = torch.cat(nlls)
    res.scored, res.nll, res.seconds = len(all_nll), float(all_nll.sum()), time.perf_counter() - t0
    res.nll_std = float(all_nll.std()) if len(all_nll) > 1 else 0.0
    return res


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FfcError(f"cannot read the text file {path!r}: {e.strerror}") from None
