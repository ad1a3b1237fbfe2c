"""Compile options: frozen, validated, hashed into the artifact manifest."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import InvalidRequestError

MAX_SEQ_LEN_CAP = 2048  # default cap: the KV cache is sized for this many positions per sequence
DTYPES = ("fp32", "bf16", "fp16")   # storage type of weights; computation is fp32
TARGETS = ("cpu", "cuda")


@dataclass(frozen=True)
class CompileOptions:
    max_seq_len: Optional[int] = None  # None: the model's context, capped at MAX_SEQ_LEN_CAP
    dtype: str = "fp32"
    target: str = "cpu"
    allow_pickle: bool = False
    codegen: bool = True          # generate and build kernels (False: interpreter-only artifact)
    prefill_tokens: int = 2048    # tokens per prefill step (longer prompts run in chunks)
    max_batch: int = 128          # sequences per decode step and logit rows per prefill step
    kv_block_size: int = 16       # positions per paged-KV-cache block
    tp: int = 1                   # tensor-parallel ranks
    pp: int = 1                   # pipeline stages

    def __post_init__(self):
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise InvalidRequestError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.target not in TARGETS:
            raise InvalidRequestError(f"target {self.target!r} is not supported; use one of {', '.join(TARGETS)}")
        if not isinstance(self.kv_block_size, int) or isinstance(self.kv_block_size, bool) \
                or not 1 <= self.kv_block_size <= 1024:
            raise InvalidRequestError(f"kv_block_size must be an integer in 1..1024, got {self.kv_block_size!r}")
        for name in ("tp", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise InvalidRequestError(f"{name} must be an integer in 1..64, got {v!r}")
        for name in ("prefill_tokens", "max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65536:
                raise InvalidRequestError(f"{name} must be an integer in 1..65536, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
