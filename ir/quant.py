"""Quantized weight formats: their blocks, the reference quantizer and dequantizer.

A quantized weight is a 2-D ``[N, K]`` matrix whose rows are stored as blocks along K, as the
GGUF file format stores them (``gguf.GGML_QUANT_SIZES``); the storage tensor is uint8
``[N, K / block * block_bytes]`` (per-row int8: ``[N, K + 4]``). The formats:

    q4_0   32 per block, 18 B: d (f16), 16 B of nibbles          w = d * (q - 8)
    q4_1   32 per block, 20 B: d, m (f16), 16 B of nibbles       w = d * q + m
    q8_0   32 per block, 34 B: d (f16), 32 int8                  w = d * q
    q4_k   256 per block, 144 B: d, dmin (f16), 8 x (6-bit sc, 6-bit m), 128 B of nibbles
                                                                 w = (d * sc) * q - dmin * m
    q6_k   256 per block, 210 B: 4+2-bit values, 16 int8 scales, d (f16)
                                                                 w = (d * sc) * (q - 32)
    i4g64  ffc's int4 with groups of 64 (FlexGen's asymmetric min/scale), 36 B: d, m (f16),
           32 B of nibbles (low: the first 32 values)            w = d * q + m
    i8r    ffc's int8 with one f32 scale per row: K int8 then the scale   w = s * q

``unpack`` splits storage into integer values and per-block scales (the one decoder: the
reference dequantizer and the runtime's panel packer both read it), and ``dequantize``
computes floats in the order the ``gguf`` package does, so the result equals
``gguf.quants.dequantize`` bit for bit. ``quantize`` makes a format from float weights (the
GGUF formats as llama.cpp's reference quantizer does, through ``gguf.quants``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np
import torch
from gguf import quants

from ffc.choices import QUANT_MODES
from ffc.errors import InvalidRequestError

from .types import QUANT, DType, QuantInfo

QK_K = 256


GGUF_FORMATS = {q.gguf: d for d, q in QUANT.items() if q.gguf}


def info(fmt: DType) -> QuantInfo:
    q = QUANT.get(DType(fmt))
    if q is None:
        raise ValueError(f"{fmt} is not a quantized format; quantized: {', '.join(str(d) for d in QUANT)}")
    return q


# values of one integer dot-product step of the kernels (runtime/qpanels.py packs K in chunks of it)
KERNEL_CHUNK = 32


def row_multiple(fmt: DType) -> int:
    """K must be a multiple of this for ``fmt``'s blocks (i8r, one scale per row: of the
    kernels' chunk)."""
    return info(fmt).block or KERNEL_CHUNK


