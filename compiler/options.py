"""Compile options: frozen, validated, hashed into the artifact manifest.

Everything that changes what a compile writes is an option here, so ``options_hash`` covers
it: the strategy search's device profile, memory limit and workload included.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Optional

from ffc.ir.quant import QuantPolicy
from ffc.ir.strategy import Workload
from ffc.ir.types import KV_DTYPES, WEIGHT_DTYPES, DType, parse_dtype
from ffc.plan.schema import Target

from .errors import InvalidRequestError

MAX_SEQ_LEN_CAP = 2048  # default cap: the KV cache is sized for this many positions per sequence


@dataclass(frozen=True)
class CompileOptions:
    max_seq_len: Optional[int] = None  # None: the model's context, capped at MAX_SEQ_LEN_CAP
    dtype: DType = DType.F32      # storage type of linear/embedding weights; computation is f32
    target: Target = Target.CPU
    quant: QuantPolicy = field(default_factory=QuantPolicy)   # quantized weight storage (--quant)
    kv_dtype: DType = DType.F32   # storage of the KV cache (--kv-dtype)
    allow_pickle: bool = False
    codegen: bool = True          # generate and build kernels (False: interpreter-only artifact)
    prefill_tokens: int = 2048    # tokens per prefill step (longer prompts run in chunks)
    max_batch: int = 128          # sequences per decode step and logit rows per prefill step
    kv_block_size: int = 16       # positions per paged-KV-cache block
    tp: int = 1                   # tensor-parallel ranks
    pp: int = 1                   # pipeline stages
    # the strategy search's inputs (used when tp * pp > 1)
    profile: str = "local"        # device profile: a built-in name, "local" (calibrated) or a JSON path
    memory_per_device: Optional[int] = None   # bytes per rank; None: the profile's device memory
    workload: Workload = field(default_factory=Workload)
    memory_budget: Optional[int] = None   # bytes of RAM loads plan offloaded weights for (--memory-budget)

    def __post_init__(self):
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise InvalidRequestError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError:
            dtype = None
        if dtype not in WEIGHT_DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r} is not supported; use one of fp32, bf16, fp16")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.quant, QuantPolicy):
            raise InvalidRequestError(f"quant must be a QuantPolicy, got {self.quant!r}")
        try:
            kv = parse_dtype(self.kv_dtype)
        except ValueError:
            kv = None
        if kv not in KV_DTYPES:
            raise InvalidRequestError(f"kv_dtype {self.kv_dtype!r} is not supported; use one of fp32, bf16, fp16, int8")
        object.__setattr__(self, "kv_dtype", kv)
        try:
            object.__setattr__(self, "target", Target(self.target))
        except ValueError:
            raise InvalidRequestError(f"target {self.target!r} is not supported; use one of "
                                      f"{', '.join(t.value for t in Target)}") from None
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
        if not isinstance(self.profile, str) or not self.profile:
            raise InvalidRequestError(f"profile must be a profile name or a JSON path, got {self.profile!r}")
        for name in ("memory_per_device", "memory_budget"):
            m = getattr(self, name)
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
                raise InvalidRequestError(f"{name} must be a positive number of bytes, got {m!r}")
        if not isinstance(self.workload, Workload):
            raise InvalidRequestError(f"workload must be a Workload, got {self.workload!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = self.target.value
        d["dtype"] = self.dtype.value
        d["kv_dtype"] = self.kv_dtype.value
        d["workload"] = {k: (v.value if isinstance(v, Enum) else v) for k, v in d["workload"].items()}
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
