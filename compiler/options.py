"""Compile options: frozen, validated, hashed into the artifact manifest."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import InvalidRequestError

MAX_SEQ_LEN_CAP = 2048  # default cap: the KV cache is sized for this many positions per sequence


@dataclass(frozen=True)
class CompileOptions:
    max_seq_len: Optional[int] = None  # None: the model's context, capped at MAX_SEQ_LEN_CAP
    dtype: str = "fp32"
    target: str = "cpu"
    allow_pickle: bool = False

    def __post_init__(self):
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise InvalidRequestError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if self.dtype != "fp32":
            raise InvalidRequestError(f"dtype {self.dtype!r} is not supported yet; use fp32")
        if self.target != "cpu":
            raise InvalidRequestError(f"target {self.target!r} is not supported yet; use cpu")

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