def _blocks(storage: torch.Tensor, fmt: DType, k: int) -> torch.Tensor:
    q = info(fmt)
    n = storage.shape[0]
    if storage.dtype != torch.uint8 or storage.dim() != 2 or storage.shape[1] != fmt.storage_cols(k):
        raise ValueError(f"{fmt} storage of a [{n}, {k}] weight must be uint8 [{n}, {fmt.storage_cols(k)}], "
                         f"got {storage.dtype} {list(storage.shape)}")
    return storage.reshape(n, k // q.block, q.block_bytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """The float16 at the first two bytes of each row of ``b`` (little endian), as f32."""
    return b[..., :2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> values [..., 2n]: the low nibbles first, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


@dataclass(frozen=True)
class Unpacked:
    """A quantized weight as integer values [N, K] and per-block scales (see the module doc)."""
    fmt: DType
    q: torch.Tensor                      # uint8 (int8 for q8_0 / i8r) [N, K]
    d: torch.Tensor                      # f32 [N, K / group] (q4_k, q6_k: per 256; i8r: [N, 1])
    m: Optional[torch.Tensor] = None     # q4_1 / i4g64: f32 [N, K / group]; q4_k: dmin [N, K / 256]
    sc: Optional[torch.Tensor] = None    # q4_k: uint8 [N, K / 32]; q6_k: int8 [N, K / 16]
    mq: Optional[torch.Tensor] = None    # q4_k: uint8 mins [N, K / 32]


def _q4k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes of each Q4_K block -> 8 scales and 8 mins (6 bits each)."""
    s = s.to(torch.int32)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).to(torch.uint8), torch.cat([lo_m, hi_m], -1).to(torch.uint8)


def unpack(storage: torch.Tensor, fmt: DType, k: int) -> Unpacked:
    fmt = DType(fmt)
    n = storage.shape[0]
    if fmt is DType.I8R:
        if storage.dtype != torch.uint8 or tuple(storage.shape) != (n, k + 4):
            raise ValueError(f"i8r storage of a [{n}, {k}] weight must be uint8 [{n}, {k + 4}], got "
                             f"{storage.dtype} {list(storage.shape)}")
        return Unpacked(fmt, storage[:, :k].view(torch.int8), storage[:, k:].contiguous().view(torch.float32))
    b = _blocks(storage, fmt, k)
    if fmt is DType.Q4_0:
        return Unpacked(fmt, _nibbles(b[..., 2:]).reshape(n, k), _f16(b))
    if fmt in (DType.Q4_1, DType.I4G64):
        return Unpacked(fmt, _nibbles(b[..., 4:]).reshape(n, k), _f16(b), _f16(b[..., 2:]))
    if fmt is DType.Q8_0:
        return Unpacked(fmt, b[..., 2:].contiguous().view(torch.int8).reshape(n, k), _f16(b))
    if fmt is DType.Q4_K:
        sc, mq = _q4k_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(n, -1, 4, 32)                    # 4 chunks of 64 values per block
        return Unpacked(fmt, _nibbles(qs).reshape(n, k), _f16(b), _f16(b[..., 2:]), sc.reshape(n, -1),
                        mq.reshape(n, -1))
    if fmt is DType.Q6_K:
        ql = b[..., :128].reshape(n, -1, 2, 64)                   # two halves of 128 values
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
        lo = _nibbles(ql)                                          # [n, blocks, 2, 128]
        hi = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)) & 3).reshape(n, -1, 2, 128)
        q = lo | (hi << 4)
        return Unpacked(fmt, q.reshape(n, k), _f16(b[..., 208:]),
                        sc=b[..., 192:208].contiguous().view(torch.int8).reshape(n, -1))
    raise ValueError(f"no unpacking for {fmt}")


def dequantize(storage: torch.Tensor, fmt: DType, k: Optional[int] = None) -> torch.Tensor:
    """f32 [N, K] of a quantized weight, as the gguf package computes it (bit for bit)."""
    fmt = DType(fmt)
    if k is None:
        k = k_of(fmt, storage.shape[-1])
    u = unpack(storage, fmt, k)
    n = storage.shape[0]

    def per(t: torch.Tensor, group: int) -> torch.Tensor:        # [n, K / group] -> [n, K / group, 1]
        return t.reshape(n, k // group, 1)
    if fmt is DType.I8R:
        return u.q.float() * u.d
    if fmt in (DType.Q4_0, DType.Q8_0):
        g = info(fmt).block
        q = u.q.to(torch.int16) - 8 if fmt is DType.Q4_0 else u.q
        return (per(u.d, g) * q.float().reshape(n, -1, g)).reshape(n, k)
    if fmt in (DType.Q4_1, DType.I4G64):
        g = info(fmt).block
        return (per(u.d, g) * u.q.float().reshape(n, -1, g) + per(u.m, g)).reshape(n, k)
    if fmt is DType.Q4_K:
        d = (per(u.d, QK_K) * u.sc.float().reshape(n, -1, 8)).reshape(n, -1, 1)
        dm = (per(u.m, QK_K) * u.mq.float().reshape(n, -1, 8)).reshape(n, -1, 1)
        return (d * u.q.float().reshape(n, -1, 32) - dm).reshape(n, k)
    if fmt is DType.Q6_K:
        d = (per(u.d, QK_K) * u.sc.float().reshape(n, -1, 16)).reshape(n, -1, 1)
        q = (u.q.to(torch.int16) - 32).float().reshape(n, -1, 16)
        return (d * q).reshape(n, k)
    raise ValueError(f"no dequantizer for {fmt}")


def k_of(fmt: DType, cols: int) -> int:
    """Values per row of a storage row of ``cols`` bytes."""
    q = info(fmt)
    return cols - q.block_bytes if q.block == 0 else cols // q.block_bytes * q.block


def _to_f16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def quantize(w: torch.Tensor, fmt: DType) -> torch.Tensor:
    """uint8 storage of float weights ``w`` [N, K] in ``fmt``. GGUF formats through the gguf
    package's reference quantizer (llama.cpp's rounding); ffc's own formats here."""
    fmt = DType(fmt)
    w = w.detach().float().contiguous()
    if w.dim() != 2:
        raise ValueError(f"only 2-D weights are quantized, got {list(w.shape)}")
    n, k = w.shape
    if k % row_multiple(fmt):
        raise ValueError(f"a row of {k} values is not a whole number of {fmt} blocks of {row_multiple(fmt)}")
    q = info(fmt)
    if q.gguf:
        data = quants.quantize(w.numpy(), gguf.GGMLQuantizationType[q.gguf])
        return torch.from_numpy(np.ascontiguousarray(data)).reshape(n, fmt.storage_cols(k))
    if fmt is DType.I8R:
        s = w.abs().amax(dim=1, keepdim=True) / 127.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        vals = torch.round(w * inv).clamp(-127, 127).to(torch.int8)
        return torch.cat([vals.view(torch.uint8), s.contiguous().view(torch.uint8)], dim=1)
    if fmt is DType.I4G64:      # asymmetric: min and scale per group (FlexGen's group-wise int4)
        g = w.reshape(n, -1, 64)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = (hi - lo) / 15.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        vals = torch.floor((g - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
        packed = vals[..., :32] | (vals[..., 32:] << 4)
        return torch.cat([_to_f16_bytes(d[..., 0]), _to_f16_bytes(lo[..., 0]), packed], dim=-1).reshape(n, -1)
    raise ValueError(f"ffc cannot quantize to {fmt} (it is read from GGUF files only)")


# --quant choices (CLI spelling -> format of the linears); "gguf": each weight as its file stores it
QUANT_CHOICES = {"q4_0": DType.Q4_0, "q4_1": DType.Q4_1, "q8_0": DType.Q8_0, "int4-g32": DType.Q4_1,
                 "int4-g64": DType.I4G64, "int8": DType.I8R}
# tensor classes a policy places: the linears of the layers, the output projection, the embedding
TENSOR_CLASSES = ("linear", "lm_head", "embed")


@dataclass(frozen=True)
class QuantPolicy:
    """Which storage format each class of weight gets (``ffc compile --quant MODE
    --quant-skip CLASSES``). ``gguf``: every weight keeps the blocks its GGUF file holds (float
    tensors of the file stay float). A format: the linears get it; the lm_head and embedding
    get q8_0 when the format has 4-bit values (as llama.cpp keeps its output tensor at higher
    precision), else the same format. ``skip``: classes kept in float (the --dtype)."""
    mode: str = "none"
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise InvalidRequestError(f"--quant {self.mode!r} is not a quantization mode; use one of "
                                      f"{', '.join(QUANT_MODES)}")
        skip = tuple(sorted(set(self.skip)))
        bad = [s for s in skip if s not in TENSOR_CLASSES[1:]]
        if bad:
            raise InvalidRequestError(f"--quant-skip {','.join(bad)} names no tensor class; use lm_head and/or embed")
        object.__setattr__(self, "skip", skip)

    @staticmethod
    def parse(mode: Optional[str], skip=None) -> "QuantPolicy":
        if isinstance(skip, str):
            skip = [s.strip() for s in skip.split(",") if s.strip()]
        return QuantPolicy(mode or "none", tuple(skip or ()))

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def format_for(self, cls: str, source: Optional[DType] = None) -> Optional[DType]:
        """The format of a weight of class ``cls`` (``source``: what its GGUF file holds, None
        for float); None: kept in float."""
        if not self.enabled or cls in self.skip:
            return None
        if self.mode == "gguf":
            return source
        fmt = QUANT_CHOICES[self.mode]
        if cls != "linear" and QUANT[fmt].bits == 4:
            return DType.Q8_0
        return fmt
